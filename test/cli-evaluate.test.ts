/**
 * The command line of a full run: settings from --set and --config (validated, naming the flag), a CI-size full
 * run that ends with the evaluation table, `slicewise evaluate` of its model on the real fixtures (full-size
 * 240 x 240 x 155 volumes), and `slicewise retry` of one step.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { MultitaskEvaluation } from '../src/evaluation/report.ts';
import { readNifti } from '../src/imaging/nifti.ts';
import { BIN, bareEnv, runCli } from './helpers/cli.ts';
import { FIXTURES } from './helpers/services.ts';


const run = (args: string[], cwd: string) => runCli(args, cwd);

describe('slicewise pipeline --mode full, evaluate and retry', () => {
  let cwd: string;
  let runId: string;
  beforeAll(async () => {
    cwd = await mkdtemp(join(tmpdir(), 'slicewise-cli-eval-'));
  });
  afterAll(async () => {
    await rm(cwd, { recursive: true, force: true });
  });

  it('refuses a bad --set or --config before anything starts, naming the flag and the key', async () => {
    const bad = await run(['pipeline', '--set', 'training.epochz=3'], cwd);
    expect(bad.code).toBe(1);
    expect(bad.out).toContain('invalid configuration in --set training.epochz=3');
    expect(bad.out).toMatch(/training: Unrecognized key: "epochz"/);
    const value = await run(['pipeline', '--set', 'training.epochs=many'], cwd);
    expect(value.out).toContain('--set training.epochs=many: training.epochs');
    await writeFile(join(cwd, 'bad.yaml'), 'data:\n  image_sise: 64\n');
    const file = await run(['pipeline', '--config', 'bad.yaml'], cwd);
    expect(file.code).toBe(1);
    expect(file.out).toContain('invalid configuration in --config bad.yaml: data: Unrecognized key: "image_sise"');
    expect(bad.out).not.toContain('Started a private redis-server');
  });

  it('runs all steps and prints the evaluation table; settings from --config and --set are the run\'s overrides', async () => {
    await writeFile(join(cwd, 'ci.yaml'), 'training:\n  epochs: 5\n  batch_size: 8\n');
    const { code, out, stdout } = await run(
      ['pipeline', '--mode', 'full', '--training-mode', 'quick', '--image-size', '64', '--config', 'ci.yaml', '--set', 'training.epochs=2', '--data-dir', 'data'],
      cwd,
    );
    expect(code, out).toBe(0);
    runId = /Run (run-\S+):/.exec(out)![1]!;
    expect(out).toContain('Settings over configs/: {"training":{"epochs":2,"batch_size":8},"data":{"image_size":64}}');
    expect(stdout).toContain('per patient, 3-D (mean)');
    expect(stdout).toMatch(/overall\s+\d+\s+\d\.\d{3}/);
    expect(stdout).toContain('Phase comparison');
    const results = JSON.parse(await readFile(join(cwd, 'pipeline_results.json'), 'utf8'));
    expect(Object.keys(results.steps)).toHaveLength(12);
    expect(results.steps.compare_phases.status).toBe('success');
    const s1 = results.steps.train_stage1_seg_warmup;
    expect(s1.counts.epochs).toBe(2);
    // Quick mode's two patients leave none for validation: stage 1 still trains, keeps its last epoch, and says so.
    expect(results.steps.split_brats.counts.val).toBe(0);
    expect(s1.counts.no_validation_last_epoch_kept).toBe(1);
  });

  it('evaluates the run\'s model on the real fixtures: both full-size patients in 3-D, and the Kaggle images', async () => {
    const { code, out } = await run(
      [
        'evaluate',
        '--run', runId,
        '--brats-source', `path:${join(FIXTURES, 'brats2015-deepmedic')}`,
        '--brats-layout', 'flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz',
        '--kaggle-source', `path:${join(FIXTURES, 'kaggle-navoneel')}`,
        '--data-dir', 'data',
        '--out', 'external',
      ],
      cwd,
    );
    expect(code, out).toBe(0);
    const report = JSON.parse(await readFile(join(cwd, 'external', 'multitask_evaluation.json'), 'utf8')) as MultitaskEvaluation;
    expect(report.run_id).toBe(runId);
    expect(report.checkpoint.sha256).toMatch(/^[0-9a-f]{64}$/);
    const patients = report.segmentation!.per_patient_3d.patients;
    expect(patients.map((p) => p.patient_id)).toEqual(['pat0001', 'pat0005']);
    for (const p of patients) {
      expect(p.slices).toBe(155);
      // The truth, counted here from the label volume: every voxel with a label, on the volume's own grid.
      const seg = await readNifti(join(FIXTURES, 'brats2015-deepmedic', p.patient_id, 'OTMultiClass.nii.gz'));
      expect(p.true_voxels).toBe(seg.data.reduce((n, v) => n + (v > 0 ? 1 : 0), 0));
      expect(p.dice).toBeGreaterThanOrEqual(0);
      expect(p.dice).toBeLessThanOrEqual(1);
    }
    const kaggle = report.classification.kaggle!;
    expect(kaggle.n).toBeGreaterThanOrEqual(50); // of 60: the brain mask rejects a few, as preprocessing does
    expect(kaggle.confusion.tp + kaggle.confusion.fp + kaggle.confusion.tn + kaggle.confusion.fn).toBe(kaggle.n);
    expect(out).toContain('per patient, 3-D');
    expect(out).toContain('pat0005');
  });

  it('serves the run\'s model with --mode demo until it is told to stop', async () => {
    const p = spawn(process.execPath, [BIN, 'pipeline', '--mode', 'demo', '--from-run', runId, '--port', '0', '--data-dir', 'data'], { cwd, env: bareEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    try {
      const deadline = Date.now() + 60_000;
      while (!/Demo page (http:\/\/\S+)\/ui\/demo/.test(out)) {
        if (Date.now() > deadline || p.exitCode !== null) throw new Error(`the demo did not start:\n${out}`);
        await new Promise((r) => setTimeout(r, 200));
      }
      const base = /Demo page (http:\/\/\S+)\/ui\/demo/.exec(out)![1]!;
      const info = await (await fetch(`${base}/model/info`)).json();
      expect(info.run_id).toBe(runId);
      expect(info.checkpoint.sha256).toMatch(/^[0-9a-f]{64}$/);
      const yes = join(FIXTURES, 'kaggle-navoneel', 'yes');
      const image = (await readdir(yes))[0]!;
      const form = new FormData();
      form.append('file', new Blob([await readFile(join(yes, image))]), image);
      const res = await fetch(`${base}/predict_multitask`, { method: 'POST', body: form });
      expect(res.status).toBe(200);
      const body = await res.json();
      expect(body.classification.tumor_probability).toBeGreaterThanOrEqual(0);
      expect(body.classification.tumor_probability).toBeLessThanOrEqual(1);
      p.kill('SIGTERM');
      const code = await new Promise((r) => p.once('exit', r));
      expect(code).toBe(0);
    } finally {
      if (p.exitCode === null) p.kill('SIGKILL');
    }
  });

  it('runs one step of the finished run again', async () => {
    const { code, out } = await run(['retry', runId, 'compare_phases', '--data-dir', 'data'], cwd);
    expect(code, out).toBe(0);
    expect(out).toContain('compare_phases done');
    expect(out).toContain(`Run ${runId} succeeded`);
    const bad = await run(['retry', runId, 'split_brats', '--data-dir', 'data'], cwd);
    expect(bad.code).toBe(1);
    expect(bad.out).toContain("step 'split_brats' cannot run alone");
  });
});
