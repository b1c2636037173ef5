// The demo page: the served model's card from GET /model/info; an upload goes to POST /predict_multitask (one PNG
// or JPEG) or POST /patient/analyze_stack (a NIfTI volume, or several images as the slices of one), and the answer
// is shown: the class, the probability, the mask overlay and the Grad-CAM side by side, or for a volume a slice
// slider with the mask over each slice and the tumour volume. Plain DOM; every value goes in as text or an
// attribute, never as HTML. body[data-state] is 'ready', 'busy', 'done' or 'error' (tests wait on it).

import { el } from './dom.js';

const boot = JSON.parse(document.getElementById('boot').textContent);
const form = document.getElementById('upload');
const input = document.getElementById('file');
const result = document.getElementById('result');
const errorBox = document.getElementById('error');
const statusLine = document.getElementById('status');


/** Figures to 3 decimals (as the run page shows them); '—' when missing. */
function fmt(v, digits = 3) {
  return v == null || Number.isNaN(v) ? '—' : Number(v).toFixed(digits);
}

const png = (b64) => `data:image/png;base64,${b64}`;
const label = (l) => (l === 'tumor' ? 'tumour' : 'no tumour');
const megabytes = (n) => `${(n / (1024 * 1024)).toFixed(n < 1024 * 1024 ? 2 : 0)} MB`;

function setState(state, text = '') {
  document.body.dataset.state = state;
  statusLine.textContent = text;
  form.querySelector('button').disabled = state === 'busy';
}

function showError(message) {
  errorBox.hidden = !message;
  errorBox.textContent = message ?? '';
}

async function api(url, init) {
  const res = await fetch(url, init);
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new Error(body?.error?.message ?? `${res.status} ${res.statusText}`);
  return body;
}

function tile(name, value, attrs = {}) {
  return el('div', { class: 'tile' }, el('span', {}, name), el('b', attrs, value));
}

function figure(caption, src, attrs) {
  return el('figure', {}, el('img', { src, alt: caption, ...attrs }), el('figcaption', {}, caption));
}

// ---------------------------------------------------------------------------------------------------------
// The served model
// ---------------------------------------------------------------------------------------------------------

function renderModel(m) {
  const ev = m.evaluation;
  const meta = [
    ['run', el('a', { href: `/ui/runs/${encodeURIComponent(m.run_id)}`, id: 'model-run' }, m.run_id)],
    ['training mode', m.training_mode],
    ['checkpoint', el('code', { title: m.checkpoint.sha256 }, `${m.checkpoint.stage} · sha256 ${m.checkpoint.sha256.slice(0, 12)}…`)],
    ['preset', m.preset ?? '—'],
    ['image size', `${m.image_size} x ${m.image_size}`],
    ['device', m.device ?? '—'],
    ['inference threads', String(m.threads)],
    ['test Dice (per slice / 3-D)', `${fmt(ev?.dice)} / ${fmt(ev?.dice_3d)}`],
    ['test accuracy / ROC AUC', `${fmt(ev?.accuracy)} / ${fmt(ev?.roc_auc)}`],
  ];
  document.getElementById('model').replaceChildren(
    el('h1', {}, 'Demo'),
    el('p', { class: 'muted' }, 'The served model: the final checkpoint of the run below.'),
    el('div', { class: 'meta' }, meta.map(([k, v]) => el('div', {}, el('span', {}, k), v))),
  );
}

// ---------------------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------------------

function renderImage(r, file) {
  const c = r.classification;
  const seg = r.segmentation;
  result.replaceChildren(
    el('h2', {}, r.file),
    el(
      'div',
      { class: 'tiles' },
      tile('Class', label(c.predicted_label), { id: 'cls', dataset: { label: c.predicted_label } }),
      tile('Tumour probability', fmt(c.tumor_probability), { id: 'prob' }),
      tile('Confidence', fmt(c.confidence)),
      tile('Tumour pixels', seg ? String(seg.tumor_pixels) : '—', { id: 'tumor-pixels' }),
      tile('Processing time', `${Math.round(r.processing_time_ms)} ms`),
    ),
    el(
      'div',
      { class: 'figures' },
      figure('Upload', URL.createObjectURL(file), { id: 'input-image' }),
      seg
        ? figure(`Mask overlay (threshold ${seg.threshold}, ${seg.tumor_pixels} px at ${r.image_size} x ${r.image_size})`, png(seg.overlay_png_base64), { id: 'overlay', class: 'model' })
        : el(
            'figure',
            {},
            el('div', { class: 'placeholder', id: 'no-overlay' }, `Not segmented: p(tumour) ${fmt(c.tumor_probability)} < ${r.segment_from}`),
            el('figcaption', {}, 'Mask overlay'),
          ),
      r.gradcam_overlay_png_base64
        ? figure(`Grad-CAM of the predicted class (${label(c.predicted_label)})`, png(r.gradcam_overlay_png_base64), { id: 'gradcam', class: 'model' })
        : null,
    ),
  );
}

