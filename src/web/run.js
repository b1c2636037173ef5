// The run page: fills the shell's sections from the REST API (GET /runs/:id, /metrics, /evaluation,
// /artifacts) and keeps them current while the run is going. Plain DOM and Chart.js (loaded before this module
// from node_modules as a global); every value goes in through textContent, never as HTML.
//
// Live progress is polling, every 2 s, until the run is settled. Steps' progress lives in Postgres rows that
// workers in other processes write, with no change notifications: server-sent events would only move this
// poll into the server (one loop per open page) and hold a connection open through every proxy on the way.
// Polling reuses the REST API as it is, survives an API restart, and costs one small request per 2 s.

import { el } from './dom.js';

const POLL_MS = 2000;
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const boot = JSON.parse(document.getElementById('boot').textContent);
const runId = boot.runId;
const api = `/runs/${encodeURIComponent(runId)}`;

const STAGES = {
  train_stage1_seg_warmup: 'Stage 1 · segmentation warm-up',
  train_stage2_cls_head: 'Stage 2 · classification head',
  train_stage3_joint: 'Stage 3 · joint training',
};
const COLORS = {
  train_loss: '#2f6fdb',
  val_loss: '#e07b00',
  val_dice: '#1f8a4c',
  val_iou: '#16a2a2',
  val_accuracy: '#7a4cc2',
  val_f1: '#c2417a',
  val_auc: '#6b7385',
  val_combined: '#1d2330',
  dice: '#1f8a4c',
  iou: '#16a2a2',
  accuracy: '#7a4cc2',
  f1: '#c2417a',
  roc_auc: '#6b7385',
  combined: '#1d2330',
};
const LABELS = {
  train_loss: 'train loss',
  val_loss: 'val loss',
  val_dice: 'val Dice',
  val_iou: 'val IoU',
  val_accuracy: 'val accuracy',
  val_f1: 'val F1',
  val_auc: 'val ROC AUC',
  val_combined: 'val combined',
};
/** The two charts of a stage: losses, and the validation figures in [0, 1]. */
const CHARTS = [
  { key: 'loss', title: 'Loss', names: ['train_loss', 'val_loss'] },
  { key: 'val', title: 'Validation', names: ['val_dice', 'val_iou', 'val_accuracy', 'val_f1', 'val_auc'], unit: true },
];

// ---------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------


function fill(id, ...children) {
  const target = document.getElementById(id);
  target.replaceChildren(...children.flat().filter(Boolean));
  return target;
}

/** Figures to 3 decimals; integers (counts) as they are; '—' for a missing figure. */
function fmt(v, kind = 'fixed') {
  if (v == null || Number.isNaN(v)) return '—';
  if (kind === 'int') return String(Math.round(v));
  return Number(v).toFixed(3);
}

