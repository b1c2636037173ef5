/**
 * How long finished jobs stay in Redis (and in Bull Board). Postgres keeps every run's record (steps, patients,
 * results), and a parent's children's return values live in the parent's own record, so Redis needs only recent
 * history, and a bounded amount of it: Redis holds everything in memory under `noeviction`, so a policy that
 * grows with the load would end in refused writes.
 *
 * BullMQ trims a queue's whole completed (failed) set to the `count` of the job that just finished, and by
 * `age` then too, so these caps hold per queue whatever mix of jobs it runs.
 */
const DAY = 24 * 3600;
/** A step's job: a handful per run, linked from the run page to Bull Board, so the last thousand per queue stay. */
export const STEP_RETENTION = { removeOnComplete: { age: 7 * DAY, count: 1000 }, removeOnFail: { age: 14 * DAY, count: 5000 } } as const;
/**
 * Per-patient jobs come by the thousand per run, and each patient's outcome is its `patients` row: the last 100
 * finished ones are kept to look at, failed ones (rare: the first fails the run) longer.
 */
export const SHARD_RETENTION = { removeOnComplete: { age: DAY, count: 100 }, removeOnFail: { age: 14 * DAY, count: 1000 } } as const;
