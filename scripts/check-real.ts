/**
 * A check on real data that any user can run (not part of CI: it trains for minutes):
 *   npm run check:real [-- --epochs 30 --size 128]
 * Trains the small preset's segmentation (stage 1) on the slices of the real BraTS 2015 case pat0005 at
 * 128 x 128, then reports whole-tumour Dice on every axial slice of pat0001, a patient it never saw.
 * The fixtures are read from ../shared/fixtures (or SLICEWISE_FIXTURES).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import * as tf from '@tensorflow/tfjs';
import { loadConfig } from '../src/config/load.ts';
import { preprocessPatient } from '../src/imaging/brats.ts';
import { discoverPatients, parseLayout } from '../src/imaging/layout.ts';
import { readNpy } from '../src/imaging/npy.ts';
import { writeJsonAtomic } from '../src/lib/atomic.ts';
import { loadCheckpoint } from '../src/model/checkpoint.ts';
import { runStage } from '../src/model/stage.ts';

const { values } = parseArgs({ options: { epochs: { type: 'string', default: '30' }, size: { type: 'string', default: '128' } } });
const epochs = Number(values.epochs);
const size = Number(values.size);
const fixtures = resolve(process.env.SLICEWISE_FIXTURES ?? join(import.meta.dirname, '../../shared/fixtures'));
const work = await mkdtemp(join(tmpdir(), 'slicewise-check-real-'));
const t0 = Date.now();
try {
  const patients = await discoverPatients(join(fixtures, 'brats2015-deepmedic'), parseLayout('flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz'));
  const byId = Object.fromEntries(patients.map((p) => [p.patientId, p]));
  const processed = join(work, 'processed', 'brats');
  // Training patient: the pipeline's own rules. Test patient: every slice (keep probability 1), so the Dice is
  // over the whole volume.
  await preprocessPatient(byId.pat0005!, processed, { imageSize: size });
  await preprocessPatient(byId.pat0001!, join(work, 'eval'), { imageSize: size, keepProbability: 1 });
  await writeJsonAtomic(join(work, 'splits', 'brats.json'), { train: ['pat0005'], val: [], test: ['pat0001'], processed_dir: processed });

  const config = loadConfig({
    trainingMode: 'quick',
    stage: 'seg_warmup',
    overrides: { data: { image_size: size }, training: { epochs, batch_size: 8, early_stopping: { enabled: false } } },
  });
  const result = await runStage(
    { stage: 'seg_warmup', splitsDir: join(work, 'splits'), checkpointDir: join(work, 'checkpoints'), config },
    {
      log: (m) => console.log(m),
      shouldStop: () => false,
      onEpoch: async (r) => console.log(`epoch ${r.epoch}/${r.epochs}  train loss ${r.trainLoss.toFixed(4)}  ${r.seconds.toFixed(1)} s`),
    },
  );

  const { model } = await loadCheckpoint(result.lastDir);
  const images = await readNpy(join(work, 'eval', 'pat0001', 'images.npy'));
  const masks = await readNpy(join(work, 'eval', 'pat0001', 'masks.npy'));
  const [n, h, w] = images.shape as [number, number, number];
  let inter = 0;
  let pred = 0;
  let truth = 0;
  for (let i = 0; i < n; i += 8) {
    const k = Math.min(8, n - i);
    const x = tf.tensor4d(images.data.subarray(i * h * w, (i + k) * h * w) as Float32Array, [k, h, w, 1]);
    const p = tf.tidy(() => model.forwardSeg(x, { training: false }).greater(0).dataSync());
    x.dispose();
    for (let j = 0; j < k * h * w; j++) {
      const g = masks.data[i * h * w + j]!;
      inter += p[j]! && g ? 1 : 0;
      pred += p[j] ? 1 : 0;
      truth += g;
    }
  }
  const dice = (2 * inter) / Math.max(1, pred + truth);
  console.log(`\nWhole-tumour Dice on pat0001 (all ${n} axial slices, ${size}x${size}), small preset trained ${epochs} epochs on pat0005: ${dice.toFixed(3)}`);
  console.log(`device ${result.device}; total ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  model.dispose();
} finally {
  await rm(work, { recursive: true, force: true });
}
