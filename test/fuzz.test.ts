/**
 * A fuzz pass over the readers of untrusted input: the NIfTI reader (header, gzip, voxels) and the slicing that
 * follows it, a patient's folder end to end, the .npy reader and the JPEG/PNG decoder. Random bytes and mutated real
 * fixtures (bit flips, truncations, splices, header field lies), from a seeded PRNG: a failure names the target,
 * the seed and the case number, and `SLICEWISE_FUZZ_SEED` / the case range reproduce it.
 *
 * Each case must end with a decoded input whose outputs are finite, or with a SliceWiseError that says what is wrong
 * (naming the file where the reader has one): never a TypeError/RangeError from deep inside, a crashed process or a
 * hang. The cases run in a child process (test/helpers/fuzz-runner.ts) that reports each case before and after it
 * runs; synchronous code cannot be interrupted in-process, so a watchdog here kills a case that runs past
 * CASE_LIMIT_MS, records it, and starts a new child at the next case. A crash is recorded the same way.
 *
 * Case counts are sized for the default `npm test` on 2 cores; `SLICEWISE_FUZZ_SCALE=10` runs ten times as many.
 */
import { fork } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { env } from '../src/env.ts';
import type { CaseReport, ChildMessage, FuzzTarget } from './helpers/fuzz-runner.ts';
import { FIXTURES } from './helpers/services.ts';

const RUNNER = join(__dirname, 'helpers', 'fuzz-runner.ts');
const OUTPUT = join(__dirname, '..', 'test-output');
const { fuzzScale, fuzzSeed } = env();
/** A case slower than this is a hang: the watchdog kills it. */
const CASE_LIMIT_MS = 30_000;
/**
 * A case slower than this fails the test as too slow. The slowest legitimate ones (a whole real volume inflated)
 * take well under a second on a quiet machine and about 3 s on a 2-core machine under a load of 20.
 */
const SLOW_MS = 10_000;
/** The child's resident memory must stay under this: a header may not make a reader allocate what it says. */
const RSS_LIMIT_MB = 1500;

interface TargetResult {
  target: FuzzTarget;
  cases: number;
  reports: CaseReport[];
  /** Cases that killed the child (crash, abort, OOM) or hung past CASE_LIMIT_MS. */
  deaths: { i: number; what: string }[];
  peakRssMb: number;
  ms: number;
}

/** Runs cases [0, count) of a target in children, restarting after a case that kills or hangs one. */
async function fuzz(target: FuzzTarget, count: number, caseLimitMs = CASE_LIMIT_MS): Promise<TargetResult> {
  const t0 = Date.now();
  const result: TargetResult = { target, cases: count, reports: [], deaths: [], peakRssMb: 0, ms: 0 };
  let from = 0;
  while (from < count) {
    from = await new Promise<number>((resolve) => {
      const child = fork(RUNNER, [target, String(fuzzSeed), String(from), String(count), FIXTURES], {
        execArgv: ['--import', 'tsx', '--max-old-space-size=1024'],
        stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      });
      let stderr = '';
      child.stderr!.on('data', (d) => (stderr = (stderr + d).slice(-2000)));
      let current = -1;
      let next = from;
      let timer: NodeJS.Timeout | undefined;
      const arm = (ms: number) => {
        clearTimeout(timer);
        timer = setTimeout(() => {
          result.deaths.push({ i: current, what: `no answer after ${ms} ms (hang)` });
          child.kill('SIGKILL');
        }, ms);
      };
      arm(60_000); // the corpus is built first
      child.on('message', (m: ChildMessage) => {
        if (m.type === 'start') {
          current = m.i;
          arm(caseLimitMs);
        } else if (m.type === 'done') {
          const { type: _t, rssMb, ...report } = m;
          result.reports.push(report);
          result.peakRssMb = Math.max(result.peakRssMb, rssMb);
          current = -1;
          next = m.i + 1;
        }
      });
      child.on('exit', (code, signal) => {
        clearTimeout(timer);
        if (next < count && (code !== 0 || signal)) {
          const hung = result.deaths.at(-1)?.i === current && current >= 0;
          if (!hung) result.deaths.push({ i: current, what: `child exited (code ${code}, signal ${signal}): ${stderr.trim().split('\n').slice(-5).join(' | ')}` });
          resolve(current >= 0 ? current + 1 : count);
        } else {
          resolve(count);
        }
      });
    });
  }
  result.ms = Date.now() - t0;
  return result;
}

