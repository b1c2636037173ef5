import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { env, ENV_KNOBS } from '../src/env.ts';

const ROOT = join(import.meta.dirname, '..');

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? sources(p) : /\.(ts|mjs)$/.test(n) ? [p] : [];
  });
}

describe('environment variables', () => {
  it('parses defaults, and names the variable when a value is malformed', () => {
    const e = env({});
    expect(e.trainPool).toBe(1);
    expect(e.trainLockMs).toBe(120_000);
    expect(e.redisUrl).toBeUndefined();
    expect(e.noInstall).toBe(false);
    expect(env({ SLICEWISE_TRAIN_REPLICAS: '3', SLICEWISE_NO_INSTALL: '1', SLICEWISE_TF_BACKEND: 'WASM' })).toMatchObject({ trainReplicas: 3, noInstall: true, tfBackend: 'wasm' });
    expect(() => env({ SLICEWISE_TRAIN_POOL: 'two' })).toThrow(/SLICEWISE_TRAIN_POOL=two is not a positive integer/);
    expect(() => env({ SLICEWISE_TF_BACKEND: 'gpu' })).toThrow(/SLICEWISE_TF_BACKEND=gpu is not one of tensorflow, wasm, cpu/);
    expect(() => env({ SLICEWISE_NO_INSTALL: 'yes' })).toThrow(/SLICEWISE_NO_INSTALL/);
    // A cap above what the generator makes would promise what no run can do.
    expect(env({}).maxKaggleImages).toBe(999);
    expect(() => env({ SLICEWISE_MAX_KAGGLE_IMAGES: '5000' })).toThrow(/SLICEWISE_MAX_KAGGLE_IMAGES=5000 is not a positive integer up to 999 \(what the synthetic generator makes per class\)/);
  });

  it('the README lists every variable, with its default', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    for (const k of Object.values(ENV_KNOBS)) {
      const row = readme.split('\n').find((l) => l.startsWith(`| \`${k.name}\` |`));
      expect(row, `README has no row for ${k.name}`).toBeDefined();
      expect(row).toContain(k.default);
    }
  });

  it('no other module reads process.env for a variable of its own', () => {
    const offenders: string[] = [];
    for (const file of sources(join(ROOT, 'src'))) {
      if (file.endsWith(join('src', 'env.ts'))) continue;
      readFileSync(file, 'utf8')
        .split('\n')
        .forEach((line, i) => {
          // Copying the whole environment into a child's is fine; reading a variable is env.ts's job.
          if (/process\.env\.\w|process\.env\[/.test(line)) offenders.push(`${file}:${i + 1}: ${line.trim()}`);
        });
    }
    expect(offenders).toEqual([]);
  });
});
