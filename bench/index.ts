import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { printTrainKernelTable, runTrainKernelBench } from 'tfjs-wasm-training/bench';
import { writeResult } from 'tfjs-wasm-training/bench/table';
import { env } from '../src/env.ts';
import { printPreprocessTable, runPreprocessBench } from './preprocess.ts';

const results = resolve(dirname(fileURLToPath(import.meta.url)), 'results');

/** Every benchmark prints a table of ratios against a floor measured in the same run, and writes JSON beside it. */
export async function runBenchmarks(): Promise<void> {
  const pre = await runPreprocessBench();
  printPreprocessTable(pre);
  await writeResult(resolve(results, 'preprocess.json'), pre);
  // The engine's bench is SliceWise's too: its default threads follow SLICEWISE_WASM_THREADS, as training does.
  const { benchCpu, wasmThreads } = env();
  const train = await runTrainKernelBench({ cpu: benchCpu, threads: wasmThreads });
  printTrainKernelTable(train);
  await writeResult(resolve(results, 'train-kernels.json'), train);
}
