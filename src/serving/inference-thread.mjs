// Entry of an inference thread (inference-pool.ts). On Node 20, loader hooks registered in the main thread do not
// reach worker threads, so the thread registers tsx itself before importing TypeScript.
import { register } from 'tsx/esm/api';

register();
await import('./inference-thread-main.ts');
