/**
 * Benchmark: the demo's serving speed.
 *
 * 1. POST /predict_multitask over HTTP on loopback (a real @hono/node-server on 127.0.0.1, multipart `file`, the
 *    route's defaults: Grad-CAM on, segmentation when p(tumour) >= 0.3) for one real Kaggle image (Y28.jpg,
 *    630 x 630 JPEG, resized to 256 by the pipeline's own preprocessing in the inference thread), small and medium
 *    presets: p50 / p95 latency and requests per second with 1 client (sequential) and 8 concurrent clients,
 *    plus 1 client with ?gradcam=false (what the Grad-CAM costs); the process's CPU time per request and cores kept
 *    busy; and, around them, the speed-up plain JavaScript gets from every core right now (parallelSpeedup: on a
 *    shared machine, the ceiling of the 8-client speed-up).
 *    The server is the demo's router (src/api/demo.ts, demoRoutes) with createApp's error handler, over an
 *    InferencePool in the demo's default configuration (one inference thread per core, each with one compute thread
 *    per core that it uses only while it is the only thread computing: a lone request computes on every core), on
 *    the demo's engine: ONNX Runtime by default, tfjs with SLICEWISE_DEMO_ENGINE=tfjs (or `--engine tfjs` when this
 *    file is run directly), which is how the figures before ONNX Runtime are reproduced; the tables say which ran,
 *    and a tfjs run writes bench/results/demo-tfjs.json instead of demo.json.
 *    createApp itself is not used: it wants Redis and a database for its other routes, and DemoService resolves
 *    the served run from the database; here a DemoService serves an untrained checkpoint of each preset (speed
 *    does not depend on training) written to a temp dir with saveCheckpoint.
 * 2. Our preprocessing alone (kaggleImageToInput on the same bytes, in this thread): p50.
 * 3. The same network's forward pass in PyTorch on the same machine in the same run, through
 *    ../shared/anchors/torch_infer.py (Debian's python3-torch, 2 threads, and 1 for comparison, batch 1, 256 x 256),
 *    run (2 threads) before each of the 3 rounds of the 1-client measurement (1 thread: once, before them), when
 *    `/usr/bin/python3 -c 'import torch'` works (else the ratio is skipped with a note; nothing is installed). Goal:
 *    our p50 <= 1.5 x (PyTorch forward + our preprocessing), as the median of the rounds' ratios, each round with its
 *    own PyTorch and preprocessing figures (preprocessing is timed again right after PyTorch, 10 runs).
 *    Serving goal: 8 clients get >= 1.7x the requests per second of one.
 * 4. `slicewise predict`'s work per full-size 240 x 240 x 155 volume (the BraTS 2015 fixture pat0001's FLAIR):
 *    read the file, the header, InferencePool.volume in predict's configuration for one file (one inference thread
 *    with every core as kernel threads), the segmentation written as .nii.gz; small preset at 256; median of 3.
 *    predictFiles itself needs a run in the database, so its per-file steps are repeated here.
 *
 *   npx tsx bench/demo.ts [--engine onnx|tfjs]   prints tables and writes bench/results/demo.json (demo-tfjs.json)
 *   npx tsx bench/index.ts --only demo            the same, through the bench runner (engine: SLICEWISE_DEMO_ENGINE)
 */