const results: TargetResult[] = [];

function summarise(r: TargetResult): string {
  const by = (s: CaseReport['status']) => r.reports.filter((x) => x.status === s).length;
  const slowest = [...r.reports].sort((a, b) => b.ms - a.ms).slice(0, 3);
  const distinct = new Set(r.reports.filter((x) => x.message).map((x) => x.message)).size;
  return (
    `${r.target}: ${r.reports.length}/${r.cases} cases in ${(r.ms / 1000).toFixed(1)} s (ok ${by('ok')}, rejected ${by('rejected')}, bad ${by('bad')}, ` +
    `deaths ${r.deaths.length}), ${distinct} distinct messages, peak RSS ${r.peakRssMb} MB, slowest ${slowest.map((s) => `#${s.i} ${s.ms.toFixed(0)} ms`).join(', ')}`
  );
}

/** Every case of a target must have ended well; the failures are listed with what reproduces them. */
function expectClean(r: TargetResult): void {
  const failures = [
    ...r.deaths.map((d) => `case ${d.i}: ${d.what}`),
    ...r.reports.filter((x) => x.status === 'bad').map((x) => `case ${x.i}: ${x.message} [${x.desc}]`),
    ...r.reports.filter((x) => x.ms > SLOW_MS).map((x) => `case ${x.i}: slow, ${x.ms.toFixed(0)} ms [${x.desc}]`),
  ];
  expect(failures, `${r.target}, seed ${fuzzSeed} (SLICEWISE_FUZZ_SEED):\n${failures.slice(0, 30).join('\n')}`).toEqual([]);
  expect(r.reports.length).toBe(r.cases);
  expect(r.peakRssMb).toBeLessThan(RSS_LIMIT_MB);
}

afterAll(() => {
  if (results.length === 0) return;
  const total = results.reduce((a, r) => a + r.reports.length, 0);
  const messages = new Set(results.flatMap((r) => r.reports.filter((x) => x.message).map((x) => `${r.target}: ${x.message}`)));
  const summary = `fuzz, seed ${fuzzSeed}: ${total} cases, ${messages.size} distinct messages\n${results.map(summarise).join('\n')}`;
  console.log(summary);
  // The messages themselves, with how often each occurred, for a reader judging whether they say what is wrong.
  const counts: Record<string, Record<string, number>> = {};
  for (const r of results) {
    const c = (counts[r.target] = {} as Record<string, number>);
    for (const x of r.reports) if (x.message) c[x.message] = (c[x.message] ?? 0) + 1;
  }
  mkdirSync(OUTPUT, { recursive: true });
  writeFileSync(join(OUTPUT, 'fuzz-report.json'), JSON.stringify({ seed: fuzzSeed, summary: summary.split('\n'), messages: counts }, null, 2) + '\n');
});

describe('fuzz harness', () => {
  it('records a case that hangs in synchronous code or crashes the process, and goes on with the next one', async () => {
    // Case 0 passes, 1 hangs, 2 crashes (two child processes: each restart costs a start-up).
    const r = await fuzz('harness', 3, 1500);
    expect(r.reports.map((x) => [x.i, x.status])).toEqual([[0, 'ok']]);
    expect(r.deaths.map((d) => d.i)).toEqual([1, 2]);
    expect(r.deaths[0]!.what).toBe('no answer after 1500 ms (hang)');
    expect(r.deaths[1]!.what).toMatch(/^child exited \(code 1, signal null\): .*harness: crash in case 2/);
  }, 60_000);
});

describe('fuzz: readers of untrusted input', () => {
  const cases: [FuzzTarget, number][] = [
    ['nifti', 1500],
    ['nifti-real', 12],
    ['patient', 160],
    ['npy', 1200],
    ['image', 500],
  ];
  for (const [target, n] of cases) {
    it(`${target}: ${n * fuzzScale} cases end in a decoded input or a clear error, none crashes or hangs`, async () => {
      const r = await fuzz(target, n * fuzzScale);
      results.push(r);
      // Both outcomes occur: a pass that rejects everything (or nothing) would test little.
      expect(r.reports.some((x) => x.status === 'rejected')).toBe(true);
      if (target !== 'nifti-real') expect(r.reports.some((x) => x.status === 'ok')).toBe(true);
      expectClean(r);
    }, 600_000);
  }
});
