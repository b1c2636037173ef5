/**
 * Runs one training stage in a worker thread, so that seconds-long training steps never stall the main
 * thread's lock renewal, progress writes or cancel handling. Talks to the main thread by messages only.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { runStage, type StageInput } from '../model/stage.ts';
import type { TrainThreadMessage } from './train-runner.ts';

const port = parentPort!;
let stop = false;
port.on('message', (m: { type: string }) => {
  if (m.type === 'stop') stop = true;
});
const send = (m: TrainThreadMessage) => port.postMessage(m);

try {
  const result = await runStage(workerData as StageInput, {
    onEpoch: async (report) => send({ type: 'epoch', report }),
    shouldStop: () => stop,
    log: (message) => send({ type: 'log', message }),
  });
  send({ type: 'done', result });
} catch (err) {
  send({ type: 'error', message: (err as Error).message, name: (err as Error).name, stack: (err as Error).stack });
}
port.close();