import { spawnSync } from 'node:child_process';
import { realpathSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import type { Server } from 'node:http';
import os, { availableParallelism, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { serve } from '@hono/node-server';
import * as tf from '@tensorflow/tfjs';
import { Hono } from 'hono';
import { printTable, writeResult } from 'tfjs-wasm-training/bench/table';
import { demoRoutes } from '../src/api/demo.ts';
import { errorResponse } from '../src/api/errors.ts';
import { env } from '../src/env.ts';
import { kaggleImageToInput } from '../src/imaging/kaggle.ts';
import { niftiHeaderBytes } from '../src/imaging/nifti.ts';
import { writeLabelsLike } from '../src/imaging/nifti-write.ts';
import { saveCheckpoint } from '../src/model/checkpoint.ts';
import { createUNet, PRESETS, type PresetName } from '../src/model/unet.ts';
import { DemoService, type ServingModel } from '../src/serving/demo-service.ts';
import { InferencePool } from '../src/serving/inference-pool.ts';
import type { ServedModel } from '../src/serving/served-model.ts';
import { parallelSpeedup } from './machine.ts';

const here = dirname(fileURLToPath(import.meta.url));
const SIZE = 256;
const IMAGE = 'kaggle-navoneel/yes/Y28.jpg';
const VOLUME = 'brats2015-deepmedic/pat0001/Flair_subtrMeanDivStd.nii.gz';
const TORCH_ANCHOR = resolve(here, '../../shared/anchors/torch_infer.py');
const PYTHON = '/usr/bin/python3';
const TORCH_THREADS = 2;
const CLIENTS = 8;
const GOAL_LATENCY_RATIO = 1.5;
const GOAL_SCALING = 1.7;
const VOLUME_RUNS = 3;
/**
 * The 1-client measurement comes in this many rounds, each right after a PyTorch run of the same network: on a
 * shared machine the load changes within seconds, so each round's ratio compares figures taken moments apart, and
 * the ratio reported is their median.
 */
const LATENCY_ROUNDS = 3;
const ROUND_PREPROCESS_RUNS = 10;
/** Requests per measurement: enough for a p95 while the whole bench stays within ~3 minutes on 2 cores. */
const PLAN: Record<'small' | 'medium', { sequential: number; concurrent: number; noGradcam: number }> = {
  small: { sequential: 24, concurrent: 32, noGradcam: 12 },
  medium: { sequential: 9, concurrent: 16, noGradcam: 3 },
};
const PREPROCESS_RUNS = 30;

function fixturesRoot(): string {
  return env().fixtures ?? resolve(here, '../../shared/fixtures');
}

const round = (x: number, digits = 1): number => Math.round(x * 10 ** digits) / 10 ** digits;

/** Linear interpolation between the closest ranks (numpy's default). */
function percentile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  const at = (s.length - 1) * q;
  const lo = Math.floor(at);
  const hi = Math.ceil(at);
  return s[lo]! + (s[hi]! - s[lo]!) * (at - lo);
}

/** A DemoService that serves a given pool instead of resolving a run from the database. */
class FixedDemoService extends DemoService {
  constructor(private readonly serving: ServingModel) {
    super({ db: undefined as never });
  }

  override model(): Promise<ServingModel> {
    return Promise.resolve(this.serving);
  }

  override async close(): Promise<void> {
    await this.serving.pool.close();
  }
}

async function writeCheckpoint(preset: PresetName, dir: string): Promise<string> {
  const model = createUNet(preset);
  try {
    const { files } = await saveCheckpoint(dir, model);
    return files['weights.bin']!;
  } finally {
    model.dispose();
  }
}

function servedInfo(preset: PresetName, dir: string, sha256: string): ServedModel {
  const a = PRESETS[preset];
  return {
    run_id: `bench-${preset}`,
    training_mode: 'bench',
    checkpoint: { stage: 'joint', dir, sha256 },
    preset,
    architecture: { base: a.base, depth: a.depth, head_hidden: a.headHidden, in_channels: 1 },
    image_size: SIZE,
    modalities: ['flair'],
    threshold: 0.5,
    evaluation: null,
  };
}

async function listen(app: Hono): Promise<{ url: string; close(): Promise<void> }> {
  return new Promise((res, rej) => {
    const server = serve({ fetch: app.fetch, port: 0, hostname: '127.0.0.1' }, (info) => {
      res({
        url: `http://127.0.0.1:${info.port}`,
        close: () =>
          new Promise<void>((r) => {
            (server as Server).closeAllConnections?.();
            server.close(() => r());
          }),
      });
    }) as Server;
    // Past Node's 5 s default: the client's pooled connection must outlive a PyTorch run between two rounds, or
    // the next request would go out on a socket the server is closing.
    server.keepAliveTimeout = 120_000;
    server.once('error', rej);
  });
}

interface Answer {
  ms: number;
  server_ms: number;
  segmented: boolean;
  tumor_probability: number;
}

async function post(url: string, bytes: Uint8Array<ArrayBuffer>, name: string, gradcam: boolean): Promise<Answer> {
  const form = new FormData();
  form.append('file', new Blob([bytes], { type: 'image/jpeg' }), name);
  const t = performance.now();
  const res = await fetch(`${url}/predict_multitask${gradcam ? '' : '?gradcam=false'}`, { method: 'POST', body: form });
  const text = await res.text();
  const ms = performance.now() - t;
  if (res.status !== 200) throw new Error(`POST /predict_multitask answered ${res.status}: ${text.slice(0, 500)}`);
  const body = JSON.parse(text) as { processing_time_ms: number; segmentation: unknown; classification: { tumor_probability: number }; gradcam_overlay_png_base64: string | null };
  if (!body.gradcam_overlay_png_base64 !== !gradcam) throw new Error(`POST /predict_multitask answered ${gradcam ? 'without' : 'with'} a Grad-CAM`);
  return { ms, server_ms: body.processing_time_ms, segmented: body.segmentation !== null, tumor_probability: body.classification.tumor_probability };
}

interface LoadResult {
  clients: number;
  gradcam: boolean;
  requests: number;
  wall_s: number;
  rps: number;
  p50_ms: number;
  p95_ms: number;
  /** processing_time_ms as the route reports it (upload parsed -> answer ready), p50. */
  server_p50_ms: number;
  /** CPU time of this process (all threads: server, inference threads, client) per request. */
  cpu_ms_per_request: number;
  /** That CPU time over the wall time: how many cores the process kept busy (2 at most here). */
  cores_busy: number;
  runs_ms: number[];
}

/** `requests` requests from `clients` clients, each sending its next request when its previous one is answered. */
async function load(url: string, bytes: Uint8Array<ArrayBuffer>, name: string, clients: number, requests: number, { gradcam = true } = {}): Promise<{ result: LoadResult; answers: Answer[] }> {
  const answers: Answer[] = [];
  let next = 0;
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async () => {
      while (next < requests) {
        next++;
        answers.push(await post(url, bytes, name, gradcam));
      }
    }),
  );
  const wall = (performance.now() - t0) / 1000;
  const c = process.cpuUsage(c0);
  return { answers, result: summary(answers, { clients, gradcam, wall, cpuMs: (c.user + c.system) / 1000 }) };
}

