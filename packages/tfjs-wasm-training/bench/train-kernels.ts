/**
 * Benchmark: one training step (forward + backward, gradients w.r.t. all parameters) of the small U-Net-like probe
 * net (src/probe-net.ts: base 16, depth 2, BatchNorm via tf.moments, 1 input channel) on the wasm backend with our
 * training kernels (src/wasm-kernels.ts).
 *
 * Cases, each in its own child process (a wasm heap never shrinks, and an exhausted one aborts the process):
 * - wasm 128x128 and 256x256, batch 8, our conv kernels on the default threads (`threads`, else the CPUs), and on
 *   1 thread;
 * - wasm 256x256 as 2 micro-batches of 4 with summed gradients, the fallback when batch 8 does not fit the 4 GB
 *   wasm heap (tfjs keeps every forward activation and every backward gradient of the step alive at once);
 * - the same net with BatchNorm as a tf.customGrad (same math, hand-written backward): far fewer tensors kept
 *   alive, so 256x256 batch 8 fits, and fewer element-wise passes;
 * - wasm baseline 128x128, batch 8, 1 thread: wasm's own kernels plus only the two missing conv gradients, built
 *   on XNNPACK (the least that training on stock tfjs-backend-wasm needs);
 * - tfjs cpu backend 128x128, batch 1, one step (it needs minutes for one step at batch 8), with wasm on the same
 *   case for the ratio. Skipped with `cpu: false` (--no-cpu).
 *
 * ms/step: median over the timed steps after warm-up (wall time; process CPU time alongside, steadier on a shared
 * machine). Kernel shares: from tf.profile of one extra step: time in the kernels we register vs in wasm's other
 * kernels vs outside kernels (engine, tape, JS glue: that step's wall time minus its kernel time).
 *
 *   npx tsx bench/train-kernels.ts [--no-cpu] [--threads N] [--only ID,ID...]
 *
 * prints a table and writes bench/results/train-kernels.json (in this package). Applications call
 * runTrainKernelBench and printTrainKernelTable (tfjs-wasm-training/bench) and keep the JSON where they like.
 */