function seconds(s) {
  if (s == null) return '—';
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function when(t) {
  return t ? new Date(t).toLocaleString() : '—';
}

function bytes(n) {
  if (n == null) return '—';
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) (n /= 1024), i++;
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

const pill = (status) => el('span', { class: `pill s-${status}` }, status);

/** A checkpoint folder without the data dir and run in front (`joint/best`), the whole path as its tooltip. */
function checkpointLabel(path) {
  const marker = `/checkpoints/${runId}/`;
  const i = path?.indexOf(marker) ?? -1;
  return el('span', { title: path ?? '' }, i >= 0 ? path.slice(i + marker.length) : path ?? '—');
}

async function getJSON(url) {
  const res = await fetch(url, { headers: { accept: 'application/json' } });
  if (!res.ok) {
    let msg = `${res.status}`;
    try {
      msg = (await res.json()).error?.message ?? msg;
    } catch {}
    throw new Error(`${url}: ${msg}`);
  }
  return res.json();
}

/** A value of the evaluation report at a dotted path, e.g. 'multitask.classification.overall.accuracy'. */
function at(obj, path) {
  return path.split('.').reduce((o, k) => (o == null ? undefined : o[k]), obj);
}

/** A table cell bound to a figure of the evaluation: data-eval names where the value comes from. */
function evalCell(report, path, kind = 'fixed') {
  return el('td', { class: 'num', dataset: { eval: path, format: kind } }, fmt(at(report, path), kind));
}

// ---------------------------------------------------------------------------------------------------------
// Header, steps, patients
// ---------------------------------------------------------------------------------------------------------

function runDuration(run) {
  if (!run.startedAt) return null;
  return ((run.finishedAt ? new Date(run.finishedAt) : new Date()) - new Date(run.startedAt)) / 1000;
}

function renderHeader(run) {
  const bb = boot.bullBoard;
  const src = run.sources ?? {};
  const meta = [
    ['Mode', run.mode],
    ['Training mode', run.trainingMode],
    ['Device', run.device ?? '—'],
    ['Sources', `brats ${src.brats ?? '—'} · kaggle ${src.kaggle ?? '—'}`],
    ['Created', when(run.createdAt)],
    ['Started', when(run.startedAt)],
    ['Finished', when(run.finishedAt)],
    ['Duration', seconds(runDuration(run))],
    ...(run.dataRunId ? [['Data from run', run.dataRunId]] : []),
    ['Data dir', run.dataDir],
  ];
  fill(
    'run-header',
    el('h1', {}, 'Run ', el('code', {}, run.id), ' ', pill(run.status)),
    run.error ? el('p', { class: 'error' }, run.error) : null,
    el('div', { class: 'meta' }, meta.map(([k, v]) => el('div', {}, el('span', {}, k), v))),
    el(
      'div',
      { class: 'links' },
      el('a', { href: api }, 'run JSON'),
      el('a', { href: `${api}/results` }, 'pipeline_results.json'),
      el('a', { href: `${api}/metrics` }, 'metrics JSON'),
      el('a', { href: `${api}/evaluation` }, 'evaluation JSON'),
      bb?.steps.finalize ? el('a', { href: bb.steps.finalize, id: 'bull-board-run' }, "the run's flow in Bull Board") : null,
      boot.demo ? el('a', { href: '/ui/demo', id: 'demo-link' }, 'the demo (try the served model)') : null,
      ...Object.entries(bb?.queues ?? {}).map(([q, url]) => el('a', { href: url }, `${q} queue`)),
    ),
  );
}

function progressBar(s) {
  const c = s.counts ?? {};
  if (!(c.total > 0)) return null;
  const done = Math.min(c.done ?? 0, c.total);
  const unit = s.name.startsWith('train_') ? 'epochs' : { preprocess_brats: 'patients', preprocess_kaggle: 'images', generate_gradcam: 'images', compare_phases: 'phases' }[s.name] ?? '';
  const bar = el('div', { class: `bar ${s.status === 'success' ? 'done' : s.status === 'failed' ? 'failed' : ''}` }, el('i', { style: `width:${(100 * done) / c.total}%` }), el('b', {}, `${done} / ${c.total} ${unit}`));
  return bar;
}

const HIDDEN_COUNTS = new Set(['done', 'total', 'epoch', 'epochs']);

function renderSteps(run) {
  const links = boot.bullBoard?.steps ?? {};
  const rows = [];
  for (const s of run.steps) {
    const counts = Object.entries(s.counts ?? {}).filter(([k]) => !HIDDEN_COUNTS.has(k));
    const eta = s.status === 'running' && s.counts?.eta_seconds != null ? `ETA ${seconds(s.counts.eta_seconds)}` : null;
    rows.push(
      el(
        'tr',
        { dataset: { step: s.name } },
        el('td', {}, el('code', {}, s.name), el('div', { class: 'counts' }, s.queue)),
        el('td', {}, pill(s.status)),
        el('td', { class: 'num' }, s.attempts),
        el('td', {}, when(s.startedAt)),
        el('td', { class: 'num' }, seconds(s.durationSeconds ?? (s.status === 'running' && s.startedAt ? (Date.now() - new Date(s.startedAt)) / 1000 : null))),
        el('td', {}, progressBar(s), el('div', { class: 'counts' }, [counts.filter(([k]) => k !== 'eta_seconds').map(([k, v]) => `${k} ${v}`).join(' · '), eta].filter(Boolean).join(' · '))),
        el('td', {}, links[s.name] ? el('a', { href: links[s.name] }, 'job') : ''),
      ),
    );
    if (s.error) rows.push(el('tr', { class: 'error-row' }, el('td', { colspan: 7 }, `${s.name}: ${s.error}`)));
  }
  fill(
    'steps',
    el(
      'table',
      { class: 'grid' },
      el('thead', {}, el('tr', {}, ['Step', 'Status', 'Attempts', 'Started', 'Duration', 'Progress', 'Bull Board'].map((h, i) => el('th', { class: i === 2 || i === 4 ? 'num' : null }, h)))),
      el('tbody', {}, rows),
    ),
  );
}

function renderPatients(run) {
  const ps = run.patients ?? [];
  if (ps.length === 0) return fill('patients');
  const tally = (key) => Object.entries(ps.reduce((m, p) => ((m[p[key] ?? 'none'] = (m[p[key] ?? 'none'] ?? 0) + 1), m), {})).map(([k, n]) => `${n} ${k}`).join(' · ');
  const open = document.querySelector('#patients details')?.open ?? ps.length <= 12;
  fill(
    'patients',
    el(
      'details',
      { open },
      el('summary', {}, `${ps.length} patients: ${tally('status')}; split ${tally('split')}${run.kaggleRejected ? `; ${run.kaggleRejected} Kaggle images rejected` : ''}`),
      el(
        'table',
        { class: 'grid' },
        el('thead', {}, el('tr', {}, el('th', {}, 'Patient'), el('th', {}, 'Status'), el('th', {}, 'Split'), el('th', { class: 'num' }, 'Slices'), el('th', { class: 'num' }, 'Tumour slices'), el('th', {}, 'Error'))),
        el(
          'tbody',
          {},
          ps.map((p) =>
            el('tr', {}, el('td', {}, el('code', {}, p.patientId)), el('td', {}, pill(p.status)), el('td', {}, p.split ?? '—'), el('td', { class: 'num' }, p.slices ?? '—'), el('td', { class: 'num' }, p.tumorSlices ?? '—'), el('td', { class: 'error' }, p.error ?? '')),
          ),
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------------------
// Training curves
// ---------------------------------------------------------------------------------------------------------

const charts = new Map(); // `${step}/${chart}` -> Chart

function datasetsFor(series, names) {
  return names
    .filter((n) => series[n]?.some((v) => v != null))
    .map((n) => ({ label: LABELS[n] ?? n, data: series[n], borderColor: COLORS[n], backgroundColor: COLORS[n], pointRadius: 3, borderWidth: 2, spanGaps: true, tension: 0.15 }));
}

function lineOptions(unit) {
  return {
    animation: false,
    maintainAspectRatio: false,
    interaction: { mode: 'index', intersect: false },
    plugins: { legend: { position: 'bottom', labels: { boxWidth: 12 } }, tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${fmt(c.parsed.y)}` } } },
    scales: { x: { title: { display: true, text: 'epoch' } }, y: unit ? { min: 0, max: 1 } : { beginAtZero: false } },
  };
}

function renderTraining(metrics, run) {
  const steps = Object.entries(metrics.steps).filter(([step]) => step in STAGES || step.startsWith('train_'));
  if (steps.length === 0) return;
  const container = document.getElementById('training');
  if (!container.querySelector('.stages')) container.replaceChildren(el('div', { class: 'stages' }));
  const stages = container.querySelector('.stages');
  for (const [step, { epochs, series }] of steps) {
    let card = stages.querySelector(`[data-stage="${step}"]`);
    if (!card) {
      card = el(
        'div',
        { class: 'stage', dataset: { stage: step } },
        el('header', {}, el('h3', {}, STAGES[step] ?? step), el('span', { class: 'counts' })),
        el('div', { class: 'charts' }, CHARTS.map((c) => el('div', {}, el('div', { class: 'counts' }, c.title), el('div', { class: 'chart' }, el('canvas', { dataset: { step, chart: c.key } }))))),
      );
      stages.append(card);
    }
    const info = run.steps.find((s) => s.name === step);
    const last = epochs.length - 1;
    const best = info?.counts?.best_epoch;
    card.querySelector('header .counts').textContent = [
      `${epochs.length} epoch${epochs.length === 1 ? '' : 's'}`,
      best != null ? `best epoch ${best}` : null,
      last >= 0 && series.train_loss ? `last train loss ${fmt(series.train_loss[last])}` : null,
      last >= 0 && series.val_metric ? `last val metric ${fmt(series.val_metric[last])}` : null,
    ]
      .filter(Boolean)
      .join(' · ');
    for (const c of CHARTS) {
      const id = `${step}/${c.key}`;
      const data = { labels: epochs, datasets: datasetsFor(series, c.names) };
      const chart = charts.get(id);
      if (chart) {
        chart.data = data;
        chart.update('none');
      } else {
        const canvas = card.querySelector(`canvas[data-chart="${c.key}"]`);
        charts.set(id, new Chart(canvas, { type: 'line', data, options: lineOptions(c.unit) }));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Evaluation and phase comparison
// ---------------------------------------------------------------------------------------------------------

function renderEvaluation(ev) {
  const mt = ev.multitask;
  if (!mt) return fill('evaluation', el('p', { class: 'muted' }, 'No evaluation yet.'));
  const seg = mt.segmentation;
  const tile = (label, path) => el('div', { class: 'tile' }, el('span', {}, label), el('b', { dataset: { eval: path, format: 'fixed' } }, fmt(at(ev, path))));
  const tiles = el(
    'div',
    { class: 'tiles' },
    tile('Combined', 'multitask.combined'),
    seg ? tile('Dice per slice', 'multitask.segmentation.per_slice.dice.mean') : null,
    seg ? tile('Dice per patient (3-D)', 'multitask.segmentation.per_patient_3d.mean_dice') : null,
    tile('Accuracy (all)', 'multitask.classification.overall.accuracy'),
    tile('ROC AUC (all)', 'multitask.classification.overall.roc_auc'),
  );
  const segTable = seg
    ? el(
        'table',
        { class: 'grid', id: 'segmentation-table' },
        el('thead', {}, el('tr', {}, el('th', {}, 'Segmentation'), el('th', { class: 'num' }, 'Dice'), el('th', { class: 'num' }, '± std'), el('th', { class: 'num' }, 'IoU'), el('th', { class: 'num' }, '± std'), el('th', { class: 'num' }, 'n'))),
        el(
          'tbody',
          {},
          el('tr', {}, el('td', {}, `per slice (all kept test slices; ${seg.per_slice.empty_both} empty in both count as 1)`), ...['dice.mean', 'dice.std', 'iou.mean', 'iou.std'].map((k) => evalCell(ev, `multitask.segmentation.per_slice.${k}`)), evalCell(ev, 'multitask.segmentation.per_slice.slices', 'int')),
          el('tr', {}, el('td', {}, 'per slice, tumour in truth or prediction'), ...['dice.mean', 'dice.std', 'iou.mean', 'iou.std'].map((k) => evalCell(ev, `multitask.segmentation.per_slice_non_empty.${k}`)), evalCell(ev, 'multitask.segmentation.per_slice_non_empty.dice.n', 'int')),
          el('tr', {}, el('td', {}, 'per patient, whole volume (3-D), mean'), evalCell(ev, 'multitask.segmentation.per_patient_3d.mean_dice'), el('td'), evalCell(ev, 'multitask.segmentation.per_patient_3d.mean_iou'), el('td'), el('td', { class: 'num' }, seg.per_patient_3d.patients.length)),
          el('tr', {}, el('td', {}, 'per patient, whole volume (3-D), median'), evalCell(ev, 'multitask.segmentation.per_patient_3d.median_dice'), el('td'), el('td'), el('td'), el('td')),
        ),
      )
    : el('p', { class: 'muted' }, 'No segmentation figures.');
  const cols = ['n', 'accuracy', 'precision', 'recall', 'specificity', 'f1', 'roc_auc'];
  const heads = ['n', 'Accuracy', 'Precision', 'Recall', 'Specificity', 'F1', 'ROC AUC', 'TP', 'FP', 'TN', 'FN'];
  const clsTable = el(
    'table',
    { class: 'grid', id: 'classification-table' },
    el('thead', {}, el('tr', {}, el('th', {}, 'Classification'), heads.map((h) => el('th', { class: 'num' }, h)))),
    el(
      'tbody',
      {},
      ['brats', 'kaggle', 'overall'].map((set) => {
        const base = `multitask.classification.${set}`;
        if (!at(ev, base)) return el('tr', {}, el('td', {}, set), el('td', { colspan: heads.length, class: 'muted' }, 'not evaluated'));
        return el(
          'tr',
          {},
          el('td', {}, set === 'overall' ? 'all' : set === 'brats' ? 'BraTS slices' : 'Kaggle images'),
          cols.map((k) => evalCell(ev, `${base}.${k}`, k === 'n' ? 'int' : 'fixed')),
          ['tp', 'fp', 'tn', 'fn'].map((k) => evalCell(ev, `${base}.confusion.${k}`, 'int')),
        );
      }),
    ),
  );
  const patients = seg?.per_patient_3d.patients ?? [];
  const perPatient = patients.length
    ? el(
        'details',
        {},
        el('summary', {}, `Dice per test patient (${patients.length})`),
        el(
          'table',
          { class: 'grid' },
          el('thead', {}, el('tr', {}, el('th', {}, 'Patient'), ['Dice', 'IoU', 'Slices', 'True voxels', 'Predicted voxels'].map((h) => el('th', { class: 'num' }, h)))),
          el(
            'tbody',
            {},
            patients.map((p, i) => {
              const base = `multitask.segmentation.per_patient_3d.patients.${i}`;
              return el('tr', {}, el('td', {}, el('code', {}, p.patient_id)), evalCell(ev, `${base}.dice`), evalCell(ev, `${base}.iou`), evalCell(ev, `${base}.slices`, 'int'), evalCell(ev, `${base}.true_voxels`, 'int'), evalCell(ev, `${base}.predicted_voxels`, 'int'));
            }),
          ),
        ),
      )
    : null;
  fill(
    'evaluation',
    el('p', { class: 'muted' }, `${mt.dataset}; checkpoint `, checkpointLabel(mt.checkpoint?.dir), `; evaluated in ${seconds(mt.seconds)}, ${when(mt.created_at)}`),
    tiles,
    segTable,
    el('div', { style: 'height:12px' }),
    clsTable,
    perPatient,
  );
}

let phaseChart = null;
const PHASE_FIGURES = [
  ['dice', 'Dice'],
  ['iou', 'IoU'],
  ['accuracy', 'Accuracy'],
  ['f1', 'F1'],
  ['roc_auc', 'ROC AUC'],
  ['combined', 'Combined'],
];

function renderPhases(ev) {
  const pc = ev.phase_comparison;
  if (!pc?.phases?.length) return;
  phaseChart?.destroy();
  const canvas = el('canvas', { id: 'phase-chart' });
  fill(
    'phases',
    el('div', { class: 'chart wide' }, canvas),
    el(
      'table',
      { class: 'grid', id: 'phase-table', style: 'margin-top:12px' },
      el('thead', {}, el('tr', {}, el('th', {}, 'Phase'), el('th', {}, 'Checkpoint'), PHASE_FIGURES.map(([, h]) => el('th', { class: 'num' }, h)))),
      el(
        'tbody',
        {},
        pc.phases.map((p, i) => el('tr', {}, el('td', {}, p.phase, el('div', { class: 'counts' }, p.step)), el('td', { class: 'counts' }, checkpointLabel(p.checkpoint)), PHASE_FIGURES.map(([k]) => evalCell(ev, `phase_comparison.phases.${i}.${k}`)))),
      ),
    ),
  );
  phaseChart = new Chart(canvas, {
    type: 'bar',
    data: {
      labels: pc.phases.map((p) => p.phase),
      datasets: PHASE_FIGURES.map(([k, label]) => ({ label, data: pc.phases.map((p) => p[k]), backgroundColor: COLORS[k] })),
    },
    options: {
      animation: false,
      maintainAspectRatio: false,
      plugins: { legend: { position: 'bottom', labels: { boxWidth: 12 } }, tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${fmt(c.parsed.y)}` } } },
      scales: { y: { min: 0, max: 1 } },
    },
  });
}

// ---------------------------------------------------------------------------------------------------------
// Grad-CAM gallery and artifacts
// ---------------------------------------------------------------------------------------------------------

const GRADCAM_NAME = /gradcam_(\d+)_([a-z]+)_pred(\d+)_true(\d+)\.png$/;
const CLASS = ['no tumour', 'tumour'];

function renderGallery(list) {
  const images = list.filter((a) => a.kind === 'gradcam' && a.url).sort((a, b) => a.path.localeCompare(b.path));
  if (images.length === 0) return;
  fill(
    'gradcam',
    el(
      'div',
      { class: 'gallery' },
      images.map((a) => {
        const m = GRADCAM_NAME.exec(a.path);
        const caption = m
          ? [el('span', {}, `#${Number(m[1])} · ${m[2] === 'brats' ? 'BraTS' : m[2] === 'kaggle' ? 'Kaggle' : m[2]}`), el('span', { class: m[3] === m[4] ? 'right' : 'wrong', title: `predicted ${CLASS[m[3]] ?? m[3]}, true ${CLASS[m[4]] ?? m[4]}` }, `pred ${CLASS[m[3]] ?? m[3]} / true ${CLASS[m[4]] ?? m[4]}`)]
          : [el('span', {}, a.path.split('/').pop())];
        return el('figure', {}, el('a', { href: a.url, target: '_blank' }, el('img', { src: a.url, alt: a.path.split('/').pop(), class: 'gradcam' })), el('figcaption', {}, caption));
      }),
    ),
  );
}

function renderArtifacts(list) {
  if (list.length === 0) return;
  const open = document.querySelector('#artifacts details')?.open ?? false;
  fill(
    'artifacts',
    el(
      'details',
      { open },
      el('summary', {}, `${list.length} files (${bytes(list.reduce((s, a) => s + (a.bytes ?? 0), 0))}): checkpoints, splits, images; each with its sha256`),
      el(
        'table',
        { class: 'grid' },
        el('thead', {}, el('tr', {}, el('th', {}, 'Step'), el('th', {}, 'Kind'), el('th', {}, 'File'), el('th', { class: 'num' }, 'Size'), el('th', {}, 'sha256'))),
        el(
          'tbody',
          {},
          list.map((a) =>
            el(
              'tr',
              {},
              el('td', {}, a.step),
              el('td', {}, a.kind),
              el('td', {}, a.url ? el('a', { href: a.url }, a.id) : el('span', { class: 'muted' }, a.path)),
              el('td', { class: 'num' }, bytes(a.bytes)),
              el('td', {}, el('code', { title: a.sha256 ?? '' }, a.sha256 ? `${a.sha256.slice(0, 12)}…` : '—')),
            ),
          ),
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------------------
// The poll loop
// ---------------------------------------------------------------------------------------------------------

let lastEpochs = null; // which epochs the charts show: metrics are fetched again when it changes
let lastSteps = null; // the steps' statuses: evaluation and artifacts are fetched again when it changes

async function refresh() {
  const banner = document.getElementById('banner');
  let run;
  try {
    run = await getJSON(api);
    banner.hidden = true;
    renderHeader(run);
    renderSteps(run);
    renderPatients(run);
    const epochs = JSON.stringify(run.steps.map((s) => s.latestEpoch?.epoch ?? null));
    const stepKey = JSON.stringify(run.steps.map((s) => s.status));
    const [metrics, evaluation, artifacts] = await Promise.all([
      epochs !== lastEpochs ? getJSON(`${api}/metrics`) : null,
      stepKey !== lastSteps ? getJSON(`${api}/evaluation`) : null,
      stepKey !== lastSteps ? getJSON(`${api}/artifacts`) : null,
    ]);
    if (metrics) renderTraining(metrics, run);
    if (evaluation) {
      renderEvaluation(evaluation);
      renderPhases(evaluation);
    }
    if (artifacts) {
      renderGallery(artifacts.artifacts);
      renderArtifacts(artifacts.artifacts);
    }
    lastEpochs = epochs;
    lastSteps = stepKey;
    document.body.dataset.status = run.status;
    document.body.dataset.ready = 'true';
  } catch (err) {
    banner.hidden = false;
    banner.textContent = `Could not refresh (${err.message}); retrying every ${POLL_MS / 1000} s.`;
  }
  if (!run || !TERMINAL.has(run.status)) setTimeout(refresh, POLL_MS);
}

Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
Chart.defaults.color = '#4a5163';
refresh();