/** The figures of a set of answers, measured over `wall` seconds that cost `cpuMs` of this process's CPU. */
function summary(answers: Answer[], { clients, gradcam, wall, cpuMs }: { clients: number; gradcam: boolean; wall: number; cpuMs: number }): LoadResult {
  const ms = answers.map((a) => a.ms);
  const requests = answers.length;
  return {
    clients,
    gradcam,
    requests,
    wall_s: round(wall, 2),
    rps: round(requests / wall, 2),
    p50_ms: round(percentile(ms, 0.5)),
    p95_ms: round(percentile(ms, 0.95)),
    server_p50_ms: round(percentile(answers.map((a) => a.server_ms), 0.5)),
    cpu_ms_per_request: round(cpuMs / requests),
    cores_busy: round(cpuMs / 1000 / wall, 2),
    runs_ms: ms.map((x) => round(x)),
  };
}

interface PresetResult {
  preset: PresetName;
  architecture: { base: number; depth: number; head_hidden: number };
  inference_threads: number;
  kernel_threads_per_thread: number;
  backend: string | null;
  warmup_requests: number;
  segmented: boolean;
  tumor_probability: number;
  one_client: LoadResult;
  eight_clients: LoadResult;
  /** 1 client with ?gradcam=false: what the Grad-CAM costs. */
  one_client_no_gradcam: LoadResult;
  /** rps with 8 clients / rps with 1. */
  scaling: number;
  /** parallelSpeedup() right before the 1-client and right after the 8-client measurement. */
  speedup_ceiling: [number, number];
  /** PyTorch's forward pass, 2 threads: the median of the runs before each 1-client round. */
  torch_forward_ms: number | null;
  /** The same with 1 thread: what each of our inference threads is up against, thread for thread, when all are busy. */
  torch_forward_1thread_ms: number | null;
  /** The 1-client rounds: PyTorch's forward pass, then our p50 right after it. */
  rounds: LatencyRound[];
  /** Per round: our p50 / (that round's torch forward + our preprocessing p50). */
  latency_ratio_rounds: number[];
  /** Their median; the goal is <= 1.5. */
  latency_ratio: number | null;
  /** p50 (1 client, all rounds) / (torch forward on 1 thread + preprocessing). */
  latency_ratio_1thread: number | null;
}

