import { cp, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { DEFAULT_CONFIG_DIR, loadConfig, patientCount } from '../src/config/load.ts';
import { choosePatients, splitPatients, splitSizes, splitStratified } from '../src/splits/index.ts';

describe('config', () => {
  it('merges base -> mode -> stage -> overrides', () => {
    const quick = loadConfig({ trainingMode: 'quick' });
    expect(quick.model.preset).toBe('small');
    expect(quick.training).toMatchObject({ epochs: 2, batch_size: 32, early_stopping: { enabled: false, min_delta: 0.001 } });
    expect(quick.training.optimizer).toEqual({ lr: 0.001, weight_decay: 0.0001, betas: [0.9, 0.999], eps: 0.000001 });
    expect(quick.stage).toEqual({ loss: { label_smoothing: 0.1, lambda_seg: 1, lambda_cls: 0.5, dice_weight: 0.6, bce_weight: 0.4, dice_smooth: 1 } });
    const prod = loadConfig({ trainingMode: 'production', stage: 'joint', overrides: { data: { image_size: 128 }, stage: { loss: { dice_weight: 0.5 } } } });
    expect(prod.training).toMatchObject({ epochs: 100, batch_size: 32, early_stopping: { patience: 20 } });
    expect(prod.stage).toMatchObject({ mix: { brats: 0.3, kaggle: 0.7 }, lr: { encoder: 0.0001, decoder: 0.0003 }, trainable: ['encoder', 'decoder', 'head'] });
    expect(prod.stage.loss).toEqual({ label_smoothing: 0.1, lambda_seg: 1, lambda_cls: 0.5, dice_weight: 0.5, bce_weight: 0.4, dice_smooth: 1 });
    expect(loadConfig({ trainingMode: 'quick', stage: 'cls_head' }).stage).toMatchObject({ trainable: ['head'], loss: { label_smoothing: 0.1 } });
    expect(prod.data.image_size).toBe(128);
    expect(prod.data.min_tumor_pixels).toBe(100);
  });

  it('names the file and the key of a bad value', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'slicewise-cfg-'));
    try {
      await cp(DEFAULT_CONFIG_DIR, dir, { recursive: true });
      await writeFile(join(dir, 'modes', 'baseline.yaml'), 'training:\n  epochs: -3\n  batch_sise: 8\n');
      expect(() => loadConfig({ trainingMode: 'baseline', configDir: dir })).toThrow(/modes\/baseline\.yaml: training\.epochs: .*; training: Unrecognized key: "batch_sise"/);
      await writeFile(join(dir, 'base.yaml'), 'seed: [oops\n');
      expect(() => loadConfig({ trainingMode: 'quick', configDir: dir })).toThrow(/base\.yaml.*not valid YAML/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('validates the stage section like the rest: a wrong key or value is refused with its path', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'slicewise-cfg-'));
    try {
      await cp(DEFAULT_CONFIG_DIR, dir, { recursive: true });
      await writeFile(join(dir, 'stages', 'joint.yaml'), 'stage:\n  loss: { dice_wieght: 0.5 }\n  best_metric: combined\n');
      expect(() => loadConfig({ trainingMode: 'quick', stage: 'joint', configDir: dir })).toThrow(
        /stages\/joint\.yaml: stage\.loss: Unrecognized key: "dice_wieght"; stage: Unrecognized key: "best_metric"/,
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
    expect(() => loadConfig({ trainingMode: 'quick', overrides: { stage: { trainable: ['tail'] } } })).toThrow(/overrides: stage\.trainable\.0: /);
    expect(() => loadConfig({ trainingMode: 'quick', overrides: { stage: { loss: { label_smoothing: 1 } } } })).toThrow(/overrides: stage\.loss\.label_smoothing: /);
    // A layer may set one key of the mix; the merged config needs both.
    expect(() => loadConfig({ trainingMode: 'quick', stage: 'seg_warmup', overrides: { stage: { mix: { brats: 1 } } } })).toThrow(/merged config.*stage\.mix\.kaggle: /);
    expect(() => loadConfig({ trainingMode: 'quick', overrides: { model: { in_channels: 1 } } })).toThrow(/model: Unrecognized key: "in_channels"/);
  });

  it('splits that do not add up are refused', () => {
    expect(() => loadConfig({ trainingMode: 'quick', overrides: { data: { splits: { train: 0.9 } } } })).toThrow(/data\.splits: train \+ val \+ test must be 1/);
  });

  it("uses the original's patient counts: quick max(2, 5%), baseline max(50, 30%), production all", () => {
    const data = (m: 'quick' | 'baseline' | 'production') => loadConfig({ trainingMode: m }).data;
    expect(patientCount(369, data('quick'))).toBe(19);
    expect(patientCount(10, data('quick'))).toBe(2);
    expect(patientCount(369, data('baseline'))).toBe(111);
    expect(patientCount(100, data('baseline'))).toBe(50);
    expect(patientCount(369, data('production'))).toBe(369);
    expect(patientCount(369, { ...data('production'), max_patients: 20 })).toBe(20);
  });
});

describe('splits', () => {
  const ratios = { train: 0.7, val: 0.15, test: 0.15 };

  it("sizes as the original (floor 70 %, floor 15 %, the rest), with val and test never empty from 3 items", () => {
    expect(splitSizes(100, ratios)).toEqual({ train: 70, val: 15, test: 15 });
    expect(splitSizes(369, ratios)).toEqual({ train: 258, val: 55, test: 56 });
    expect(splitSizes(3, ratios)).toEqual({ train: 1, val: 1, test: 1 });
    expect(splitSizes(6, ratios)).toEqual({ train: 4, val: 1, test: 1 });
    expect(splitSizes(2, ratios)).toEqual({ train: 1, val: 0, test: 1 });
  });

  it('is patient-disjoint, complete, and depends only on the set of ids and the seed', () => {
    const ids = Array.from({ length: 57 }, (_, i) => `BraTS20_Training_${String(i + 1).padStart(3, '0')}`);
    const a = splitPatients(ids, ratios, 42);
    const all = [...a.train, ...a.val, ...a.test];
    expect(new Set(all).size).toBe(57);
    expect(all.sort()).toEqual([...ids].sort());
    expect(splitPatients([...ids].reverse(), ratios, 42)).toEqual(a);
    expect(splitPatients(ids, ratios, 7)).not.toEqual(a);
  });

  it('stratifies per class', () => {
    const items = [...Array.from({ length: 155 }, (_, i) => ({ id: `Y${i}`, label: 1 })), ...Array.from({ length: 98 }, (_, i) => ({ id: `N${i}`, label: 0 }))];
    const s = splitStratified(items, (x) => x.label, (x) => x.id, ratios, 42);
    const count = (xs: typeof items, l: number) => xs.filter((x) => x.label === l).length;
    expect([count(s.train, 1), count(s.val, 1), count(s.test, 1)]).toEqual([108, 23, 24]);
    expect([count(s.train, 0), count(s.val, 0), count(s.test, 0)]).toEqual([68, 14, 16]);
    expect(new Set([...s.train, ...s.val, ...s.test].map((x) => x.id)).size).toBe(253);
  });

  it('draws a seeded patient subset', () => {
    const ids = Array.from({ length: 40 }, (_, i) => `p${i}`);
    expect(choosePatients(ids, 10, 42)).toEqual(choosePatients([...ids].reverse(), 10, 42));
    expect(choosePatients(ids, 10, 42)).toHaveLength(10);
    expect(choosePatients(ids, 50, 42)).toHaveLength(40);
  });
});
