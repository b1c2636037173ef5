/**
 * Every environment variable SliceWise reads, declared once: its name, default and effect. Code asks `env()`
 * for the parsed values instead of reading process.env itself, so a typo'd value fails with the variable's name
 * and the README's table (checked by a test) cannot drift from what the code reads.
 *
 * Read on every call, not cached: tests and the CLI set variables at run time, and parsing a dozen strings is
 * free next to anything that consults them.
 */
import { delimiter, resolve } from 'node:path';
import { SliceWiseError } from './lib/errors.ts';
import { SYNTH_LIMITS } from './synth/limits.ts';

interface Knob<T> {
  name: string;
  /** As the README shows it. */
  default: string;
  effect: string;
  parse(raw: string | undefined, name: string): T;
}

class EnvError extends SliceWiseError {
  constructor(name: string, raw: string, expected: string) {
    super(`environment variable ${name}=${raw} is not ${expected}`, { status: 400, code: 'bad_env', details: { name, expected } });
    this.name = 'EnvError';
  }
}

function text(): (raw: string | undefined) => string | undefined;
function text(fallback: string): (raw: string | undefined) => string;
function text(fallback?: string) {
  return (raw: string | undefined) => (raw?.trim() ? raw.trim() : fallback);
}
function positiveInt(): (raw: string | undefined, name: string) => number | undefined;
function positiveInt(fallback: number): (raw: string | undefined, name: string) => number;
function positiveInt(fallback?: number) {
  return (raw: string | undefined, name: string) => {
    if (!raw?.trim()) return fallback;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 1) throw new EnvError(name, raw, 'a positive integer');
    return n;
  };
}
/** A positive integer no larger than `max`, which `why` explains (a value above it would be a promise not kept). */
function positiveIntUpTo(fallback: number, max: number, why: string) {
  return (raw: string | undefined, name: string): number => {
    const n = positiveInt(fallback)(raw, name);
    if (n > max) throw new EnvError(name, raw!, `a positive integer up to ${max} (${why})`);
    return n;
  };
}
const flag = (raw: string | undefined, name: string) => {
  if (!raw?.trim()) return false;
  if (raw === '1' || raw === 'true') return true;
  if (raw === '0' || raw === 'false') return false;
  throw new EnvError(name, raw, '1 or 0');
};
/** A byte count: digits with an optional binary suffix K, M, G or T (`64M`, `100G`). */
function byteSize(fallback: number) {
  return (raw: string | undefined, name: string): number => {
    if (!raw?.trim()) return fallback;
    const m = /^(\d+)\s*([KMGT]?)i?B?$/i.exec(raw.trim());
    const n = m ? Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()) : NaN;
    if (!Number.isSafeInteger(n) || n < 1) throw new EnvError(name, raw, 'a byte count (e.g. 1048576, 64M, 100G)');
    return n;
  };
}
/** Folders separated by the platform's path delimiter (`:`), made absolute; empty parts are ignored. */
const folders = (raw: string | undefined): string[] =>
  (raw ?? '')
    .split(delimiter)
    .map((p) => p.trim())
    .filter(Boolean)
    .map((p) => resolve(p));
const oneOf =
  <const T extends string>(choices: readonly T[]) =>
  (raw: string | undefined, name: string): T | undefined => {
    const v = raw?.trim().toLowerCase();
    if (!v) return undefined;
    if (!(choices as readonly string[]).includes(v)) throw new EnvError(name, raw!, `one of ${choices.join(', ')}`);
    return v as T;
  };

function knob<T>(name: string, def: string, effect: string, parse: (raw: string | undefined, name: string) => T): Knob<T> {
  return { name, default: def, effect, parse };
}

