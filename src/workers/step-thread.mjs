// Entry of a step thread (step-threads.ts). On Node 20, loader hooks registered in the main thread do not reach
// worker threads, so the thread registers tsx itself before importing TypeScript. No build step needed.
import { register } from 'tsx/esm/api';

register();
await import('./step-thread-main.ts');
