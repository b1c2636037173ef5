/** The evaluation report as the terminal shows it: at the end of `slicewise pipeline`, and by `slicewise evaluate`. */
import type { ClassificationReport, MultitaskEvaluation, PhaseComparison } from '../evaluation/report.ts';

const f3 = (v: number | null | undefined): string => (v === null || v === undefined ? '-' : v.toFixed(3));
const pm = (m: { mean: number | null; std: number | null }): string => (m.mean === null ? '-' : `${f3(m.mean)} ± ${f3(m.std)}`);

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ')).join('\n');
}

export function formatEvaluation(r: MultitaskEvaluation): string {
  const out: string[] = [`Evaluation of ${r.checkpoint.stage} (${r.checkpoint.dir}) on the ${r.dataset}`];
  const seg = r.segmentation;
  if (seg) {
    out.push(
      table([
        ['segmentation (whole tumour)', 'Dice', 'IoU', 'n'],
        ['per slice', pm(seg.per_slice.dice), pm(seg.per_slice.iou), String(seg.per_slice.slices)],
        [`per slice, without the ${seg.per_slice.empty_both} empty-vs-empty`, pm(seg.per_slice_non_empty.dice), pm(seg.per_slice_non_empty.iou), String(seg.per_slice_non_empty.dice.n)],
        ['per patient, 3-D (mean)', f3(seg.per_patient_3d.mean_dice), f3(seg.per_patient_3d.mean_iou), String(seg.per_patient_3d.patients.length)],
        ['per patient, 3-D (median)', f3(seg.per_patient_3d.median_dice), '', ''],
        ...seg.per_patient_3d.patients.map((p) => [`  ${p.patient_id}`, f3(p.dice), f3(p.iou), `${p.slices} slices`]),
      ]),
    );
  }
  const cls = (name: string, c: ClassificationReport | null) =>
    c ? [name, String(c.n), f3(c.accuracy), f3(c.precision), f3(c.recall), f3(c.specificity), f3(c.f1), f3(c.roc_auc), `${c.confusion.tp}/${c.confusion.fp}/${c.confusion.tn}/${c.confusion.fn}`] : null;
  const rows = [cls('BraTS slices', r.classification.brats), cls('Kaggle images', r.classification.kaggle), cls('overall', r.classification.overall)].filter((x): x is string[] => x !== null);
  if (rows.length) out.push(table([['classification', 'n', 'accuracy', 'precision', 'recall', 'specificity', 'F1', 'ROC-AUC', 'TP/FP/TN/FN'], ...rows]));
  out.push(`combined (Dice + accuracy) / 2: ${f3(r.combined)}`);
  return out.join('\n\n');
}

export function formatPhases(p: PhaseComparison): string {
  return table([['phase', 'Dice', 'IoU', 'accuracy', 'F1', 'ROC-AUC', 'combined'], ...p.phases.map((r) => [r.phase, f3(r.dice), f3(r.iou), f3(r.accuracy), f3(r.f1), f3(r.roc_auc), f3(r.combined)])]);
}