/** Several load() measurements as one: requests, wall and CPU time summed, percentiles over every request. */
function merged(parts: { result: LoadResult; answers: Answer[] }[]): { result: LoadResult; answers: Answer[] } {
  const answers = parts.flatMap((p) => p.answers);
  const wall = parts.reduce((s, p) => s + p.result.wall_s, 0);
  const cpuMs = parts.reduce((s, p) => s + p.result.cpu_ms_per_request * p.result.requests, 0);
  const { clients, gradcam } = parts[0]!.result;
  return { answers, result: summary(answers, { clients, gradcam, wall, cpuMs }) };
}

interface LatencyRound {
  torch_forward_ms: number | null;
  /** Our preprocessing alone, p50 of a few runs right after PyTorch's: the same moment as the round. */
  preprocess_ms: number;
  our_p50_ms: number;
}

async function benchPreset(
  preset: 'small' | 'medium',
  work: string,
  bytes: Uint8Array<ArrayBuffer>,
  name: string,
  anchor: (() => number) | null,
): Promise<Omit<PresetResult, 'torch_forward_ms' | 'torch_forward_1thread_ms' | 'latency_ratio' | 'latency_ratio_rounds' | 'latency_ratio_1thread'>> {
  const dir = join(work, preset);
  const sha = await writeCheckpoint(preset, dir);
  // The demo's defaults (DemoService: one inference thread per core; a kernel thread per core each, or
  // SLICEWISE_DEMO_KERNEL_THREADS).
  const kernelThreads = env().demoKernelThreads ?? availableParallelism();
  const pool = new InferencePool({ checkpoint: dir, kernelThreads, imageSize: SIZE });
  const demo = new FixedDemoService({ info: servedInfo(preset, dir, sha), pool });
  const server = await listen(new Hono().onError(errorResponse).route('/', demoRoutes(demo)));
  try {
    await pool.ready;
    // Warm-up: every thread answers twice (the pool sends a lone request to the first idle thread).
    const warm = await load(server.url, bytes, name, pool.size, pool.size * 2);
    const before = await parallelSpeedup();
    // PyTorch right before each round of ours, while no inference thread computes, so that both see much the same machine.
    const parts: { result: LoadResult; answers: Answer[] }[] = [];
    const rounds: LatencyRound[] = [];
    for (let r = 0; r < LATENCY_ROUNDS; r++) {
      const torch = anchor ? anchor() : null;
      const preprocess_ms = (await benchPreprocess(bytes, ROUND_PREPROCESS_RUNS)).p50_ms;
      const part = await load(server.url, bytes, name, 1, Math.ceil(PLAN[preset].sequential / LATENCY_ROUNDS));
      parts.push(part);
      rounds.push({ torch_forward_ms: torch, preprocess_ms, our_p50_ms: part.result.p50_ms });
    }
    const one = merged(parts);
    const eight = await load(server.url, bytes, name, CLIENTS, PLAN[preset].concurrent);
    const after = await parallelSpeedup();
    const plain = await load(server.url, bytes, name, 1, PLAN[preset].noGradcam, { gradcam: false });
    const a = PRESETS[preset];
    return {
      preset,
      architecture: { base: a.base, depth: a.depth, head_hidden: a.headHidden },
      inference_threads: pool.size,
      kernel_threads_per_thread: kernelThreads,
      backend: pool.backend ? `${pool.backend.engine}: ${pool.backend.backend} ${pool.backend.version} (${pool.backend.device})` : null,
      warmup_requests: warm.result.requests,
      segmented: one.answers[0]!.segmented,
      tumor_probability: round(one.answers[0]!.tumor_probability, 3),
      one_client: one.result,
      eight_clients: eight.result,
      one_client_no_gradcam: plain.result,
      scaling: round(eight.result.rps / one.result.rps, 2),
      speedup_ceiling: [before, after],
      rounds,
    };
  } finally {
    await server.close();
    await demo.close();
  }
}

