/**
 * What an evaluation reads: a run's test split (the patients' own source volumes, found through their
 * meta.json, and the Kaggle test rows of processed/kaggle), or an external set of patients and images (the
 * same source forms the pipeline reads, for `slicewise evaluate`).
 */
import { kaggleFiles, patientFiles, readPatientMeta, readSplits, type BratsSplit, type KaggleSplit } from '../disk/layout.ts';
import { readPatientVolumes } from '../imaging/brats.ts';
import { kaggleImageToInput, listKaggleImages } from '../imaging/kaggle.ts';
import type { PatientFiles } from '../imaging/layout.ts';
import { openNpyRows, readNpy } from '../imaging/npy.ts';
import { DataFileError } from '../lib/errors.ts';
import type { KaggleSource, PatientSource } from './evaluate.ts';

/** The test patients of a split, read again from the volumes their meta.json names. */
export function splitPatients(split: BratsSplit, modalities: string[], part: 'test' | 'val' | 'train' = 'test'): PatientSource {
  const ids = split[part];
  return {
    count: ids.length,
    async *load() {
      for (const id of ids) {
        const meta = await readPatientMeta(patientFiles(split.processed_dir, id));
        const files: PatientFiles = { patientId: id, dir: patientFiles(split.processed_dir, id).dir, files: meta.source_files };
        const { volumes, seg } = await readPatientVolumes(files, modalities);
        yield { id, volumes, seg: seg! };
      }
    },
  };
}

/** Patients found in a folder (official BraTS names, or a layout): each must have a segmentation. */
export function folderPatients(patients: PatientFiles[], modalities: string[]): PatientSource {
  return {
    count: patients.length,
    async *load() {
      for (const p of patients) {
        const { volumes, seg } = await readPatientVolumes(p, modalities, { seg: true });
        yield { id: p.patientId, volumes, seg: seg! };
      }
    },
  };
}

/** The Kaggle rows of a split, from processed/kaggle's images.npy (read row by row) and labels.npy. */
export async function splitKaggle(split: KaggleSplit, part: 'test' | 'val' | 'train' = 'test'): Promise<KaggleSource> {
  const files = kaggleFiles(split.processed_dir);
  const labels = await readNpy(files.labels);
  const indices = split[part];
  return {
    count: indices.length,
    async *batches(batchSize) {
      const rows = await openNpyRows(files.images);
      try {
        const [, h, w] = rows.shape;
        if (h !== w) throw new DataFileError(files.images, `expected square images, found ${h} x ${w}`);
        for (let start = 0; start < indices.length; start += batchSize) {
          const chunk = indices.slice(start, start + batchSize);
          const images = new Float32Array(chunk.length * h * w);
          for (let i = 0; i < chunk.length; i++) await rows.readRow(chunk[i]!, images, i * h * w);
          yield { batch: { images, n: chunk.length, size: h, channels: 1 }, labels: chunk.map((r) => labels.data[r]!) };
        }
      } finally {
        await rows.close();
      }
    },
  };
}

/**
 * Images in a Kaggle-style folder (yes/ and no/), through the training path's own preprocessing. Images its
 * brain mask rejects are left out, as preprocessing leaves them out; `rejected` lists them.
 */
export async function folderKaggle(root: string, imageSize: number): Promise<KaggleSource & { rejected: { relPath: string; reason: string }[] }> {
  const images = await listKaggleImages(root);
  const rejected: { relPath: string; reason: string }[] = [];
  return {
    count: images.length,
    rejected,
    async *batches(batchSize) {
      let pending: { image: Float32Array; label: number }[] = [];
      const flush = () => {
        const images = new Float32Array(pending.length * imageSize * imageSize);
        pending.forEach((p, i) => images.set(p.image, i * imageSize * imageSize));
        const out = { batch: { images, n: pending.length, size: imageSize, channels: 1 }, labels: pending.map((p) => p.label) };
        pending = [];
        return out;
      };
      for (const img of images) {
        const r = await kaggleImageToInput(img.file, { imageSize });
        if (!r.ok) rejected.push({ relPath: img.relPath, reason: r.reason });
        else pending.push({ image: r.image, label: img.label });
        if (pending.length === batchSize) yield flush();
      }
      if (pending.length) yield flush();
    },
  };
}

/** The test set of a data run's splits folder: its BraTS test patients and Kaggle test rows (either may be absent). */
export async function testSet(splitsDir: string, modalities: string[]): Promise<{ patients: PatientSource | null; kaggle: KaggleSource | null }> {
  const splits = await readSplits(splitsDir);
  return { patients: splits.brats ? splitPatients(splits.brats, modalities) : null, kaggle: splits.kaggle ? await splitKaggle(splits.kaggle) : null };
}