import { spawn } from 'node:child_process';
import { realpathSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { dirname, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../src/index.js';
import { registerWasmTrainingKernels, unregisterWasmTrainingKernels, WASM_TRAINING_KERNELS } from '../src/wasm-kernels.js';
import { initProbeParams, makeProbeBatch, PROBE_SMALL, probeConvFlops, probeLoss, type ProbeBatch } from '../src/probe-net.js';
import { median, printTable, writeResult } from './table.js';

const here = dirname(fileURLToPath(import.meta.url));
const RESULT_MARK = '@@train-kernels-result@@';
const CONV_GRADS = ['Conv2DBackpropFilter', 'Conv2DBackpropInput'];

interface CaseSpec {
  id: string;
  backend: 'wasm' | 'cpu';
  /** 'ours': all our kernels; 'baseline': wasm's own kernels + XNNPACK-based conv gradients only. */
  kernels: 'ours' | 'baseline';
  /** Threads for our conv kernels (undefined: the bench's `threads`, else initBackend's default, the CPUs). */
  threads?: number;
  /** BatchNorm of the probe net (default 'moments', like the model). */
  bn?: 'moments' | 'customGrad';
  size: number;
  batch: number;
  /** Micro-batches per step (gradients summed); batch / micro images each. */
  micro: number;
  warmup: number;
  runs: number;
  profile: boolean;
}

interface KernelTime {
  kernel: string;
  ms: number;
  calls: number;
  ours: boolean;
}

export interface CaseResult {
  id: string;
  backend: string;
  device: string;
  kernels: CaseSpec['kernels'];
  bn: 'moments' | 'customGrad';
  size: number;
  batch: number;
  micro_batches: number;
  ms_per_step?: number;
  cpu_ms_per_step?: number;
  runs_ms?: number[];
  conv_gflop_per_step?: number;
  conv_gflops?: number;
  profile?: {
    /** Wall time of the profiled step (shares below are of this step). */
    step_ms: number;
    kernel_ms: number;
    our_kernels_ms: number;
    other_kernels_ms: number;
    outside_kernels_ms: number;
    our_share: number;
    other_share: number;
    outside_share: number;
    top: KernelTime[];
  };
  wasm_heap_mb?: number;
  error?: string;
}

const round = (x: number, digits = 1): number => Math.round(x * 10 ** digits) / 10 ** digits;

/** Runs one case in this process (the child side). */
async function runCase(spec: CaseSpec): Promise<CaseResult> {
  // The baseline's conv gradients are the XNNPACK-based ones: the least that stock tfjs-backend-wasm needs.
  const info = await initBackend({ prefer: spec.backend, threads: spec.threads, simdKernels: spec.kernels !== 'baseline' });
  if (info.backend !== spec.backend) throw new Error(`wanted backend ${spec.backend}, got ${info.backend}`);
  let ours = new Set(WASM_TRAINING_KERNELS.map((k) => k.kernelName));
  if (spec.backend === 'wasm' && spec.kernels === 'baseline') {
    unregisterWasmTrainingKernels();
    registerWasmTrainingKernels({ only: CONV_GRADS });
    ours = new Set(CONV_GRADS);
  }
  if (spec.backend === 'cpu') ours = new Set();
  const cfg = { ...PROBE_SMALL, bn: spec.bn ?? 'moments' };
  const init = initProbeParams(cfg);
  const names = [...init.keys()];
  const params = names.map((n) => tf.tensor(init.get(n)!.values, init.get(n)!.shape));
  const per = spec.batch / spec.micro;
  const batches: ProbeBatch[] = Array.from({ length: spec.micro }, (_, i) => makeProbeBatch(cfg, per, spec.size, spec.size, 7 + i));
  const lossOf = (b: ProbeBatch) => (...ts: tf.Tensor[]) => probeLoss(cfg, new Map(names.map((n, i) => [n, ts[i]!])), b);

  /** One training step: gradients of every parameter, summed over the micro-batches. */
  const step = (): tf.Tensor[] => {
    let acc: tf.Tensor[] | null = null;
    for (const b of batches) {
      const g = tf.tidy(() => tf.grads(lossOf(b))(params));
      if (!acc) acc = g;
      else {
        const prev: tf.Tensor[] = acc;
        acc = prev.map((t, i) => tf.add(t, g[i]!));
        tf.dispose([...prev, ...g]);
      }
    }
    return acc!;
  };
  const timed = async (): Promise<{ ms: number; cpu: number }> => {
    const c = process.cpuUsage();
    const t = performance.now();
    const g = step();
    await g[0]!.data();
    const ms = performance.now() - t;
    const u = process.cpuUsage(c);
    tf.dispose(g);
    return { ms, cpu: (u.user + u.system) / 1000 };
  };

  if (spec.backend === 'cpu') {
    // Warm the JIT on a tiny input: one full-size cpu step takes minutes.
    const tiny = makeProbeBatch(cfg, 1, 16, 16);
    tf.dispose(tf.tidy(() => tf.grads(lossOf(tiny))(params)));
    tf.dispose([tiny.x, tiny.mask, tiny.cls, tiny.keep]);
  }
  for (let i = 0; i < spec.warmup; i++) await timed();
  const runs: Array<{ ms: number; cpu: number }> = [];
  for (let i = 0; i < spec.runs; i++) runs.push(await timed());
  const msPerStep = median(runs.map((r) => r.ms));
  const flops = probeConvFlops(cfg, per, spec.size, spec.size);
  const convFlop = spec.micro * (flops.forward + flops.backward);
  const result: CaseResult = {
    id: spec.id,
    backend: info.backend,
    device: info.device,
    kernels: spec.kernels,
    bn: cfg.bn,
    size: spec.size,
    batch: spec.batch,
    micro_batches: spec.micro,
    ms_per_step: round(msPerStep),
    cpu_ms_per_step: round(median(runs.map((r) => r.cpu))),
    runs_ms: runs.map((r) => round(r.ms)),
    conv_gflop_per_step: round(convFlop / 1e9, 2),
    conv_gflops: round(convFlop / 1e6 / msPerStep, 2),
  };
  if (spec.profile) {
    const t0 = performance.now();
    const prof = await tf.profile(() => step());
    const profWall = performance.now() - t0;
    tf.dispose(prof.result as tf.Tensor[]);
    const byKernel = new Map<string, KernelTime>();
    for (const k of prof.kernels) {
      const e = byKernel.get(k.name) ?? { kernel: k.name, ms: 0, calls: 0, ours: ours.has(k.name) };
      e.ms += Number(k.kernelTimeMs);
      e.calls++;
      byKernel.set(k.name, e);
    }
    const all = [...byKernel.values()].sort((a, b) => b.ms - a.ms);
    const kernelMs = all.reduce((s, k) => s + k.ms, 0);
    const ourMs = all.filter((k) => k.ours).reduce((s, k) => s + k.ms, 0);
    const outside = Math.max(0, profWall - kernelMs);
    const whole = kernelMs + outside;
    result.profile = {
      step_ms: round(profWall),
      kernel_ms: round(kernelMs),
      our_kernels_ms: round(ourMs),
      other_kernels_ms: round(kernelMs - ourMs),
      outside_kernels_ms: round(outside),
      our_share: round(ourMs / whole, 3),
      other_share: round((kernelMs - ourMs) / whole, 3),
      outside_share: round(outside / whole, 3),
      top: all.slice(0, 15).map((k) => ({ ...k, ms: round(k.ms) })),
    };
  }
  if (info.backend === 'wasm') {
    const heap = (tf.backend() as unknown as { wasm: { HEAPU8: Uint8Array } }).wasm.HEAPU8.length;
    result.wasm_heap_mb = Math.round(heap / 1e6);
  }
  return result;
}

/** Runs one case in a child process; a crash (e.g. the 4 GB wasm heap running out) becomes `error`. */
function runChild(spec: CaseSpec): Promise<CaseResult> {
  return new Promise((resolvePromise) => {
    // tsx as this package resolves it: the child then starts wherever the package sits (a workspace, a symlink
    // in node_modules, a plain install) and whatever the caller's working directory.
    const tsx = import.meta.resolve('tsx');
    const child = spawn(process.execPath, ['--import', tsx, fileURLToPath(import.meta.url), '--case', JSON.stringify(spec)], {
      cwd: resolve(here, '..'),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('close', (code) => {
      const line = out.split('\n').find((l) => l.startsWith(RESULT_MARK));
      if (line) {
        resolvePromise(JSON.parse(line.slice(RESULT_MARK.length)) as CaseResult);
        return;
      }
      const text = `${out}\n${err}`;
      const reason = /wasm heap exhausted|Aborted\(\)|out of memory|OOM/i.test(text)
        ? 'out of memory: the step does not fit the 4 GB wasm heap'
        : (text.split('\n').find((l) => /Error/.test(l) && l.length < 400) ?? `child exited with code ${code}`);
      resolvePromise({
        id: spec.id,
        backend: spec.backend,
        device: '',
        kernels: spec.kernels,
        bn: spec.bn ?? 'moments',
        size: spec.size,
        batch: spec.batch,
        micro_batches: spec.micro,
        error: reason.trim(),
      });
    });
  });
}

export interface TrainKernelBenchOptions {
  /** Also time tfjs's cpu backend (one step at batch 1 takes minutes) and wasm on the same case. Default: true. */
  cpu?: boolean;
  /** Kernel threads of the cases that do not fix their own. Default: initBackend's (the CPUs, at most 8). */
  threads?: number;
  /** Runs only the cases with these ids (e.g. 'wasm-128-b1'). Default: every case. */
  only?: readonly string[];
}

export interface TrainKernelBenchResult {
  bench: 'train-kernels';
  cases: CaseResult[];
  [key: string]: unknown;
}

/** Runs the cases (each in a child process, one after the other) and returns the figures; prints progress to stderr. */
export async function runTrainKernelBench(opts: TrainKernelBenchOptions = {}): Promise<TrainKernelBenchResult> {
  const withCpu = opts.cpu ?? true;
  const w = { backend: 'wasm', kernels: 'ours' } as const;
  let specs: CaseSpec[] = [
    { ...w, id: 'wasm-128-b8', size: 128, batch: 8, micro: 1, warmup: 2, runs: 5, profile: true },
    { ...w, id: 'wasm-128-b8-1thread', threads: 1, size: 128, batch: 8, micro: 1, warmup: 2, runs: 5, profile: true },
    { ...w, id: 'wasm-256-b8', size: 256, batch: 8, micro: 1, warmup: 1, runs: 3, profile: true },
    { ...w, id: 'wasm-256-b8-as-2x4', size: 256, batch: 8, micro: 2, warmup: 1, runs: 3, profile: true },
    { ...w, id: 'wasm-256-b8-customGradBN', bn: 'customGrad', size: 256, batch: 8, micro: 1, warmup: 1, runs: 3, profile: true },
    { ...w, id: 'wasm-128-b8-customGradBN', bn: 'customGrad', size: 128, batch: 8, micro: 1, warmup: 2, runs: 5, profile: false },
    { backend: 'wasm', kernels: 'baseline', threads: 1, id: 'wasm-baseline-128-b8', size: 128, batch: 8, micro: 1, warmup: 1, runs: 3, profile: true },
  ];
  if (withCpu) {
    specs.push(
      { ...w, id: 'wasm-128-b1', size: 128, batch: 1, micro: 1, warmup: 2, runs: 5, profile: false },
      { backend: 'cpu', kernels: 'ours', id: 'cpu-128-b1', size: 128, batch: 1, micro: 1, warmup: 0, runs: 1, profile: false },
    );
  }
  if (opts.only) {
    const missing = opts.only.filter((id) => !specs.some((s) => s.id === id));
    if (missing.length) throw new Error(`train-kernels: no case ${missing.join(', ')} (cases: ${specs.map((s) => s.id).join(', ')})`);
    specs = specs.filter((s) => opts.only!.includes(s.id));
  }
  if (opts.threads != null) specs = specs.map((s) => ({ ...s, threads: s.threads ?? opts.threads }));
  const load0 = loadavg()[0]!;
  const cases: CaseResult[] = [];
  for (const spec of specs) {
    process.stderr.write(`train-kernels: ${spec.id} ...\n`);
    cases.push(await runChild(spec));
  }
  const byId = new Map(cases.map((c) => [c.id, c]));
  const ratio = (a: string, b: string): number | undefined => {
    const x = byId.get(a)?.ms_per_step;
    const y = byId.get(b)?.ms_per_step;
    return x && y ? round(x / y, 2) : undefined;
  };
  return {
    bench: 'train-kernels',
    date: new Date().toISOString(),
    node: process.version,
    tfjs: tf.version.tfjs,
    cpu: cpus()[0]?.model,
    cores: cpus().length,
    loadavg_1m: { start: round(load0, 2), end: round(loadavg()[0]!, 2) },
    model: { ...PROBE_SMALL, note: 'probe net: U-Net-like, BatchNorm via tf.moments (training mode), loss BCE + CE' },
    statistic: 'median of the timed steps after warm-up (wall ms); cpu = process.cpuUsage over the same steps',
    our_kernels: WASM_TRAINING_KERNELS.map((k) => k.kernelName),
    speedup_vs_wasm_baseline_128: ratio('wasm-baseline-128-b8', 'wasm-128-b8'),
    speedup_vs_cpu_128_b1: ratio('cpu-128-b1', 'wasm-128-b1'),
    cases,
  };
}

/** The console table of a result: one row a case, then each profiled case's top kernels. */
export function printTrainKernelTable(result: TrainKernelBenchResult): void {
  const pct = (x: number | undefined): string => (x === undefined ? '' : `${(100 * x).toFixed(0)}%`);
  const rows = [
    ['case', 'device / kernels', 'images', 'ms/step', 'cpu ms', 'conv GFLOP/s', 'our kernels', 'other kernels', 'outside', 'heap MB'],
    ...result.cases.map((c) => [
      c.id,
      c.error ? `${c.backend} / ${c.kernels}` : `${c.device} / ${c.backend === 'cpu' ? 'tfjs cpu' : c.kernels}`,
      `${c.batch}x${c.size}x${c.size}${c.micro_batches > 1 ? ` (${c.micro_batches}x${c.batch / c.micro_batches})` : ''}`,
      c.error ? c.error : (c.ms_per_step?.toFixed(0) ?? ''),
      c.cpu_ms_per_step?.toFixed(0) ?? '',
      c.conv_gflops?.toFixed(1) ?? '',
      pct(c.profile?.our_share),
      pct(c.profile?.other_share),
      pct(c.profile?.outside_share),
      c.wasm_heap_mb?.toString() ?? '',
    ]),
  ];
  printTable(rows, 3);
  for (const c of result.cases) {
    if (!c.profile) continue;
    const top = c.profile.top
      .slice(0, 8)
      .map((k) => `${k.kernel}${k.ours ? '*' : ''} ${k.ms.toFixed(0)}`)
      .join(', ');
    console.log(`  ${c.id} top kernels ms (* ours): ${top}`);
  }
}

async function main(): Promise<void> {
  const caseArg = process.argv.indexOf('--case');
  if (caseArg >= 0) {
    const spec = JSON.parse(process.argv[caseArg + 1]!) as CaseSpec;
    const result = await runCase(spec);
    process.stdout.write(`${RESULT_MARK}${JSON.stringify(result)}\n`);
    return;
  }
  const { values } = parseArgs({
    options: { 'no-cpu': { type: 'boolean' }, threads: { type: 'string' }, only: { type: 'string' } },
  });
  const threads = values.threads === undefined ? undefined : Number(values.threads);
  if (threads !== undefined && !(Number.isInteger(threads) && threads > 0)) throw new Error(`--threads ${values.threads}: not a positive integer`);
  const result = await runTrainKernelBench({
    cpu: !values['no-cpu'],
    ...(threads ? { threads } : {}),
    ...(values.only ? { only: values.only.split(',').map((s) => s.trim()) } : {}),
  });
  printTrainKernelTable(result);
  await writeResult(resolve(here, 'results/train-kernels.json'), result);
}

const invoked = process.argv[1] ? pathToFileURL(realpathSync(process.argv[1])).href : '';
if (invoked === import.meta.url) {
  main().catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}
