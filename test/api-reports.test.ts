import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { artifacts } from '../src/db/schema.ts';
import { harness, json, type Harness } from './helpers/services.ts';
import { gradcamRel, insertEvaluations, insertMetrics, insertRun, recordFile } from './helpers/reports.ts';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('report endpoints: metrics, evaluation, artifact downloads', () => {
  let h: Harness;
  let outside: string;
  let runA: string;
  let runB: string;
  beforeAll(async () => {
    h = await harness('pglite', { workers: false });
    outside = await mkdtemp(join(tmpdir(), 'slicewise-outside-'));
    runA = await insertRun(h.ctx, { dataDir: h.dataDir });
    runB = await insertRun(h.ctx, { dataDir: h.dataDir });
  });
  afterAll(async () => {
    await h?.close();
    if (outside) await rm(outside, { recursive: true, force: true });
  });

  it('GET /runs/:id/metrics: one value per epoch per series, null where an epoch has none, in step order', async () => {
    const rows = await insertMetrics(h.ctx, runA, 3);
    const res = await h.app.request(`/runs/${runA}/metrics`);
    expect(res.status).toBe(200);
    const body = await json(res);
    expect(body.runId).toBe(runA);
    expect(Object.keys(body.steps)).toEqual(['train_stage1_seg_warmup', 'train_stage2_cls_head', 'train_stage3_joint']);
    for (const [step, s] of Object.entries<any>(body.steps)) {
      expect(s.epochs).toEqual([1, 2, 3]);
      for (const [name, values] of Object.entries<any>(s.series)) {
        expect(values, `${step} ${name}`).toEqual([1, 2, 3].map((e) => rows.find((r) => r.step === step && r.epoch === e && r.name === name)?.value ?? null));
      }
    }
    expect(body.steps.train_stage2_cls_head.series.val_dice[1]).toBeNull();
    expect(body.steps.train_stage3_joint.final).toEqual({ test_dice: 0.71 });
    expect(body.steps.train_stage1_seg_warmup.final).toBeUndefined();
    // A run with no metrics yet: no steps.
    expect(await json(await h.app.request(`/runs/${runB}/metrics`))).toEqual({ runId: runB, steps: {} });
  });

  it('GET /runs/:id/evaluation: nulls before the evaluation, the stored reports after, 404 for an unknown run', async () => {
    expect(await json(await h.app.request(`/runs/${runA}/evaluation`))).toEqual({ multitask: null, phase_comparison: null });
    const stored = await insertEvaluations(h.ctx, runA);
    const res = await h.app.request(`/runs/${runA}/evaluation`);
    expect(res.status).toBe(200);
    expect(await json(res)).toEqual(stored);
  });

  it('answers 404 run_not_found for an unknown run on every report endpoint', async () => {
    for (const path of ['metrics', 'evaluation', 'artifacts', 'artifacts/runs/x/y.png']) {
      const res = await h.app.request(`/runs/run-nope/${path}`);
      expect(res.status, path).toBe(404);
      expect((await json(res)).error.code, path).toBe('run_not_found');
    }
  });

  it('lists artifacts with their id and URL, and streams each with its sha256, type and length', async () => {
    const png = Buffer.from('89504e470d0a1a0a0000000d4948445200000001000000010806000000', 'hex');
    const weights = randomBytes(3 * 1024 * 1024 + 17);
    const pngPath = await recordFile(h.ctx, { runId: runA, dataDir: h.dataDir, rel: gradcamRel(h.dataDir, runA, 'gradcam_000_brats_pred1_true1.png'), content: png, kind: 'gradcam', step: 'generate_gradcam' });
    await recordFile(h.ctx, { runId: runA, dataDir: h.dataDir, rel: `checkpoints/${runA}/joint/best/weights.bin`, content: weights, kind: 'checkpoint_best', step: 'train_stage3_joint' });

    const list = (await json(await h.app.request(`/runs/${runA}/artifacts`))).artifacts;
    const png1 = list.find((a: any) => a.path === pngPath);
    expect(png1.id).toBe(`runs/${runA}/visualizations/multitask_gradcam/gradcam_000_brats_pred1_true1.png`);
    expect(png1.url).toBe(`/runs/${runA}/artifacts/${png1.id}`);
    const bin = list.find((a: any) => a.kind === 'checkpoint_best');
    expect(bin.id).toBe(`checkpoints/${runA}/joint/best/weights.bin`);

    const img = await h.app.request(png1.url);
    expect(img.status).toBe(200);
    expect(img.headers.get('content-type')).toBe('image/png');
    expect(img.headers.get('content-length')).toBe(String(png.length));
    expect(img.headers.get('x-sha256')).toBe(sha(png));
    expect(img.headers.get('content-disposition')).toMatch(/^inline/);
    expect(Buffer.from(await img.arrayBuffer()).equals(png)).toBe(true);

    const res = await h.app.request(bin.url);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/octet-stream');
    expect(res.headers.get('content-length')).toBe(String(weights.length));
    expect(res.headers.get('content-disposition')).toBe(`attachment; filename*=UTF-8''weights.bin`);
    expect(res.headers.get('x-sha256')).toBe(sha(weights));
    expect(res.headers.get('x-sha256')).toBe(bin.sha256);
    expect(res.headers.get('repr-digest')).toBe(`sha-256=:${createHash('sha256').update(weights).digest('base64')}:`);
    const body = Buffer.from(await res.arrayBuffer());
    expect(body.length).toBe(weights.length);
    expect(sha(body)).toBe(sha(weights));

    // The identifier also works with its slashes encoded, and HEAD answers the headers alone.
    expect((await h.app.request(`/runs/${runA}/artifacts/${encodeURIComponent(bin.id)}`)).status).toBe(200);
    const head = await h.app.request(bin.url, { method: 'HEAD' });
    expect(head.status).toBe(200);
    expect(head.headers.get('x-sha256')).toBe(sha(weights));
    expect((await head.arrayBuffer()).byteLength).toBe(0);
  });

  it("refuses another run's artifact, unrecorded files and '..' traversal", async () => {
    await recordFile(h.ctx, { runId: runB, dataDir: h.dataDir, rel: `runs/${runB}/splits/brats.json`, content: '{"train":[]}', kind: 'split', step: 'split_brats' });
    // Served for its own run, not through run A.
    expect((await h.app.request(`/runs/${runB}/artifacts/runs/${runB}/splits/brats.json`)).status).toBe(200);
    const other = await h.app.request(`/runs/${runA}/artifacts/runs/${runB}/splits/brats.json`);
    expect(other.status).toBe(404);
    expect((await json(other)).error.code).toBe('artifact_not_found');
    // A file in the run's folder that no step recorded.
    await writeFile(join(h.dataDir, 'runs', runA, 'unrecorded.txt'), 'x');
    expect((await h.app.request(`/runs/${runA}/artifacts/runs/${runA}/unrecorded.txt`)).status).toBe(404);

    // '..' and absolute identifiers are refused before any lookup (the URL parser already folds a literal '/../').
    for (const id of ['..%2F..%2F..%2Fetc%2Fpasswd', `runs%2F${runA}%2F..%2F${runB}%2Fsplits%2Fbrats.json`, `runs/${runA}/..%2F${runB}/splits/brats.json`, '%2Fetc%2Fpasswd', `runs/${runA}/.%2Fx`]) {
      const res = await h.app.request(`/runs/${runA}/artifacts/${id}`);
      expect(res.status, id).toBe(400);
      const err = (await json(res)).error;
      expect(err.code, id).toBe('invalid_request');
      expect(err.fields[0].field, id).toBe('artifact');
    }
  });

  it("does not serve a recorded file that resolves outside the run's data dir (symlinked file or folder)", async () => {
    const secret = join(outside, 'secret.bin');
    await writeFile(secret, 'not yours');
    await mkdir(join(h.dataDir, 'runs', runA), { recursive: true });
    // A symlinked file and a symlinked folder, both recorded as the run's artifacts.
    await symlink(secret, join(h.dataDir, 'runs', runA, 'evil.bin'));
    await symlink(outside, join(h.dataDir, 'runs', runA, 'evil-dir'));
    for (const rel of [`runs/${runA}/evil.bin`, `runs/${runA}/evil-dir/secret.bin`]) {
      await h.ctx.db.insert(artifacts).values({ runId: runA, step: 'x', kind: 'x', path: join(h.dataDir, rel), sha256: sha(Buffer.from('not yours')), bytes: 9 });
      const res = await h.app.request(`/runs/${runA}/artifacts/${rel}`);
      expect(res.status, rel).toBe(404);
      const err = (await json(res)).error;
      expect(err.code).toBe('artifact_not_found');
      expect(err.message).toContain("outside the run's data dir");
    }
    // A path recorded outside the data dir has no identifier at all.
    await h.ctx.db.insert(artifacts).values({ runId: runA, step: 'x', kind: 'x', path: secret, sha256: null, bytes: 9 });
    const listed = (await json(await h.app.request(`/runs/${runA}/artifacts`))).artifacts.find((a: any) => a.path === secret);
    expect(listed).toMatchObject({ id: null, url: null });
  });

  it('refuses a file that changed since it was recorded, and one that is gone', async () => {
    const rel = `runs/${runA}/results/changing.json`;
    await recordFile(h.ctx, { runId: runA, dataDir: h.dataDir, rel, content: '{"a":1}', kind: 'x', step: 'x' });
    await writeFile(join(h.dataDir, rel), '{"a":12345}');
    const changed = await h.app.request(`/runs/${runA}/artifacts/${rel}`);
    expect(changed.status).toBe(409);
    expect((await json(changed)).error.code).toBe('artifact_changed');
    await rm(join(h.dataDir, rel));
    const gone = await h.app.request(`/runs/${runA}/artifacts/${rel}`);
    expect(gone.status).toBe(404);
    expect((await json(gone)).error.message).toContain('gone');
  });
});
