/**
 * What the run page and the report endpoints read: per-epoch metric series, the evaluation reports, and the
 * artifacts a run recorded (with the one lookup that decides whether a file may be served). No HTTP code.
 */
import { open, realpath } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { basename, extname, isAbsolute, relative, resolve, sep } from 'node:path';
import { and, asc, eq } from 'drizzle-orm';
import { z } from 'zod';
import type { AppContext } from '../context.ts';
import { artifacts, evaluations, metrics, steps, type RunRow } from '../db/schema.ts';
import type { MultitaskEvaluation, PhaseComparison } from '../evaluation/report.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { jobId } from '../queues/names.ts';
import { byStepOrder } from './modes.ts';
import { RunNotFoundError } from './service.ts';
import { getRunRow } from './store.ts';

async function requireRun(ctx: AppContext, runId: string): Promise<RunRow> {
  const run = await getRunRow(ctx.db, runId);
  if (!run) throw new RunNotFoundError(runId);
  return run;
}

// ------------------------------------------------------------------------------------------------------------
// Metrics
// ------------------------------------------------------------------------------------------------------------

export interface StepSeries {
  /** The epochs the step recorded, ascending. */
  epochs: number[];
  /** One value per entry of `epochs` for each metric name; null where that epoch has no value for it. */
  series: Record<string, (number | null)[]>;
  /** Figures recorded outside any epoch (epoch -1 in `metrics`, e.g. a test-set figure), if any. */
  final?: Record<string, number>;
}

export interface RunMetrics {
  runId: string;
  /** Per step, in the steps' display order. */
  steps: Record<string, StepSeries>;
}

/** Every metric a run recorded, as per-epoch series per step: what the run page's training curves plot. */
export async function getMetricSeries(ctx: AppContext, runId: string): Promise<RunMetrics> {
  await requireRun(ctx, runId);
  const rows = await ctx.db.select().from(metrics).where(eq(metrics.runId, runId)).orderBy(asc(metrics.step), asc(metrics.epoch), asc(metrics.name));
  const byStep = new Map<string, typeof rows>();
  for (const r of rows) byStep.set(r.step, [...(byStep.get(r.step) ?? []), r]);
  const out: Record<string, StepSeries> = {};
  for (const { name: step } of byStepOrder([...byStep.keys()].map((name) => ({ name })))) {
    const stepRows = byStep.get(step)!;
    const epochs = [...new Set(stepRows.filter((r) => r.epoch >= 0).map((r) => r.epoch))].sort((a, b) => a - b);
    const at = new Map(epochs.map((e, i) => [e, i]));
    const series: Record<string, (number | null)[]> = {};
    const final: Record<string, number> = {};
    for (const r of stepRows) {
      if (r.epoch < 0) {
        final[r.name] = r.value;
        continue;
      }
      (series[r.name] ??= new Array<number | null>(epochs.length).fill(null))[at.get(r.epoch)!] = r.value;
    }
    out[step] = { epochs, series, ...(Object.keys(final).length ? { final } : {}) };
  }
  return { runId, steps: out };
}

// ------------------------------------------------------------------------------------------------------------
// Evaluation
// ------------------------------------------------------------------------------------------------------------

export interface RunEvaluation {
  multitask: MultitaskEvaluation | null;
  phase_comparison: PhaseComparison | null;
}

/** The run's evaluation reports as stored in `evaluations` (null until the step that writes each has run). */
export async function getEvaluation(ctx: AppContext, runId: string): Promise<RunEvaluation> {
  await requireRun(ctx, runId);
  const rows = await ctx.db.select().from(evaluations).where(eq(evaluations.runId, runId));
  const report = (name: string) => rows.find((r) => r.name === name)?.report ?? null;
  return { multitask: report('multitask') as MultitaskEvaluation | null, phase_comparison: report('phase_comparison') as PhaseComparison | null };
}

// ------------------------------------------------------------------------------------------------------------
// Artifacts
// ------------------------------------------------------------------------------------------------------------

/**
 * An artifact's identifier in URLs: its path relative to the run's data dir, with '/' separators, e.g.
 * `runs/<run>/visualizations/multitask_gradcam/gradcam_000_brats_pred1_true1.png` or
 * `checkpoints/<run>/joint/best/weights.bin`. Null for a recorded path outside the data dir (never served).
 */
export function artifactId(dataDir: string, path: string): string | null {
  const rel = relative(resolve(dataDir), resolve(path));
  if (!rel || rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)) return null;
  return rel.split(sep).join('/');
}

/** The URL that downloads an artifact (each segment encoded, the slashes kept). */
export function artifactUrl(runId: string, id: string): string {
  return `/runs/${encodeURIComponent(runId)}/artifacts/${id.split('/').map(encodeURIComponent).join('/')}`;
}

/** An identifier as it arrives in a URL: relative, no '..' or '.' segment, no backslash or NUL. */
export const ArtifactIdSchema = z
  .string()
  .min(1)
  .max(1000)
  .refine((s) => !s.startsWith('/') && !/^[A-Za-z]:/.test(s), 'must be relative to the run\'s data dir')
  .refine((s) => !/[\\\0]/.test(s), 'must not contain a backslash or NUL')
  .refine((s) => s.split('/').every((seg) => seg !== '..' && seg !== '.' && seg !== ''), "must not contain '.', '..' or empty segments");

