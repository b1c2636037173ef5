/**
 * The HTML the API serves at /ui: the runs list (rendered here, whole), the run page's shell (its sections are
 * filled by run.js from the REST API) and the error page. hono/html escapes every interpolated value.
 */
import { html, raw } from 'hono/html';
import type { HtmlEscapedString } from 'hono/utils/html';
import type { RunRow } from '../db/schema.ts';

type Html = HtmlEscapedString | Promise<HtmlEscapedString>;

const RUN_STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'] as const;

interface LayoutOptions {
  bullBoard: string | null;
  head?: Html;
  demo?: boolean;
  /** The visitor came in with the login cookie: the header offers to sign out (a header-token client has nothing to clear). */
  signOut?: boolean;
}

function layout(title: string, body: Html, { bullBoard, head, demo = false, signOut = false }: LayoutOptions): Html {
  return html`<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <title>${title} · SliceWise</title>
    <link rel="icon" href="data:," />
    <link rel="stylesheet" href="/ui/assets/style.css" />
    ${head ?? ''}
  </head>
  <body>
    <header class="topbar">
      <a class="brand" href="/ui">SliceWise</a>
      <nav>
        <a href="/ui">Runs</a>
        ${demo ? html`<a href="/ui/demo" id="nav-demo">Demo</a>` : ''}
        ${bullBoard ? html`<a href="${bullBoard}">Queues (Bull Board)</a>` : ''}
        <a href="/healthz">Health</a>
      </nav>
      ${signOut
        ? // A form, not a link: POST /logout, so that no link or prefetch can sign anyone out.
          html`<form class="signout" method="post" action="/logout"><button type="submit" id="sign-out">Sign out</button></form>`
        : ''}
    </header>
    <main>${body}</main>
  </body>
</html>`;
}

function when(d: Date | string | null | undefined): string {
  if (!d) return '—';
  const t = new Date(d);
  return t.toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
}

