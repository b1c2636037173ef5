/**
 * What the machine itself gives a bench right now, measured in the same run as the figures it qualifies.
 */
import { availableParallelism } from 'node:os';
import { performance } from 'node:perf_hooks';
import { Worker } from 'node:worker_threads';

/**
 * The speed-up the machine gives right now: the same fixed piece of plain JavaScript work (~0.5 s) in one worker
 * thread, then in one thread per core at once, then in one thread again; units of work per second, all cores over
 * the faster single thread. ~2.0 on an idle 2-core machine; other work on a shared machine lowers it. It is the
 * ceiling of any speed-up from more threads or processes measured next to it (the demo's 8 clients, the queue's
 * second worker process). (Throughput, not CPU time: a busy host can take a vCPU away without the guest's clock
 * noticing.)
 */
export async function parallelSpeedup(): Promise<number> {
  const code = `const { parentPort } = require('node:worker_threads'); let x = 0; for (let i = 0; i < 6e7; i++) x += Math.sqrt(i); parentPort.postMessage(x);`;
  const run = async (n: number): Promise<number> => {
    const t0 = performance.now();
    await Promise.all(Array.from({ length: n }, () => new Promise((res, rej) => new Worker(code, { eval: true }).once('message', res).once('error', rej))));
    return n / (performance.now() - t0);
  };
  // One thread before and after: the faster of the two, so that a slow moment there does not inflate the ratio.
  const before = await run(1);
  const all = await run(availableParallelism());
  const after = await run(1);
  return Math.round((all / Math.max(before, after)) * 100) / 100;
}