function renderVolume(r) {
  const n = r.slices.length;
  let best = 0;
  r.slices.forEach((s, k) => {
    if (s.tumor_pixels > r.slices[best].tumor_pixels) best = k;
  });
  if (r.slices[best].tumor_pixels === 0) best = Math.floor(n / 2);
  const slider = el('input', { type: 'range', id: 'slice', min: 0, max: n - 1, step: 1, value: best, 'aria-label': 'slice' });
  const caption = el('figcaption', { id: 'slice-label' });
  const image = el('img', { id: 'slice-image', alt: 'slice with the mask in red', class: 'model' });
  const show = () => {
    const s = r.slices[Number(slider.value)];
    image.src = png(s.overlay_png_base64);
    image.dataset.slice = String(s.slice_idx);
    caption.textContent = `slice ${s.slice_idx + 1} of ${n}${s.file ? ` (${s.file})` : ''} · ${s.tumor_pixels} tumour pixels · p(tumour) ${fmt(s.tumor_probability)}`;
  };
  slider.addEventListener('input', show);
  const [sx, sy, sz] = r.voxel_spacing_mm;
  result.replaceChildren(
    el('h2', {}, r.input === 'nifti' ? r.file : `${r.files.length} slices`),
    el(
      'div',
      { class: 'tiles' },
      tile('Tumour volume', `${fmt(r.tumor_volume_ml)} ml`, { id: 'volume-ml', dataset: { ml: r.tumor_volume_ml } }),
      tile('Tumour voxels', String(r.tumor_voxels), { id: 'tumor-voxels' }),
      tile('Slices with tumour', `${r.slices_with_tumor} / ${r.slice_count}`, { id: 'slices-with-tumor' }),
      tile('Voxel size', `${sx} x ${sy} x ${sz} mm`, { id: 'voxel-size', title: r.spacing_source }),
      r.shape ? tile('Shape', r.shape.join(' x ')) : null,
      tile('Processing time', `${Math.round(r.processing_time_ms)} ms`),
    ),
    ...(r.spacing_note ? [el('p', { class: 'banner', id: 'spacing-note' }, r.spacing_note)] : []),
    el('div', { class: 'viewer' }, el('figure', {}, image, caption), slider),
  );
  show();
}

// ---------------------------------------------------------------------------------------------------------
// Upload
// ---------------------------------------------------------------------------------------------------------

/** A NIfTI volume by its first bytes (gzip, or a NIfTI-1/2 header size), as the server decides too. */
async function isVolume(file) {
  const b = new Uint8Array(await file.slice(0, 4).arrayBuffer());
  if (b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b) return true;
  if (b.length < 4) return false;
  const v = new DataView(b.buffer);
  return [348, 540].includes(v.getInt32(0, true)) || [348, 540].includes(v.getInt32(0, false));
}

async function analyze() {
  const files = [...input.files];
  if (files.length === 0) return;
  setState('busy', 'sending…');
  showError(null);
  const total = files.reduce((a, f) => a + f.size, 0);
  if (total > boot.maxUploadBytes) {
    showError(`${files.length === 1 ? files[0].name : 'these files'}: ${megabytes(total)}, over the server's limit of ${megabytes(boot.maxUploadBytes)}`);
    setState('error');
    return;
  }
  const params = new URLSearchParams();
  const threshold = document.getElementById('threshold').value;
  const minObject = document.getElementById('min-object-size').value;
  if (threshold !== '') params.set('threshold', threshold);
  if (minObject !== '') params.set('min_object_size', minObject);
  const body = new FormData();
  const single = files.length === 1 && !(await isVolume(files[0]));
  if (single) body.append('file', files[0]);
  else {
    for (const f of files) body.append('files', f);
    params.set('slice_overlays', 'true');
  }
  setState('busy', single ? 'analysing the image…' : 'analysing every slice…');
  try {
    const r = await api(`${single ? '/predict_multitask' : '/patient/analyze_stack'}?${params}`, { method: 'POST', body });
    result.hidden = false;
    result.dataset.kind = single ? 'image' : 'volume';
    result.dataset.file = single ? r.file : r.input === 'nifti' ? r.file : r.files.join(',');
    if (single) renderImage(r, files[0]);
    else renderVolume(r);
    setState('done', `done in ${Math.round(r.processing_time_ms)} ms`);
  } catch (err) {
    showError(err.message);
    setState('error');
  }
}

form.addEventListener('submit', (e) => {
  e.preventDefault();
  analyze();
});
input.addEventListener('change', () => analyze());

api('/model/info').then(
  (m) => {
    renderModel(m);
    setState('ready');
  },
  (err) => {
    document.getElementById('model').replaceChildren(el('h1', {}, 'Demo'), el('p', { class: 'error', id: 'model-error' }, err.message));
    setState('ready');
  },
);
