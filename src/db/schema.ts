import { bigint, doublePrecision, index, integer, jsonb, pgTable, primaryKey, text, timestamp, uniqueIndex } from 'drizzle-orm/pg-core';

/**
 * Run metadata. Every table a worker writes has a natural key (run + step, run + patient, ...) so that a job
 * delivered twice upserts the same row instead of adding a second one.
 */

export const runs = pgTable(
  'runs',
  {
    id: text('id').primaryKey(),
    status: text('status', { enum: ['queued', 'running', 'succeeded', 'failed', 'cancelled'] }).notNull(),
    mode: text('mode').notNull(),
    trainingMode: text('training_mode').notNull(),
    /** The merged, validated config (base -> mode -> stage -> overrides). Never holds credentials. */
    config: jsonb('config').notNull(),
    /** The run's own overrides, kept apart so a stage's config can be layered under them (base -> mode -> stage -> overrides). */
    overrides: jsonb('overrides'),
    /** train-eval: the earlier run whose processed data and splits this one trains on. */
    dataRunId: text('data_run_id'),
    /** The tfjs backend and device the training steps ran on, e.g. "wasm: CPU wasm SIMD, 1 thread". */
    device: text('device'),
    /** Printable source descriptions (e.g. "kaggle:owner/dataset"), never credentials. */
    sources: jsonb('sources').notNull(),
    dataDir: text('data_dir').notNull(),
    /**
     * POST /runs's Idempotency-Key, unique within its scope (who asked: a hash of the caller's bearer token, ''
     * when the API is open), with a hash of the request it first came with: a replay answers this run, the same
     * key on a different request is refused.
     */
    idempotencyKey: text('idempotency_key'),
    idempotencyScope: text('idempotency_scope').notNull().default(''),
    requestHash: text('request_hash'),
    error: text('error'),
    errorDetails: jsonb('error_details'),
    createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
    startedAt: timestamp('started_at', { withTimezone: true }),
    finishedAt: timestamp('finished_at', { withTimezone: true }),
  },
  (t) => [uniqueIndex('runs_idempotency_scope_key_idx').on(t.idempotencyScope, t.idempotencyKey), index('runs_status_idx').on(t.status, t.createdAt)],
);

export const steps = pgTable(
  'steps',
  {
    runId: text('run_id').notNull().references(() => runs.id, { onDelete: 'cascade' }),
    name: text('name').notNull(),
    status: text('status', { enum: ['pending', 'running', 'success', 'failed', 'cancelled', 'skipped'] }).notNull(),
    queue: text('queue').notNull(),
    jobId: text('job_id'),
    attempts: integer('attempts').notNull().default(0),
    startedAt: timestamp('started_at', { withTimezone: true }),
    finishedAt: timestamp('finished_at', { withTimezone: true }),
    durationMs: integer('duration_ms'),
    /** Progress and result counts, e.g. {done: 3, total: 10, slices: 412}. */
    counts: jsonb('counts').$type<Record<string, number>>().notNull().default({}),
    error: text('error'),
    errorDetails: jsonb('error_details'),
    /**
     * What the step's job returned, recorded on success: a step run alone later (a retry on a finished run) reads
     * an earlier step's result here, where its flow children are gone.
     */
    result: jsonb('result'),
  },
  (t) => [primaryKey({ columns: [t.runId, t.name] })],
);

// The per-run tables below share their column shapes (run_id first, a natural key) by design: see store.ts's upserts.
export const patients = pgTable(
  'patients',
  {
    runId: text('run_id').notNull().references(() => runs.id, { onDelete: 'cascade' }),
    patientId: text('patient_id').notNull(),
    status: text('status', { enum: ['pending', 'done', 'failed'] }).notNull(),
    slices: integer('slices'),
    tumorSlices: integer('tumor_slices'),
    split: text('split', { enum: ['train', 'val', 'test'] }),
    outputDir: text('output_dir'),
    error: text('error'),
    updatedAt: timestamp('updated_at', { withTimezone: true }).notNull().defaultNow(),
  },
  (t) => [primaryKey({ columns: [t.runId, t.patientId] })],
);

export const kaggleImages = pgTable(
  'kaggle_images',
  {
    runId: text('run_id').notNull().references(() => runs.id, { onDelete: 'cascade' }),
    relPath: text('rel_path').notNull(),
    label: integer('label').notNull(),
    status: text('status', { enum: ['processed', 'rejected'] }).notNull(),
    reason: text('reason'),
    split: text('split', { enum: ['train', 'val', 'test'] }),
  },
  (t) => [primaryKey({ columns: [t.runId, t.relPath] })],
);

export const artifacts = pgTable(
  'artifacts',
  {
    runId: text('run_id').notNull().references(() => runs.id, { onDelete: 'cascade' }),
    step: text('step').notNull(),
    kind: text('kind').notNull(),
    path: text('path').notNull(),
    sha256: text('sha256'),
    bytes: bigint('bytes', { mode: 'number' }),
    createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  },
  (t) => [primaryKey({ columns: [t.runId, t.path] })],
);

export const metrics = pgTable(
  'metrics',
  {
    runId: text('run_id').notNull().references(() => runs.id, { onDelete: 'cascade' }),
    step: text('step').notNull(),
    /** -1 for a metric that belongs to no epoch (e.g. a test-set figure). */
    epoch: integer('epoch').notNull().default(-1),
    name: text('name').notNull(),
    value: doublePrecision('value').notNull(),
    recordedAt: timestamp('recorded_at', { withTimezone: true }).notNull().defaultNow(),
  },
  (t) => [primaryKey({ columns: [t.runId, t.step, t.epoch, t.name] })],
);

/** A run's evaluation reports (multitask_evaluation.json, phase_comparison.json), as written beside the run. */
export const evaluations = pgTable(
  'evaluations',
  {
    runId: text('run_id').notNull().references(() => runs.id, { onDelete: 'cascade' }),
    /** 'multitask' or 'phase_comparison'. */
    name: text('name').notNull(),
    report: jsonb('report').notNull(),
    createdAt: timestamp('created_at', { withTimezone: true }).notNull().defaultNow(),
  },
  (t) => [primaryKey({ columns: [t.runId, t.name] })],
);

export type RunRow = typeof runs.$inferSelect;
export type RunStatus = RunRow['status'];
