import { realpathSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { printTrainKernelTable, runTrainKernelBench } from 'tfjs-wasm-training/bench';
import { writeResult } from 'tfjs-wasm-training/bench/table';
import { env } from '../src/env.ts';
import { demoResultFile, printDemoTables, runDemoBench } from './demo.ts';
import { printPreprocessTable, runPreprocessBench } from './preprocess.ts';
import { printQueueTables, runQueueBench } from './queue.ts';

const results = resolve(dirname(fileURLToPath(import.meta.url)), 'results');

/** The benchmarks, in the order they run. */
export const BENCHMARKS = ['preprocess', 'train-kernels', 'demo', 'queue'] as const;
export type BenchmarkName = (typeof BENCHMARKS)[number];

export interface RunBenchmarksOptions {
  /** Run only these. Default: all. */
  only?: readonly string[];
}

/** Every benchmark prints a table of ratios against a floor measured in the same run, and writes JSON beside it. */
export async function runBenchmarks({ only }: RunBenchmarksOptions = {}): Promise<void> {
  const unknown = (only ?? []).filter((n) => !(BENCHMARKS as readonly string[]).includes(n));
  if (unknown.length) throw new Error(`unknown benchmark(s) ${unknown.join(', ')} (known: ${BENCHMARKS.join(', ')})`);
  const wanted = (name: BenchmarkName) => !only?.length || only.includes(name);
  if (wanted('preprocess')) {
    const pre = await runPreprocessBench();
    printPreprocessTable(pre);
    await writeResult(resolve(results, 'preprocess.json'), pre);
  }
  if (wanted('train-kernels')) {
    // The engine's bench is SliceWise's too: its default threads follow SLICEWISE_WASM_THREADS, as training does.
    const { benchCpu, wasmThreads } = env();
    const train = await runTrainKernelBench({ cpu: benchCpu, threads: wasmThreads });
    printTrainKernelTable(train);
    await writeResult(resolve(results, 'train-kernels.json'), train);
  }
  if (wanted('demo')) {
    const demo = await runDemoBench();
    printDemoTables(demo);
    await writeResult(resolve(results, demoResultFile(demo.engine as string)), demo);
  }
  if (wanted('queue')) {
    // 100 and 1,000 shards; 10,000 with `npx tsx bench/queue.ts --shards 100,1000,10000` (several minutes more).
    const queue = await runQueueBench();
    printQueueTables(queue);
    await writeResult(resolve(results, 'queue.json'), queue);
  }
}

/** `npx tsx bench/index.ts [--only NAME[,NAME]]...`: the runner without the CLI. */
function onlyFromArgs(args: string[]): string[] {
  const only: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const value = a === '--only' ? args[++i] : a.startsWith('--only=') ? a.slice('--only='.length) : undefined;
    if (value === undefined) throw new Error(`unknown argument ${a} (usage: bench/index.ts [--only ${BENCHMARKS.join('|')}]...)`);
    only.push(...value.split(',').map((s) => s.trim()).filter(Boolean));
  }
  return only;
}

const invoked = process.argv[1] ? pathToFileURL(realpathSync(process.argv[1])).href : '';
if (invoked === import.meta.url) {
  Promise.resolve()
    .then(() => runBenchmarks({ only: onlyFromArgs(process.argv.slice(2)) }))
    .catch((err) => {
      console.error(err);
      process.exitCode = 1;
    });
}
