/**
 * How long finished jobs stay in Redis (and in Bull Board). The database keeps every run's record, so Redis only
 * needs recent history: a week for completed jobs, two for failed ones to look into.
 */
const DAY = 24 * 3600;
export const STEP_RETENTION = { removeOnComplete: { age: 7 * DAY, count: 5000 }, removeOnFail: { age: 14 * DAY, count: 5000 } } as const;
/** Per-patient jobs come by the thousand per run. */
export const SHARD_RETENTION = { removeOnComplete: { age: 7 * DAY, count: 20000 }, removeOnFail: { age: 14 * DAY, count: 20000 } } as const;
