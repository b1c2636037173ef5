import { runPreprocessBench } from './preprocess.ts';
import { runTrainKernelBench } from './train-kernels.ts';

/** Every benchmark prints a table of ratios against a floor measured in the same run, and writes JSON beside it. */
export async function runBenchmarks(): Promise<void> {
  await runPreprocessBench();
  await runTrainKernelBench();
}