export const ENV_KNOBS = {
  redisUrl: knob('REDIS_URL', 'none: `slicewise pipeline` starts a private redis-server', 'the shared Redis every process of a deployment uses', text()),
  databaseUrl: knob('DATABASE_URL', 'none: embedded PGlite under the data dir', 'the shared Postgres (`postgres://...`)', text()),
  logLevel: knob('LOG_LEVEL', '`info` (`warn` for `slicewise pipeline`)', 'pino log level', text()),
  logSilent: knob('SLICEWISE_LOG', 'unset', '`silent` turns every log line off (tests)', (raw) => raw?.trim() === 'silent'),
  dataDir: knob('SLICEWISE_DATA_DIR', '`data`', 'default `--data-dir` of `slicewise api` and `slicewise worker`', text()),
  port: knob('PORT', '`8787`', 'default `--port` of `slicewise api`', positiveInt()),
  host: knob('HOST', '`127.0.0.1`', 'default `--host` of `slicewise api`', text()),
  tokensFile: knob('SLICEWISE_TOKENS_FILE', 'unset', 'the API\'s tokens file (`slicewise token create` writes it): with tokens, every route but `/healthz` needs one; without, `slicewise api` binds loopback only', text()),
  tokens: knob('SLICEWISE_TOKENS', 'unset', 'more token entries, `name:role:sha256-hex` separated by commas (hashes, not tokens: for containers)', text()),
  queuePrefix: knob('SLICEWISE_QUEUE_PREFIX', '`slicewise`', 'BullMQ key prefix: deployments sharing one Redis keep apart with it', text()),
  configDir: knob('SLICEWISE_CONFIG_DIR', 'the repository\'s `configs/`', 'where base.yaml, modes/ and stages/ are read', text()),
  noInstall: knob('SLICEWISE_NO_INSTALL', '`0`', '`1`: never install redis-server with apt-get', flag),
  trainPool: knob('SLICEWISE_TRAIN_POOL', '`1`', 'training jobs running at once across all train workers (the GPU pool)', positiveInt(1)),
  lockMs: knob('SLICEWISE_LOCK_MS', '`60000`', 'lock of a preprocess/download/split job; a killed worker\'s job is taken over (stalled) after at most this', positiveInt(60_000)),
  shardRowsMs: knob('SLICEWISE_SHARD_ROWS_MS', '`250`', 'how long a finished patient shard\'s row may wait to be written with others (a run\'s per-patient status lags by as much; the coordinator writes every row once its shards are done)', positiveInt(250)),
  eventsMaxLen: knob('SLICEWISE_EVENTS_MAX_LEN', '`1000`', 'entries kept in each queue\'s BullMQ event stream (it feeds live listeners; the history lives in Postgres)', positiveInt(1000)),
  trainLockMs: knob('SLICEWISE_TRAIN_LOCK_MS', '`120000`', 'lock of a training job; a killed train worker\'s job is taken over after this', positiveInt(120_000)),
  redisDeadlineMs: knob('SLICEWISE_REDIS_DEADLINE_MS', '`60000`', 'a `slicewise pipeline` run whose Redis stays unreachable this long fails, with that reason; an outage is logged every 10 s (a third of this when shorter)', positiveInt(60_000)),
  watchdogMs: knob('SLICEWISE_WATCHDOG_MS', '`30000`', 'how often workers, the API and `slicewise pipeline` check that each unfinished run\'s jobs still exist in Redis; a run missing them twice in a row fails', positiveInt(30_000)),
  trainReplicas: knob('SLICEWISE_TRAIN_REPLICAS', 'min(cores, 2) on wasm/cpu, 1 on tensorflow', 'data-parallel training replicas per stage', positiveInt()),
  tfBackend: knob('SLICEWISE_TF_BACKEND', 'the first that loads: tensorflow, wasm, cpu', 'forces the tfjs backend', oneOf(['tensorflow', 'wasm', 'cpu'] as const)),
  wasmThreads: knob('SLICEWISE_WASM_THREADS', 'CPU count (at most 8; one share per replica)', 'threads of the wasm convolution kernels', positiveInt()),
  demoEngine: knob('SLICEWISE_DEMO_ENGINE', '`onnx`', 'what runs the model for the demo and `slicewise predict`: `onnx` (ONNX Runtime, the onnxruntime-node package) or `tfjs` (the training engine)', (raw, name) => oneOf(['onnx', 'tfjs'] as const)(raw, name) ?? 'onnx'),
  demoKernelThreads: knob('SLICEWISE_DEMO_KERNEL_THREADS', 'CPU count', 'threads (ONNX Runtime intra-op threads, or tfjs kernel threads) each demo inference thread uses while it is the only one computing; `1`: one core per request (more throughput gain from concurrency, slower lone requests)', positiveInt()),
  wasmNoSimdKernels: knob('SLICEWISE_WASM_NO_SIMD_KERNELS', '`0`', '`1`: use the engine\'s portable kernels instead of its SIMD ones (for comparison)', flag),
  noColor: knob('NO_COLOR', 'unset', 'set: no colours in the CLI\'s output', (raw) => raw !== undefined && raw !== ''),
  kaggleUsername: knob('KAGGLE_USERNAME', 'unset', 'Kaggle API user, with KAGGLE_KEY (only the download workers need them); else ~/.kaggle/kaggle.json', text()),
  kaggleKey: knob('KAGGLE_KEY', 'unset', 'Kaggle API key: a secret, never written to job data, logs, Bull Board or the database', text()),
  kaggleConfigDir: knob('KAGGLE_CONFIG_DIR', '`~/.kaggle`', 'where kaggle.json is looked for', text()),
  kaggleApiBase: knob('KAGGLE_API_BASE', '`https://www.kaggle.com/api/v1`', 'the Kaggle API (tests point it at a local server)', text('https://www.kaggle.com/api/v1')),
  fixtures: knob('SLICEWISE_FIXTURES', '`../shared/fixtures`', 'real fixtures read by tests, `npm run bench` and `npm run check:real`', text()),
  allowedRoots: knob('SLICEWISE_ALLOWED_ROOTS', 'none: the data dir only', 'folders, `:`-separated, that `path:` sources of runs may read besides the data dir (checked after realpath, by the API and again by the download workers)', folders),
  allowPrivateNetworks: knob('SLICEWISE_ALLOW_PRIVATE_NETWORKS', '`0`', '`1`: downloads may reach loopback, private, link-local and other non-public addresses (tests, an in-house mirror)', flag),
  extractMaxBytes: knob('SLICEWISE_EXTRACT_MAX_BYTES', '`200G`', 'most bytes one archive may extract to (`K`/`M`/`G`/`T` suffixes); also the largest download', byteSize(200 * 1024 ** 3)),
  extractMaxRatio: knob('SLICEWISE_EXTRACT_MAX_RATIO', '`100`', 'most bytes extracted per archive byte, once past the first 256 MiB (real BraTS archives expand about 2-10x)', positiveInt(100)),
  maxPatients: knob('SLICEWISE_MAX_PATIENTS', '`5000`', 'most BraTS patients one run may preprocess (`data.max_patients`, `synthetic:N`, patients found)', positiveInt(5000)),
  maxKaggleImages: knob('SLICEWISE_MAX_KAGGLE_IMAGES', `\`${SYNTH_LIMITS.kaggleImagesPerClass}\``, `most synthetic Kaggle images per class one run may generate (\`synthetic:N\` of the Kaggle source); at most ${SYNTH_LIMITS.kaggleImagesPerClass}, what the generator makes`, positiveIntUpTo(SYNTH_LIMITS.kaggleImagesPerClass, SYNTH_LIMITS.kaggleImagesPerClass, 'what the synthetic generator makes per class')),
  fuzzScale: knob('SLICEWISE_FUZZ_SCALE', '`1`', 'multiplies the case counts of the reader fuzz pass (test/fuzz.test.ts, about 3,400 cases at 1)', positiveInt(1)),
  fuzzSeed: knob('SLICEWISE_FUZZ_SEED', '`1`', 'seed of the reader fuzz pass: a failure names its seed and case number', positiveInt(1)),
  benchCpu: knob('SLICEWISE_BENCH_CPU', '`1`', '`0`: `npm run bench` skips the (slow) tfjs cpu backend baseline', (raw, name) => raw?.trim() ? flag(raw, name) : true),
} as const;

type Knobs = typeof ENV_KNOBS;
export type EnvSettings = { [K in keyof Knobs]: ReturnType<Knobs[K]['parse']> };

/** The parsed environment (see ENV_KNOBS). Throws an error naming the variable when a value is malformed. */
export function env(source: NodeJS.ProcessEnv = process.env): EnvSettings {
  const out: Record<string, unknown> = {};
  for (const [key, k] of Object.entries(ENV_KNOBS)) out[key] = (k as Knob<unknown>).parse(source[k.name], k.name);
  return out as EnvSettings;
}
