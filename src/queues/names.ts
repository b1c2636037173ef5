/** Queues by kind of work. Workers choose which they consume (`slicewise worker --queues preprocess`). */
export const QUEUE_NAMES = ['pipeline', 'download', 'preprocess', 'split', 'train', 'evaluate'] as const;
export type QueueName = (typeof QUEUE_NAMES)[number];

/**
 * What a worker consumes unless told otherwise: all but train and evaluate, which run the model and want the
 * training workers (`--queues train,evaluate`: a GPU host, or the cores set aside for the model).
 */
export const DEFAULT_WORKER_QUEUES: QueueName[] = QUEUE_NAMES.filter((q) => q !== 'train' && q !== 'evaluate');

/** What the training workers consume. */
export const MODEL_QUEUES: QueueName[] = ['train', 'evaluate'];

/** BullMQ rejects ':' in custom ids; ids are built from run and step so a retried producer adds nothing new. */
export function jobId(runId: string, step: string, shard?: string): string {
  const safe = (s: string) => s.replace(/[^A-Za-z0-9_.-]/g, '_');
  return [runId, step, shard].filter(Boolean).map((s) => safe(s!)).join('.');
}

/** Pub/sub channel (under the BullMQ prefix) on which a cancelled run's id is announced to every worker. */
export const CANCEL_CHANNEL = 'cancel';
