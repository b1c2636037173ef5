/**
 * An independent reader for tests: Debian's python3-nibabel (`apt-get install python3-nibabel`), run as
 * /usr/bin/python3 so that no other Python on PATH stands in for it. Tests that use it skip that check, saying so,
 * when it is absent.
 */
import { spawnSync } from 'node:child_process';

const PYTHON = '/usr/bin/python3';

/** Null when nibabel can be imported; else why not (for the skip message). */
export const nibabelMissing: string | null = (() => {
  const r = spawnSync(PYTHON, ['-c', 'import nibabel, numpy'], { encoding: 'utf8' });
  if (r.error) return `${PYTHON} not found (${r.error.message})`;
  return r.status === 0 ? null : `nibabel is not importable by ${PYTHON} (apt-get install python3-nibabel): ${r.stderr.trim().split('\n').pop()}`;
})();

/** What nibabel says about a segmentation written over an input image. */
export interface LabelsComparison {
  input_shape: number[];
  output_shape: number[];
  /** np.allclose of the two affines (nibabel's choice: sform, else qform, else the fallback). */
  affine_equal: boolean;
  /** np.allclose of header['pixdim'] (all 8, qfac included). */
  pixdim_equal: boolean;
  qform_code: [number, number];
  sform_code: [number, number];
  /** np.allclose of get_qform() and get_sform() of each. */
  qform_equal: boolean;
  sform_equal: boolean;
  xyzt_units: [number, number];
  axcodes: [string[], string[]];
  output_dtype: string;
  output_endian: string;
  output_sizeof_hdr: number;
  /** Distinct values of the output's data. */
  values: number[];
  /** Voxels labelled 1, and the sums of their i, j and k indices (data[i, j, k], nibabel's order). */
  ones: number;
  index_sums: [number, number, number];
  descrip: string;
}

const SCRIPT = `
import json, sys
import nibabel as nib, numpy as np
a, b = nib.load(sys.argv[1]), nib.load(sys.argv[2])
ha, hb = a.header, b.header
d = np.asanyarray(b.dataobj)
idx = np.nonzero(d == 1)
close = lambda x, y: bool(np.allclose(x, y, atol=1e-4))
print(json.dumps({
  'input_shape': list(a.shape), 'output_shape': list(b.shape),
  'affine_equal': close(a.affine, b.affine),
  'pixdim_equal': close(ha['pixdim'], hb['pixdim']),
  'qform_code': [int(ha['qform_code']), int(hb['qform_code'])],
  'sform_code': [int(ha['sform_code']), int(hb['sform_code'])],
  'qform_equal': close(a.get_qform(), b.get_qform()),
  'sform_equal': close(a.get_sform(), b.get_sform()),
  'xyzt_units': [int(ha['xyzt_units']), int(hb['xyzt_units'])],
  'axcodes': [list(nib.aff2axcodes(a.affine)), list(nib.aff2axcodes(b.affine))],
  'output_dtype': str(hb.get_data_dtype().name), 'output_endian': hb.endianness,
  'output_sizeof_hdr': int(hb['sizeof_hdr']),
  'values': sorted(int(v) for v in np.unique(d)),
  'ones': int(idx[0].size) if d.ndim else 0,
  'index_sums': [int(i.sum()) for i in idx[:3]] + [0] * (3 - len(idx[:3])),
  'descrip': hb['descrip'].item().decode('latin1'),
}))
`;

/** Loads both files with nibabel and compares the output's geometry with the input's. */
export function compareWithNibabel(input: string, output: string): LabelsComparison {
  const r = spawnSync(PYTHON, ['-c', SCRIPT, input, output], { encoding: 'utf8', maxBuffer: 16 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`nibabel failed on ${input} / ${output}: ${r.stderr || r.error?.message}`);
  return JSON.parse(r.stdout) as LabelsComparison;
}

/** The same index sums from labels in NIfTI order (i fastest), to compare with nibabel's. */
export function indexSums(labels: ArrayLike<number>, [nx, ny]: readonly number[]): { ones: number; index_sums: [number, number, number] } {
  let ones = 0;
  const sums: [number, number, number] = [0, 0, 0];
  for (let p = 0; p < labels.length; p++) {
    if (labels[p] !== 1) continue;
    ones++;
    sums[0] += p % nx;
    sums[1] += Math.floor(p / nx) % ny;
    sums[2] += Math.floor(p / (nx * ny));
  }
  return { ones, index_sums: sums };
}
