// Worker-thread entry of a data-parallel training replica (parallel.ts). Registers tsx in this thread first: on
// Node 20, loader hooks of the main thread do not reach worker threads.
import { register } from 'tsx/esm/api';

register();
await import('./replica-thread-main.ts');