async function benchPreprocess(bytes: Uint8Array, runs = PREPROCESS_RUNS): Promise<{ p50_ms: number; p95_ms: number; runs: number }> {
  for (let i = 0; i < 3; i++) await kaggleImageToInput(bytes, { imageSize: SIZE });
  const ms: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t = performance.now();
    const r = await kaggleImageToInput(bytes, { imageSize: SIZE });
    ms.push(performance.now() - t);
    if (!r.ok) throw new Error(`${IMAGE}: ${r.reason}`);
  }
  return { p50_ms: round(percentile(ms, 0.5)), p95_ms: round(percentile(ms, 0.95)), runs };
}

function torchAvailable(): { ok: boolean; version: string | null; note: string | null } {
  const r = spawnSync(PYTHON, ['-c', 'import torch; print(torch.__version__)'], { encoding: 'utf8', timeout: 120_000 });
  if (r.status === 0) return { ok: true, version: r.stdout.trim(), note: null };
  return { ok: false, version: null, note: r.error ? `${PYTHON}: ${r.error.message}` : (r.stderr.trim().split('\n').pop() ?? `exit ${r.status}`) };
}

/** ms per forward pass (median of 20 after 3 warm-ups), as the anchor prints it. */
function torchForward(preset: PresetName, threads = TORCH_THREADS): number {
  const a = PRESETS[preset];
  const args = [TORCH_ANCHOR, String(a.base), String(a.depth), String(SIZE), '1', String(threads)];
  const r = spawnSync(PYTHON, args, { encoding: 'utf8', timeout: 300_000 });
  const m = /([\d.]+) ms\/forward/.exec(r.stdout ?? '');
  if (r.status !== 0 || !m) throw new Error(`${PYTHON} ${args.join(' ')} failed (${r.status}): ${r.stderr || r.stdout}`);
  return Number(m[1]);
}

interface VolumeBench {
  file: string;
  preset: PresetName;
  image_size: number;
  shape: [number, number, number];
  inference_threads: number;
  kernel_threads: number;
  seconds_per_volume: number;
  runs_s: number[];
  tumor_voxels: number;
}

async function benchVolume(work: string): Promise<VolumeBench> {
  const file = join(fixturesRoot(), VOLUME);
  const dir = join(work, 'volume-small');
  await writeCheckpoint('small', dir);
  // predictFiles for one file: min(cores, files) = 1 inference thread, every core a kernel thread.
  const cores = availableParallelism();
  const pool = new InferencePool({ checkpoint: dir, size: 1, kernelThreads: cores, imageSize: SIZE });
  try {
    await pool.ready;
    const warm = await readFile(join(fixturesRoot(), IMAGE));
    await pool.image(warm, 'warm-up.jpg', { imageSize: SIZE, segment: 'always', gradcam: false });
    const runs: number[] = [];
    let shape: [number, number, number] = [0, 0, 0];
    let tumour = 0;
    for (let r = 0; r < VOLUME_RUNS; r++) {
      const t = performance.now();
      const bytes = await readFile(file);
      const header = niftiHeaderBytes(bytes, 'pat0001');
      const v = await pool.volume(bytes, 'pat0001', { imageSize: SIZE, threshold: 0.5, minObjectSize: 50 });
      await writeLabelsLike(join(work, 'pat0001_seg.nii.gz'), header, v.labels);
      runs.push((performance.now() - t) / 1000);
      shape = v.shape;
      tumour = v.tumor_voxels;
    }
    return {
      file: VOLUME,
      preset: 'small',
      image_size: SIZE,
      shape,
      inference_threads: 1,
      kernel_threads: cores,
      seconds_per_volume: round(percentile(runs, 0.5), 2),
      runs_s: runs.map((x) => round(x, 2)),
      tumor_voxels: tumour,
    };
  } finally {
    await pool.close();
  }
}

