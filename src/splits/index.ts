import { deriveSeed, mulberry32, shuffled } from '../lib/random.ts';

export type SplitName = 'train' | 'val' | 'test';
export interface SplitRatios {
  train: number;
  val: number;
  test: number;
}
export type Splits<T> = Record<SplitName, T[]>;

/**
 * The original's sizes: train = floor(train * N), val = floor(val * N), test = the rest. One change: with three
 * or more items, val and test each get at least one (taken from test while it has two, else from train),
 * because an empty validation set silently disables model selection and an empty test set reports nothing.
 */
export function splitSizes(n: number, r: SplitRatios): Record<SplitName, number> {
  let train = Math.floor(r.train * n);
  let val = Math.floor(r.val * n);
  if (n >= 3) {
    if (val === 0 && r.val > 0) {
      // Taken from test while it has two or more, so training keeps its share.
      if (n - train >= 2) val = 1;
      else {
        val = 1;
        train -= 1;
      }
    }
    if (n - train - val === 0 && r.test > 0) train -= 1;
  }
  train = Math.max(train, 0);
  return { train, val, test: n - train - val };
}

function cut<T>(order: T[], r: SplitRatios): Splits<T> {
  const s = splitSizes(order.length, r);
  return { train: order.slice(0, s.train), val: order.slice(s.train, s.train + s.val), test: order.slice(s.train + s.val) };
}

/** Patient-level split: sorted ids shuffled with the seed, so the result depends on the set of ids alone. */
export function splitPatients(ids: readonly string[], ratios: SplitRatios, seed: number): Splits<string> {
  const unique = [...new Set(ids)].sort();
  return cut(shuffled(unique, mulberry32(seed)), ratios);
}

/** Stratified split: each class is split on its own with the same ratios, then the parts are joined. */
export function splitStratified<T>(items: readonly T[], label: (t: T) => number, key: (t: T) => string, ratios: SplitRatios, seed: number): Splits<T> {
  const byClass = new Map<number, T[]>();
  for (const it of items) {
    const l = label(it);
    if (!byClass.has(l)) byClass.set(l, []);
    byClass.get(l)!.push(it);
  }
  const out: Splits<T> = { train: [], val: [], test: [] };
  for (const l of [...byClass.keys()].sort((a, b) => a - b)) {
    const members = byClass.get(l)!.slice().sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
    const part = cut(shuffled(members, mulberry32(deriveSeed(seed, `class-${l}`))), ratios);
    for (const s of ['train', 'val', 'test'] as const) out[s].push(...part[s]);
  }
  return out;
}

/** Picks the run's patient subset: seeded, so baseline's 30% is the same 30% on every run with that seed. */
export function choosePatients(ids: readonly string[], n: number, seed: number): string[] {
  if (n >= ids.length) return [...ids].sort();
  return shuffled([...ids].sort(), mulberry32(deriveSeed(seed, 'subset'))).slice(0, n).sort();
}
