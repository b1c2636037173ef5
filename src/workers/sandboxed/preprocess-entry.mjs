// BullMQ loads a sandboxed processor with import() inside a fresh worker thread. On Node 20, loader hooks
// registered in the main thread (or passed as --import to the thread) do not reach it, so the thread registers
// tsx itself before importing the TypeScript processor. No build step needed.
import { register } from 'tsx/esm/api';

register();
const { default: processor } = await import('./preprocess.ts');
export default processor;