function duration(run: Pick<RunRow, 'startedAt' | 'finishedAt'>): string {
  if (!run.startedAt) return '—';
  const s = Math.round(((run.finishedAt ? new Date(run.finishedAt) : new Date()).getTime() - new Date(run.startedAt).getTime()) / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export interface RunsListView {
  runs: RunRow[];
  total: number;
  limit: number;
  offset: number;
  status?: string;
  bullBoard: string | null;
  /** The server serves the demo (/ui/demo). */
  demo?: boolean;
  /** Offer to sign out (the visitor came in with the login cookie). */
  signOut?: boolean;
}

/** The runs list: newest first, filter by status, paged. Refreshes itself while a run on it is still going. */
export function runsListPage(v: RunsListView): Html {
  const qs = (o: { status?: string; offset?: number }) => {
    const p = new URLSearchParams();
    if (o.status) p.set('status', o.status);
    if (o.offset) p.set('offset', String(o.offset));
    if (v.limit !== 20) p.set('limit', String(v.limit));
    const s = p.toString();
    return s ? `/ui?${s}` : '/ui';
  };
  const active = v.runs.some((r) => r.status === 'queued' || r.status === 'running');
  const body = html`
    <h1>Runs</h1>
    <p class="filters">
      <a class="${v.status ? '' : 'current'}" href="${qs({})}">all</a>
      ${RUN_STATUSES.map((s) => html`<a class="${v.status === s ? 'current' : ''}" href="${qs({ status: s })}">${s}</a>`)}
      <span class="muted">${v.total} run${v.total === 1 ? '' : 's'}</span>
    </p>
    ${v.runs.length === 0
      ? html`<p class="empty">No runs yet. Start one with <code>npx slicewise pipeline</code> or <code>POST /runs</code>.</p>`
      : html`<table class="grid runs">
          <thead>
            <tr><th>Run</th><th>Status</th><th>Mode</th><th>Training</th><th>Created</th><th>Duration</th><th>Error</th></tr>
          </thead>
          <tbody>
            ${v.runs.map(
              (r) => html`<tr>
                <td><a href="/ui/runs/${encodeURIComponent(r.id)}"><code>${r.id}</code></a></td>
                <td><span class="pill s-${r.status}">${r.status}</span></td>
                <td>${r.mode}</td>
                <td>${r.trainingMode}</td>
                <td>${when(r.createdAt)}</td>
                <td class="num">${duration(r)}</td>
                <td class="error-cell" title="${r.error ?? ''}">${r.error ?? ''}</td>
              </tr>`,
            )}
          </tbody>
        </table>`}
    <p class="pager">
      ${v.offset > 0 ? html`<a href="${qs({ status: v.status, offset: Math.max(0, v.offset - v.limit) })}">← newer</a>` : ''}
      ${v.offset + v.runs.length < v.total ? html`<a href="${qs({ status: v.status, offset: v.offset + v.limit })}">older →</a>` : ''}
    </p>`;
  // A whole-page refresh is enough for a list (the run page polls the API instead).
  return layout('Runs', body, { bullBoard: v.bullBoard, demo: v.demo, signOut: v.signOut, head: active ? html`<meta http-equiv="refresh" content="5" />` : undefined });
}

export interface RunPageBoot {
  runId: string;
  /** Bull Board: the base URL, each step's job and the run's queues; null when the API has no Bull Board. */
  bullBoard: { base: string; steps: Record<string, string>; queues: Record<string, string> } | null;
  /** The server serves the demo (/ui/demo): the run's header links it. */
  demo?: boolean;
}

/** The run page's shell: sections run.js fills from GET /runs/:id, /metrics, /evaluation and /artifacts. */
export function runPageShell(boot: RunPageBoot, { signOut = false }: { signOut?: boolean } = {}): Html {
  // JSON inside <script>: '<' escaped so no value can close the element.
  const bootJson = JSON.stringify(boot).replace(/</g, '\\u003c');
  const body = html`
    <section id="run-header" class="card"><h1>Run <code>${boot.runId}</code></h1><p class="muted">loading…</p></section>
    <div id="banner" class="banner" hidden></div>
    <section class="card">
      <h2>Steps</h2>
      <div id="steps"></div>
      <div id="patients"></div>
    </section>
    <section class="card">
      <h2>Training</h2>
      <div id="training"><p class="muted">No training metrics yet.</p></div>
    </section>
    <section class="card">
      <h2>Evaluation</h2>
      <div id="evaluation"><p class="muted">No evaluation yet.</p></div>
    </section>
    <section class="card">
      <h2>Phase comparison</h2>
      <div id="phases"><p class="muted">No phase comparison yet.</p></div>
    </section>
    <section class="card">
      <h2>Grad-CAM</h2>
      <div id="gradcam"><p class="muted">No Grad-CAM images yet.</p></div>
    </section>
    <section class="card">
      <h2>Artifacts</h2>
      <div id="artifacts"><p class="muted">No artifacts yet.</p></div>
    </section>
    <script type="application/json" id="boot">${raw(bootJson)}</script>
    <script src="/ui/vendor/chart.umd.js"></script>
    <script type="module" src="/ui/assets/run.js"></script>`;
  return layout(`Run ${boot.runId}`, body, { bullBoard: boot.bullBoard?.base ?? null, demo: boot.demo, signOut });
}

export interface DemoPageBoot {
  /** Largest upload, in bytes (the server's maxUploadBytes), to say so before sending. */
  maxUploadBytes: number;
  bullBoard: string | null;
}

/**
 * The demo page's shell: demo.js fills the model's card from GET /model/info, sends an upload to
 * /predict_multitask (one image) or /patient/analyze_stack (a NIfTI volume, or several images as slices) and shows
 * the answer.
 */
export function demoPageShell(boot: DemoPageBoot, { signOut = false }: { signOut?: boolean } = {}): Html {
  const bootJson = JSON.stringify(boot).replace(/</g, '\\u003c');
  const mb = Math.floor(boot.maxUploadBytes / (1024 * 1024));
  const body = html`
    <section id="model" class="card"><h1>Demo</h1><p class="muted">loading the served model…</p></section>
    <section class="card">
      <h2>Upload</h2>
      <form id="upload" class="upload">
        <input type="file" id="file" name="file" multiple accept=".png,.jpg,.jpeg,.nii,.gz,image/png,image/jpeg" />
        <label>threshold <input type="number" id="threshold" min="0" max="1" step="0.05" placeholder="model's" /></label>
        <label>min object size <input type="number" id="min-object-size" min="0" step="1" value="50" /></label>
        <button type="submit" id="analyze">Analyze</button>
        <span id="status" class="muted" aria-live="polite"></span>
      </form>
      <p class="muted">
        One PNG or JPEG image: its class, the tumour probability, the mask overlay (when p(tumour) ≥ 0.3) and the
        Grad-CAM. A NIfTI volume (.nii, .nii.gz), or several images as the slices of one: every slice's mask and the
        tumour volume. Up to ${mb} MB.
      </p>
    </section>
    <div id="error" class="banner error" hidden></div>
    <section id="result" class="card" hidden></section>
    <script type="application/json" id="boot">${raw(bootJson)}</script>
    <script type="module" src="/ui/assets/demo.js"></script>`;
  return layout('Demo', body, { bullBoard: boot.bullBoard, demo: true, signOut });
}

export function errorPage(status: number, message: string, bullBoard: string | null = null, { signOut = false }: { signOut?: boolean } = {}): Html {
  return layout(
    `Error ${status}`,
    html`<section class="card"><h1>${status === 404 ? 'Not found' : `Error ${status}`}</h1><p class="error">${message}</p><p><a href="/ui">All runs</a></p></section>`,
    { bullBoard, signOut },
  );
}
