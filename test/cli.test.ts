import { mkdtemp, readFile, rm, symlink, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bareEnv, runCli } from './helpers/cli.ts';

const run = (args: string[], { cwd, env }: { cwd: string; env?: NodeJS.ProcessEnv }) => runCli(args, cwd, env ?? process.env);

describe('slicewise CLI', () => {
  let cwd: string;
  beforeAll(async () => {
    cwd = await mkdtemp(join(tmpdir(), 'slicewise-cli-'));
  });
  afterAll(async () => {
    await rm(cwd, { recursive: true, force: true });
  });

  it('runs the README main command on the embedded defaults (private Redis, PGlite, synthetic data)', async () => {
    const { code, out } = await run(['pipeline', '--mode', 'data-only', '--training-mode', 'quick', '--image-size', '64'], { cwd, env: bareEnv() });
    expect(code, out).toBe(0);
    expect(out).toContain('Started a private redis-server');
    expect(out).toContain('embedded PGlite');
    expect(out).toContain('SYNTHETIC');
    expect(out).toMatch(/preprocess_brats done/);
    const results = JSON.parse(await readFile(join(cwd, 'pipeline_results.json'), 'utf8'));
    expect(results).toMatchObject({ mode: 'data-only', training_mode: 'quick', success: true });
    expect(Object.keys(results.steps)).toEqual(['download_brats', 'download_kaggle', 'preprocess_brats', 'preprocess_kaggle', 'split_brats', 'split_kaggle']);
    for (const s of Object.values<any>(results.steps)) expect(s.status).toBe('success');

    // --skip-download reuses the raw data of the first run; the embedded database remembers both runs.
    const again = await run(['pipeline', '--mode', 'data-only', '--skip-download', '--image-size', '64'], { cwd, env: bareEnv() });
    expect(again.code, again.out).toBe(0);
  });

  it('--skip-download with nothing downloaded fails the run and says why', async () => {
    const fresh = await mkdtemp(join(tmpdir(), 'slicewise-cli-'));
    const { code, out } = await run(['pipeline', '--mode', 'data-only', '--skip-download', '--image-size', '32'], { cwd: fresh, env: bareEnv() });
    await rm(fresh, { recursive: true, force: true });
    expect(code).toBe(1);
    expect(out).toContain('--skip-download was given, but nothing was downloaded');
  });

  it('without redis-server on PATH (and no install allowed) says how to get one and exits 2', async () => {
    // A PATH with node but without redis-server.
    const bin = join(cwd, 'bin-no-redis');
    await mkdir(bin, { recursive: true });
    await symlink(process.execPath, join(bin, 'node'));
    await symlink('/bin/sh', join(bin, 'sh'));
    const { code, out } = await run(['pipeline', '--mode', 'data-only'], { cwd, env: bareEnv({ PATH: bin, SLICEWISE_NO_INSTALL: '1' }) });
    expect(code).toBe(2);
    expect(out).toContain('redis-server was not found');
    expect(out).toContain('apt-get install -y redis-server');
    expect(out).toContain('docker compose up -d redis');
  });

  it('names a dead Redis', async () => {
    const { code, out } = await run(['worker', '--queues', 'preprocess'], { cwd, env: { ...process.env, REDIS_URL: 'redis://127.0.0.1:1', DATABASE_URL: 'postgres://x@127.0.0.1:1/x' } });
    expect(code).toBe(1);
    expect(out).toContain('cannot reach Redis at redis://127.0.0.1:1');
  });

  it('--mode demo with no trained model yet says how to make one', async () => {
    const fresh = await mkdtemp(join(tmpdir(), 'slicewise-cli-'));
    const { code, out } = await run(['pipeline', '--mode', 'demo', '--data-dir', 'data'], { cwd: fresh, env: bareEnv() });
    await rm(fresh, { recursive: true, force: true });
    expect(code).toBe(1);
    expect(out).toContain('no trained model yet');
    expect(out).toContain('slicewise pipeline --mode full');
  });
});
