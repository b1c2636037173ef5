import cliProgress from 'cli-progress';
import type { AppContext } from '../context.ts';
import { getRunDetail } from '../runs/service.ts';
import { env } from '../env.ts';

const COLOURS = { blue: 34, green: 32, yellow: 33, red: 31, dim: 2 } as const;
type Colour = keyof typeof COLOURS;

export function painter(stream: NodeJS.WriteStream = process.stdout) {
  const on = stream.isTTY && !env().noColor;
  return (c: Colour, s: string) => (on ? `\x1b[${COLOURS[c]}m${s}\x1b[0m` : s);
}

type Detail = Awaited<ReturnType<typeof getRunDetail>>;

/** How long a finished run's finalize may take to settle its other branches before we stop waiting. */
const FINALIZE_WAIT_MS = 60_000;

function fmtCounts(counts: Record<string, number>): string {
  const parts = Object.entries(counts)
    .filter(([k]) => k !== 'done' && k !== 'total')
    .map(([k, v]) => `${k}=${v}`);
  return parts.length ? ` (${parts.join(', ')})` : '';
}

/**
 * Follows a run until it ends, the way the original controller did: a coloured line per step event (blue
 * started, green done, yellow retrying, red failed) and a progress bar per step that counts shards.
 */
export async function followRun(ctx: AppContext, runId: string, { intervalMs = 400, out = process.stdout }: { intervalMs?: number; out?: NodeJS.WriteStream } = {}): Promise<Detail> {
  const paint = painter(out);
  const tty = !!out.isTTY;
  const bars = tty ? new cliProgress.MultiBar({ format: '  {step} [{bar}] {value}/{total} {unit}', hideCursor: true, clearOnComplete: true, stream: out }, cliProgress.Presets.shades_classic) : undefined;
  const barOf = new Map<string, cliProgress.SingleBar>();
  const seen = new Map<string, string>();
  const log = (line: string) => (bars ? bars.log(line + '\n') : out.write(line + '\n'));
  let lastPct = new Map<string, number>();
  let settledAt: number | undefined;
  for (;;) {
    const d = await getRunDetail(ctx, runId);
    for (const s of d.steps) {
      if (s.name === 'finalize') continue;
      const prev = seen.get(s.name);
      const key = `${s.status}|${s.attempts}|${s.error ?? ''}`;
      if (prev !== key) {
        seen.set(s.name, key);
        if (s.status === 'running' && s.error) log(paint('yellow', `! ${s.name}: attempt ${s.attempts} failed, retrying: ${s.error}`));
        else if (s.status === 'running') log(paint('blue', `> ${s.name} started${s.attempts > 1 ? ` (attempt ${s.attempts})` : ''}`));
        else if (s.status === 'success') log(paint('green', `✓ ${s.name} done in ${s.durationSeconds?.toFixed(1)} s${fmtCounts(s.counts)}`));
        else if (s.status === 'failed') log(paint('red', `✗ ${s.name} failed: ${s.error}`));
        else if (s.status === 'cancelled' || s.status === 'skipped') log(paint('dim', `- ${s.name} ${s.status}`));
      }
      const { done, total } = s.counts as { done?: number; total?: number };
      if (total && done !== undefined) {
        if (bars) {
          let bar = barOf.get(s.name);
          if (!bar && s.status === 'running') barOf.set(s.name, (bar = bars.create(total, done, { step: s.name.padEnd(24), unit: s.name === 'preprocess_brats' ? 'patients' : s.name.startsWith('train_') ? 'epochs' : 'items' })));
          bar?.setTotal(total);
          bar?.update(done);
          if (bar && s.status !== 'running') {
            bars.remove(bar);
            barOf.delete(s.name);
          }
        } else if (s.status === 'running') {
          // No terminal: a line every quarter, so CI logs show movement without a flood.
          const pct = Math.floor((4 * done) / total);
          if (pct > (lastPct.get(s.name) ?? -1)) {
            lastPct.set(s.name, pct);
            log(paint('dim', `  ${s.name}: ${done}/${total}`));
          }
        }
      }
    }
    if (d.status === 'succeeded' || d.status === 'failed' || d.status === 'cancelled') {
      // A run is failed as soon as one branch fails, while the others may still be settling; finalize closes
      // them all. Returning before it would write pipeline_results.json with steps still "running".
      const fin = d.steps.find((s) => s.name === 'finalize');
      const settling = fin && (fin.status === 'pending' || fin.status === 'running');
      settledAt ??= Date.now();
      if (!settling || Date.now() - settledAt > FINALIZE_WAIT_MS) {
        bars?.stop();
        return d;
      }
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