export interface DemoBenchResult {
  bench: 'demo';
  presets: PresetResult[];
  preprocess: { p50_ms: number; p95_ms: number; runs: number };
  torch: { available: boolean; version: string | null; threads: number; note: string | null };
  volume: VolumeBench;
  [key: string]: unknown;
}

export async function runDemoBench(): Promise<DemoBenchResult> {
  const started = performance.now();
  const engine = env().demoEngine;
  // The checkpoints are written from this thread; tfjs's cpu backend is enough to create and save a model.
  await tf.setBackend('cpu');
  const work = await mkdtemp(join(tmpdir(), 'slicewise-bench-demo-'));
  try {
    const load_start = os.loadavg().map((l) => round(l, 2));
    const bytes = new Uint8Array(await readFile(join(fixturesRoot(), IMAGE)));
    const name = IMAGE.split('/').pop()!;
    const preprocess = await benchPreprocess(bytes);
    const t = torchAvailable();
    const presets: PresetResult[] = [];
    for (const preset of ['small', 'medium'] as const) {
      const torch1 = t.ok ? torchForward(preset, 1) : null;
      const m = await benchPreset(preset, work, bytes, name, t.ok ? () => torchForward(preset) : null);
      const torchRounds = m.rounds.map((r) => r.torch_forward_ms).filter((v): v is number => v !== null);
      const torch = torchRounds.length ? round(percentile(torchRounds, 0.5)) : null;
      // Each round's ratio against the PyTorch run just before it; their median.
      const roundRatios = m.rounds.filter((r) => r.torch_forward_ms !== null).map((r) => r.our_p50_ms / (r.torch_forward_ms! + r.preprocess_ms));
      const ratio1 = torch1 === null ? null : round(m.one_client.p50_ms / (torch1 + preprocess.p50_ms), 2);
      presets.push({
        ...m,
        torch_forward_ms: torch,
        torch_forward_1thread_ms: torch1,
        latency_ratio: roundRatios.length ? round(percentile(roundRatios, 0.5), 2) : null,
        latency_ratio_rounds: roundRatios.map((r) => round(r, 2)),
        latency_ratio_1thread: ratio1,
      });
    }
    const volume = await benchVolume(work);
    const load_end = os.loadavg().map((l) => round(l, 2));
    return {
      bench: 'demo',
      /** SLICEWISE_DEMO_ENGINE: what ran the model (each preset's `backend` has its version and threads). */
      engine,
      date: new Date().toISOString(),
      node: process.version,
      cores: availableParallelism(),
      /** 1, 5 and 15 minute load averages at the start and at the end: other work on a shared machine shows here. */
      loadavg: { start: load_start, end: load_end },
      image: { file: IMAGE, bytes: bytes.length, note: '630 x 630 JPEG, resized to 256 x 256 by kaggleImageToInput in the inference thread' },
      endpoint: 'POST /predict_multitask, multipart field file, defaults (gradcam on, segmentation when p(tumour) >= 0.3), HTTP/1.1 keep-alive on 127.0.0.1',
      statistic: 'p50 and p95 of client-side latency (request sent -> body read); rps = requests / wall time',
      goals: { latency_ratio_max: GOAL_LATENCY_RATIO, scaling_min: GOAL_SCALING },
      torch: { available: t.ok, version: t.version, threads: TORCH_THREADS, note: t.ok ? null : `PyTorch not installed: ratio skipped (${t.note})` },
      preprocess,
      presets,
      volume,
      bench_seconds: round((performance.now() - started) / 1000, 1),
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

const x = (v: number) => `${v.toFixed(2)}x`;
const met = (ok: boolean) => (ok ? 'met' : 'NOT met');

export function printDemoTables(r: DemoBenchResult): void {
  console.log(`\nPOST /predict_multitask, one ${r.image ? (r.image as { file: string }).file : ''} image at ${SIZE} x ${SIZE} (loopback HTTP, ${r.presets[0]?.inference_threads} inference threads)`);
  console.log(`engine: ${r.presets[0]?.backend ?? r.engine}\n`);
  printTable([
    ['preset', 'clients', 'requests', 'p50 ms', 'p95 ms', 'server p50 ms', 'req/s', 'cpu ms/req', 'cores busy'],
    ...r.presets.flatMap((p) =>
      [p.one_client, p.eight_clients, p.one_client_no_gradcam].map((l) => [
        `${p.preset}${l.gradcam ? '' : ', gradcam=false'}`,
        String(l.clients),
        String(l.requests),
        l.p50_ms.toFixed(1),
        l.p95_ms.toFixed(1),
        l.server_p50_ms.toFixed(1),
        l.rps.toFixed(2),
        l.cpu_ms_per_request.toFixed(0),
        l.cores_busy.toFixed(2),
      ]),
    ),
  ]);
  console.log('');
  const torchCell = (p: PresetResult) => (p.torch_forward_ms === null ? 'n/a' : p.torch_forward_ms.toFixed(1));
  printTable([
    ['preset', 'our p50 ms', 'PyTorch forward ms', '(1 thread)', 'our preprocessing ms', 'ratio (goal <= 1.5x)', '(vs 1 thread)', '8 / 1 client req/s (goal >= 1.7x)', 'machine speed-up ceiling'],
    ...r.presets.map((p) => [
      p.preset,
      p.one_client.p50_ms.toFixed(1),
      torchCell(p),
      p.torch_forward_1thread_ms === null ? 'n/a' : p.torch_forward_1thread_ms.toFixed(1),
      `${r.preprocess.p50_ms.toFixed(1)} (rounds ${p.rounds.map((x) => x.preprocess_ms.toFixed(0)).join(', ')})`,
      p.latency_ratio === null ? 'skipped' : `${x(p.latency_ratio)} ${met(p.latency_ratio <= GOAL_LATENCY_RATIO)} (rounds ${p.latency_ratio_rounds.map((v) => v.toFixed(2)).join(', ')})`,
      p.latency_ratio_1thread === null ? 'skipped' : x(p.latency_ratio_1thread),
      `${x(p.scaling)} ${met(p.scaling >= GOAL_SCALING)}`,
      p.speedup_ceiling.map((c) => x(c)).join(' / '),
    ]),
  ]);
  if (!r.torch.available) console.log(`\n${r.torch.note}`);
  else console.log(`\nPyTorch ${r.torch.version}, ${r.torch.threads} threads (and 1), batch 1 (../shared/anchors/torch_infer.py), run before each of our ${LATENCY_ROUNDS} 1-client rounds.`);
  console.log('ratio = our p50 / (PyTorch forward + our preprocessing p50), each measured in the round, then their median. machine speed-up ceiling: plain JavaScript work in one');
  console.log('thread per core vs one thread, just before the 1-client and just after the 8-client run (2.00x on an idle 2-core machine).');
  const la = r.loadavg as { start: number[]; end: number[] };
  console.log(`load average (1, 5, 15 min): ${la.start.join(', ')} at the start, ${la.end.join(', ')} at the end (${r.cores} cores)\n`);
  const v = r.volume;
  printTable([
    ['slicewise predict, one volume', 'shape', 'preset', 'threads', 's per volume (median)', 'runs s'],
    [v.file, v.shape.join(' x '), `${v.preset} @ ${v.image_size}`, `1 x ${v.kernel_threads} kernel`, v.seconds_per_volume.toFixed(2), v.runs_s.map((s) => s.toFixed(2)).join(', ')],
  ]);
}

async function main(): Promise<void> {
  const at = process.argv.indexOf('--engine');
  if (at >= 0) process.env.SLICEWISE_DEMO_ENGINE = process.argv[at + 1] ?? '';
  const result = await runDemoBench();
  printDemoTables(result);
  await writeResult(resolve(here, 'results', demoResultFile(result.engine as string)), result);
}

/** The results file of a run: the default engine's figures in demo.json, tfjs's beside them (the figures before ONNX Runtime). */
export function demoResultFile(engine: string): string {
  return engine === 'onnx' ? 'demo.json' : `demo-${engine}.json`;
}

const invoked = process.argv[1] ? pathToFileURL(realpathSync(process.argv[1])).href : '';
if (invoked === import.meta.url) {
  main().catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}