/** The files a run recorded, each with its identifier and download URL (`id`/`url` null when it lies outside the data dir). */
export async function listRunArtifacts(ctx: AppContext, runId: string) {
  const run = await requireRun(ctx, runId);
  const rows = await ctx.db.select().from(artifacts).where(eq(artifacts.runId, runId)).orderBy(asc(artifacts.step), asc(artifacts.kind), asc(artifacts.path));
  return rows.map((a) => {
    const id = artifactId(run.dataDir, a.path);
    return { ...a, id, url: id == null ? null : artifactUrl(runId, id) };
  });
}

export class ArtifactNotFoundError extends SliceWiseError {
  constructor(runId: string, id: string, why: string) {
    super(`artifact ${id} of run ${runId}: ${why}`, { status: 404, code: 'artifact_not_found' });
    this.name = 'ArtifactNotFoundError';
  }
}

const CONTENT_TYPES: Record<string, string> = {
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.json': 'application/json',
  '.txt': 'text/plain; charset=utf-8',
  '.log': 'text/plain; charset=utf-8',
};

export interface OpenArtifact {
  /** Open on the resolved file: stream it with `file.createReadStream()` (which closes it at the end). */
  file: FileHandle;
  fileName: string;
  bytes: number;
  sha256: string | null;
  contentType: string;
  /** Images and JSON are shown in the browser; anything else is a download. */
  inline: boolean;
}

/**
 * Opens an artifact for download. Served only when the identifier names a file recorded for this run in
 * `artifacts`, and that file, with every symlink resolved, is a regular file inside the run's data dir. The file
 * is opened on its resolved path and checked through the open handle, so a swap after the check serves nothing
 * else. The recorded sha256 is returned with it; a file whose size no longer matches the record is refused.
 */
export async function openArtifact(ctx: AppContext, runId: string, rawId: string): Promise<OpenArtifact> {
  const id = ArtifactIdSchema.parse(rawId);
  const run = await requireRun(ctx, runId);
  const path = resolve(run.dataDir, ...id.split('/'));
  const [row] = await ctx.db
    .select()
    .from(artifacts)
    .where(and(eq(artifacts.runId, runId), eq(artifacts.path, path)));
  if (!row) throw new ArtifactNotFoundError(runId, id, 'no such artifact recorded for this run');

  let real: string;
  let root: string;
  try {
    [real, root] = await Promise.all([realpath(path), realpath(run.dataDir)]);
  } catch {
    throw new ArtifactNotFoundError(runId, id, 'the recorded file is gone');
  }
  if (!real.startsWith(root + sep)) throw new ArtifactNotFoundError(runId, id, "the recorded file resolves outside the run's data dir; not served");
  const file = await open(real, 'r').catch(() => {
    throw new ArtifactNotFoundError(runId, id, 'the recorded file cannot be opened');
  });
  try {
    const st = await file.stat();
    if (!st.isFile()) throw new ArtifactNotFoundError(runId, id, 'not a regular file');
    if (row.bytes != null && st.size !== row.bytes) {
      throw new SliceWiseError(`artifact ${id} of run ${runId} changed since it was recorded (${row.bytes} bytes recorded, ${st.size} on disk)`, { status: 409, code: 'artifact_changed' });
    }
    const ext = extname(real).toLowerCase();
    const contentType = CONTENT_TYPES[ext] ?? 'application/octet-stream';
    return { file, fileName: basename(real), bytes: st.size, sha256: row.sha256, contentType, inline: ext in CONTENT_TYPES };
  } catch (err) {
    await file.close();
    throw err;
  }
}

// ------------------------------------------------------------------------------------------------------------
// The run page's links into Bull Board
// ------------------------------------------------------------------------------------------------------------

/**
 * Where each step's job is in Bull Board (`<base>/queue/<queue>/<job id>`), and the run's queues. Job ids are
 * the ones the flow gives (`<run>.<step>`); the row's own job id is used once a worker has recorded it.
 */
export async function bullBoardLinks(ctx: AppContext, runId: string, base: string): Promise<{ steps: Record<string, string>; queues: Record<string, string> }> {
  await requireRun(ctx, runId);
  const rows = byStepOrder(await ctx.db.select({ name: steps.name, queue: steps.queue, jobId: steps.jobId }).from(steps).where(eq(steps.runId, runId)));
  const queueUrl = (q: string) => `${base}/queue/${encodeURIComponent(q)}`;
  const stepLinks: Record<string, string> = {};
  const queues: Record<string, string> = {};
  for (const s of rows) {
    stepLinks[s.name] = `${queueUrl(s.queue)}/${encodeURIComponent(s.jobId ?? jobId(runId, s.name))}`;
    queues[s.queue] = queueUrl(s.queue);
  }
  // The per-patient jobs of preprocess_brats are on the preprocess queue.
  if (rows.some((s) => s.name === 'preprocess_brats')) queues.preprocess = queueUrl('preprocess');
  return { steps: stepLinks, queues };
}
