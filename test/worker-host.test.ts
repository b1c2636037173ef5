/**
 * The worker host's account of its jobs (what a stop says it is finishing, and hands back when forced), on real
 * Redis: a job is counted from the moment BullMQ takes it, before the processor is called, and no longer once it
 * is settled.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { jobId } from '../src/queues/names.ts';
import { harness, type Harness } from './helpers/services.ts';

let h: Harness | undefined;
afterEach(async () => {
  await h?.close();
  h = undefined;
});

describe('worker host', () => {
  it('counts a job from the moment it is taken, before its processor runs, and forgets it once settled', async () => {
    h = await harness('pglite', { workerOptions: { queues: ['split'] } });
    const host = h.workers!;
    const worker = host.workers.find((w) => w.name === 'split')!;
    // Listeners run in the order they were added: the host's own 'active' listener has run when this one does,
    // and BullMQ calls the processor only after its fetch returns.
    const seenAtTake = new Promise<string[]>((res) => worker.once('active', () => res(host.describeActive())));
    const settled = new Promise<void>((res) => worker.once('failed', () => res()));
    const id = jobId('run-nowhere', 'split_kaggle');
    await h.ctx.queues.split.add('split_kaggle', { runId: 'run-nowhere' }, { jobId: id, attempts: 1 });

    expect(await seenAtTake).toEqual(['split_kaggle (run run-nowhere)']);
    // The run does not exist, so the step fails at once; the host must not keep counting it.
    await settled;
    await new Promise((r) => setTimeout(r, 50));
    expect(host.activeCount()).toBe(0);
    expect(host.describeActive()).toEqual([]);
  });
});
