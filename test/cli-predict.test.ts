/**
 * `slicewise predict` as a user runs it: a CI-size full run trains a model, then its model predicts a folder of
 * real Kaggle images (with a broken one, and small volumes of unusual geometry), a full-size real BraTS volume, and
 * a folder of patients through --brats-layout. The segmentation files are checked against their inputs with our
 * reader and with nibabel (an independent one).
 */
import { copyFile, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { niftiHeaderBytes, readNiftiRaw } from '../src/imaging/nifti.ts';
import { compareWithNibabel, nibabelMissing } from './helpers/nibabel.ts';
import { encodeNifti, encodeNifti2 } from './helpers/nifti-writer.ts';
import { runCli } from './helpers/cli.ts';
import { FIXTURES } from './helpers/services.ts';

const KAGGLE = join(FIXTURES, 'kaggle-navoneel');
const BRATS = join(FIXTURES, 'brats2015-deepmedic');

const run = (args: string[], cwd: string) => runCli(args, cwd);

/** RFC 4180: quoted fields may hold commas, doubled quotes and line breaks. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') (field += '"'), i++;
      else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ',') row.push(field), (field = '');
    else if (ch === '\r' && text[i + 1] === '\n') {
      row.push(field);
      rows.push(row);
      (row = []), (field = ''), i++;
    } else field += ch;
  }
  return rows;
}

/** Byte ranges of a NIfTI-1 header that hold the geometry: dim, pixdim, xyzt_units, qform/sform codes, quatern, qoffset, srow, magic. */
const GEOMETRY_BYTES: [number, number][] = [[40, 56], [76, 108], [123, 124], [252, 280], [280, 328], [344, 348]];

interface VolumeJson {
  file: string;
  segmentation: string;
  shape: number[];
  pixdim: number[];
  voxel_volume_ml: number;
  tumor_voxels: number;
  tumor_volume_ml: number;
  slices: { slice_idx: number; tumor_probability: number; tumor_pixels: number }[];
}

/**
 * The segmentation lies over its input: same geometry by our reader and nibabel, 0/1 uint8 labels; the JSON's
 * tumour voxels are the labels counted here, and its volume in ml those times the header's voxel volume.
 */
async function expectSegmentationOf(input: string, seg: string, json: VolumeJson, { sameHeaderBytes }: { sameHeaderBytes: boolean }): Promise<void> {
  const [a, b] = [await readNiftiRaw(input), await readNiftiRaw(seg)];
  expect(b.datatype).toBe('uint8');
  expect({ dims: b.dims, axisCodes: b.axisCodes }).toEqual({ dims: a.dims, axisCodes: a.axisCodes });
  // Equal for a NIfTI-1 input; a NIfTI-2 input's double pixdim is float32 in the NIfTI-1 output.
  b.pixdim.forEach((v, i) => expect(v).toBeCloseTo(a.pixdim[i]!, 6));
  if (sameHeaderBytes) {
    expect(b.pixdim).toEqual(a.pixdim);
    const [ha, hb] = [niftiHeaderBytes(await readFile(input)), niftiHeaderBytes(await readFile(seg))];
    for (const [from, to] of GEOMETRY_BYTES) expect(hb.subarray(from, to).equals(ha.subarray(from, to)), `header bytes ${from}..${to}`).toBe(true);
  }
  let ones = 0;
  let other = 0;
  for (const v of b.raw) {
    if (v === 1) ones++;
    else if (v !== 0) other++;
  }
  expect(other, 'voxels neither 0 nor 1').toBe(0);
  expect(json.shape).toEqual(a.dims);
  expect(json.slices).toHaveLength(a.dims[2]);
  expect(json.tumor_voxels).toBe(ones);
  expect(json.slices.reduce((n, s) => n + s.tumor_pixels, 0)).toBe(ones);
  const voxelMl = (Math.abs(b.pixdim[0]) * Math.abs(b.pixdim[1]) * Math.abs(b.pixdim[2])) / 1000;
  expect(json.voxel_volume_ml).toBeCloseTo(voxelMl, 9);
  expect(json.tumor_volume_ml).toBeCloseTo(ones * voxelMl, 6);
  for (const s of json.slices) {
    expect(s.tumor_probability).toBeGreaterThanOrEqual(0);
    expect(s.tumor_probability).toBeLessThanOrEqual(1);
  }
  if (nibabelMissing) {
    console.log(`skipping the nibabel check of ${seg}: ${nibabelMissing}`);
    return;
  }
  const r = compareWithNibabel(input, seg);
  expect(r.output_shape).toEqual(r.input_shape);
  expect(r).toMatchObject({ affine_equal: true, pixdim_equal: true, qform_equal: true, sform_equal: true, output_dtype: 'uint8', output_sizeof_hdr: 348 });
  expect(r.qform_code[1]).toBe(r.qform_code[0]);
  expect(r.sform_code[1]).toBe(r.sform_code[0]);
  expect(r.axcodes[1]).toEqual(r.axcodes[0]);
  for (const v of r.values) expect([0, 1]).toContain(v);
  expect(r.ones).toBe(ones);
}

describe('slicewise predict', () => {
  let cwd: string;
  let runId: string;
  const weird = 'we,ird "name".jpg';
  beforeAll(async () => {
    cwd = await mkdtemp(join(tmpdir(), 'slicewise-cli-predict-'));
    const { code, out } = await run(['pipeline', '--mode', 'full', '--training-mode', 'quick', '--image-size', '64', '--set', 'training.epochs=1', '--data-dir', 'data'], cwd);
    expect(code, out).toBe(0);
    runId = /Run (run-\S+):/.exec(out)![1]!;

    // Real images (an upper-case extension, a subfolder, a name that needs quoting in CSV), a text file named
    // .jpg, a file that is neither, and two small volumes of unusual geometry (oblique, anisotropic; NIfTI-2).
    const input = join(cwd, 'in');
    await mkdir(join(input, 'no'), { recursive: true });
    await copyFile(join(KAGGLE, 'yes', 'Y1.jpg'), join(input, 'Y1.jpg'));
    await copyFile(join(KAGGLE, 'yes', 'Y113.JPG'), join(input, 'Y113.JPG'));
    await copyFile(join(KAGGLE, 'no', '1 no.jpeg'), join(input, 'no', '1 no.jpeg'));
    await copyFile(join(KAGGLE, 'no', '12 no.jpg'), join(input, 'no', weird));
    await writeFile(join(input, 'bad.jpg'), 'this is not an image\n');
    await writeFile(join(input, 'notes.txt'), 'ignored\n');
    const dims = [40, 36, 6];
    const data = Array.from({ length: 40 * 36 * 6 }, (_, p) => Math.sin(p / 17) * 100 + ((p * 7919) % 13));
    const [c, s] = [Math.cos(0.4), Math.sin(0.4)];
    const geometry = {
      pixdim: [0.9, 1.2, 3],
      sform: { code: 2, srow: [[-c * 0.9, s * 1.2, 0, 80.5], [s * 0.9, c * 1.2, 0, -100.25], [0, 0, 3, 12]] },
      qform: { code: 1, quatern: [0, 0, 1] as [number, number, number], qfac: -1 },
    };
    await writeFile(join(input, 'oblique.nii'), encodeNifti({ dims, datatype: 'float32', data, ...geometry }));
    await writeFile(join(input, 'nifti2.nii.gz'), encodeNifti2({ dims, datatype: 'int16', data, gzip: true, ...geometry }));
  });
  afterAll(async () => {
    await rm(cwd, { recursive: true, force: true });
  });

  it('refuses an unknown run, and a layout without the model\'s modality', async () => {
    const unknown = await run(['predict', '--run', 'run-nope', '--input', 'in', '--data-dir', 'data'], cwd);
    expect(unknown.code).toBe(1);
    expect(unknown.out).toContain('run run-nope not found');
    const layout = await run(['predict', '--run', runId, '--input', BRATS, '--brats-layout', 't1c=T1c_*.nii.gz', '--data-dir', 'data'], cwd);
    expect(layout.code).toBe(1);
    expect(layout.out).toContain('the model reads flair, and --brats-layout "t1c=T1c_*.nii.gz" has no flair entry');
  });

  it('predicts a folder: a row and two PNGs per good image, a segmentation per volume; the bad file is reported, the exit code is 1', async () => {
    const { code, out } = await run(['predict', '--run', runId, '--input', 'in', '--data-dir', 'data', '--out', 'out'], cwd);
    expect(code, out).toBe(1);
    expect(out).toMatch(/bad\.jpg: FAILED: cannot decode image/);
    expect(out).toContain('1 of 7 file(s) failed');
    expect(out).toContain('Ignored 1 file(s) that are neither images nor NIfTI volumes: notes.txt');
    expect(out).toMatch(/\[7\/7\] /); // a line per file when stderr is not a terminal

    const summary = JSON.parse(await readFile(join(cwd, 'out', 'predictions.json'), 'utf8'));
    expect(summary.run_id).toBe(runId);
    expect(summary.failed).toEqual([{ file: 'bad.jpg', error: expect.stringContaining('cannot decode image') }]);
    const files = ['Y1.jpg', 'Y113.JPG', 'no/1 no.jpeg', `no/${weird}`];
    expect(summary.images.map((r: { file: string }) => r.file).sort()).toEqual([...files].sort());
    const csv = parseCsv(await readFile(join(cwd, 'out', 'predictions.csv'), 'utf8'));
    expect(csv[0]).toEqual(['file', 'predicted_label', 'predicted_class', 'tumor_probability', 'confidence', 'tumor_pixels', 'tumor_fraction', 'mask_png', 'gradcam_png']);
    expect(csv).toHaveLength(1 + files.length);
    for (const [i, row] of summary.images.entries()) {
      expect(csv[1 + i]).toEqual(csv[0]!.map((col) => String(row[col])));
      expect(row.tumor_probability).toBeGreaterThanOrEqual(0);
      expect(row.tumor_probability).toBeLessThanOrEqual(1);
      expect(row.predicted_label).toBe(row.tumor_probability >= 0.5 ? 'tumor' : 'no_tumor');
      expect(row.predicted_class).toBe(row.tumor_probability >= 0.5 ? 1 : 0);
      expect(row.tumor_pixels).toBeGreaterThanOrEqual(0);
      expect(row.tumor_pixels).toBeLessThanOrEqual(64 * 64);
      for (const png of [row.mask_png, row.gradcam_png]) {
        const meta = await sharp(join(cwd, 'out', png)).metadata();
        expect([meta.format, meta.width, meta.height]).toEqual(['png', 64, 64]);
      }
    }
    expect(summary.images.find((r: { file: string }) => r.file === `no/${weird}`).mask_png).toBe('no/we,ird "name"_mask.png');

    expect(summary.volumes.map((v: { file: string }) => v.file).sort()).toEqual(['nifti2.nii.gz', 'oblique.nii']);
    for (const name of ['oblique', 'nifti2']) {
      const json = JSON.parse(await readFile(join(cwd, 'out', `${name}.json`), 'utf8')) as VolumeJson;
      expect(json.segmentation).toBe(`${name}_seg.nii.gz`);
      const input = join(cwd, 'in', name === 'oblique' ? 'oblique.nii' : 'nifti2.nii.gz');
      // The NIfTI-2 input's header is converted to NIfTI-1, so only the NIfTI-1 input can be compared byte for byte.
      await expectSegmentationOf(input, join(cwd, 'out', json.segmentation), json, { sameHeaderBytes: name === 'oblique' });
    }
  });

  it('writes a full-size volume\'s segmentation in its geometry, with its per-slice results and tumour volume', async () => {
    const input = join(BRATS, 'pat0001', 'Flair_subtrMeanDivStd.nii.gz');
    const t0 = Date.now();
    const { code, out } = await run(['predict', '--run', runId, '--input', input, '--data-dir', 'data', '--out', 'vol'], cwd);
    console.log(`slicewise predict on a 240 x 240 x 155 volume: ${((Date.now() - t0) / 1000).toFixed(1)} s, process start included`);
    expect(code, out).toBe(0);
    expect(out).toContain('Predicted 1 of 1 file(s)');
    const json = JSON.parse(await readFile(join(cwd, 'vol', 'Flair_subtrMeanDivStd.json'), 'utf8')) as VolumeJson;
    expect(json.shape).toEqual([240, 240, 155]);
    expect(json.pixdim).toEqual([1, 1, 1]);
    await expectSegmentationOf(input, join(cwd, 'vol', 'Flair_subtrMeanDivStd_seg.nii.gz'), json, { sameHeaderBytes: true });
    const summary = JSON.parse(await readFile(join(cwd, 'vol', 'predictions.json'), 'utf8'));
    expect(summary.volumes).toHaveLength(1);
    expect(summary.failed).toEqual([]);
    await expect(stat(join(cwd, 'vol', 'predictions.csv'))).rejects.toThrow(/ENOENT/);
  });

  it('predicts a folder of patients through --brats-layout, reading the model\'s modality', async () => {
    const { code, out } = await run(['predict', '--run', runId, '--input', BRATS, '--brats-layout', 'flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz', '--data-dir', 'data', '--out', 'patients'], cwd);
    expect(code, out).toBe(0);
    const summary = JSON.parse(await readFile(join(cwd, 'patients', 'predictions.json'), 'utf8'));
    expect(summary.volumes.map((v: { file: string }) => v.file)).toEqual(['pat0001', 'pat0005']);
    for (const patient of ['pat0001', 'pat0005']) {
      const json = JSON.parse(await readFile(join(cwd, 'patients', `${patient}.json`), 'utf8')) as VolumeJson;
      expect(json.segmentation).toBe(`${patient}_seg.nii.gz`);
      const seg = await readNiftiRaw(join(cwd, 'patients', json.segmentation));
      expect(seg.dims).toEqual([240, 240, 155]);
      expect(json.tumor_voxels).toBe(Uint8Array.from(seg.raw).reduce((n, v) => n + v, 0));
    }
  });
});
