/**
 * Console tables, JSON files and medians of the benchmarks. Exported (tfjs-wasm-training/bench/table) so that the
 * benchmarks of an application built on this package print alike and print through one implementation.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';

/**
 * Prints rows[0] as the header with a rule under it, then the other rows. The first `leftColumns` columns (labels)
 * are left-aligned, the rest (figures) right-aligned so that digits line up.
 */
export function printTable(rows: string[][], leftColumns = 1): void {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  for (const [k, r] of rows.entries()) {
    console.log(r.map((cell, i) => (i < leftColumns ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  '));
    if (k === 0) console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  }
}

/** Writes a benchmark's result as JSON, creating its folder, and says where. */
export async function writeResult(file: string, result: object): Promise<void> {
  await mkdir(dirname(file), { recursive: true });
  await writeFile(file, JSON.stringify(result, null, 2) + '\n');
  console.log(`\nwritten ${file}`);
}

/** The median of a non-empty list (the mean of the middle two for an even count). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
