import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Hono } from 'hono';
import { z } from 'zod';
import type { AppContext } from '../context.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { ListRunsQuery } from '../runs/input.ts';
import { bullBoardLinks } from '../runs/reports.ts';
import { listRuns } from '../runs/service.ts';
import { demoPageShell, runPageShell, runsListPage } from '../web/pages.ts';
import type { AuthVariables } from './auth.ts';

const WEB_DIR = fileURLToPath(new URL('../web/', import.meta.url));
/** Chart.js's UMD build, from node_modules (pinned in package.json): our machines are offline, so no CDN. */
const CHART_JS = join(dirname(createRequire(import.meta.url).resolve('chart.js')), 'chart.umd.min.js');

/** The files of src/web a browser may fetch, by name. Nothing else in the folder is served. */
const ASSETS: Record<string, string> = {
  'run.js': 'text/javascript; charset=utf-8',
  'demo.js': 'text/javascript; charset=utf-8',
  'dom.js': 'text/javascript; charset=utf-8',
  'style.css': 'text/css; charset=utf-8',
};

const RunIdParam = z.object({ id: z.string().min(1).max(200) });

let chartJs: Promise<Uint8Array<ArrayBuffer>> | undefined;

export interface UiOptions {
  /** Bull Board's base path, or null when the API has none. */
  bullBoard: string | null;
  /** The demo's upload limit when the API serves the demo (its page is /ui/demo), else null. */
  demo?: { maxUploadBytes: number } | null;
}

/** The web UI: the runs list at /ui, a run's page at /ui/runs/:id, the demo at /ui/demo, and the static files they load. */
export function uiRoutes(ctx: AppContext, { bullBoard, demo = null }: UiOptions) {
  return new Hono<{ Variables: AuthVariables }>()
    .get('/', async (c) => {
      const q = ListRunsQuery.parse(c.req.query());
      const page = await listRuns(ctx, q);
      return c.html(runsListPage({ ...page, status: q.status, bullBoard, demo: Boolean(demo), signOut: c.get('viaCookie') }));
    })
    .get('/demo', (c) => {
      if (!demo) throw new SliceWiseError('this server does not serve the demo: start it with `slicewise pipeline --mode demo` or `slicewise api`', { status: 404, code: 'not_found' });
      return c.html(demoPageShell({ maxUploadBytes: demo.maxUploadBytes, bullBoard }, { signOut: c.get('viaCookie') }));
    })
    .get('/runs/:id', async (c) => {
      const { id } = RunIdParam.parse(c.req.param());
      // Also answers 404 (as a page) for an unknown run.
      const links = await bullBoardLinks(ctx, id, bullBoard ?? '');
      return c.html(runPageShell({ runId: id, bullBoard: bullBoard ? { base: bullBoard, ...links } : null, demo: Boolean(demo) }, { signOut: c.get('viaCookie') }));
    })
    .get('/assets/:file', async (c) => {
      const file = c.req.param('file');
      const type = ASSETS[file];
      if (!type) throw new SliceWiseError(`no asset ${file}`, { status: 404, code: 'not_found' });
      return c.body(await readFile(join(WEB_DIR, file)), 200, { 'content-type': type, 'cache-control': 'no-cache' });
    })
    .get('/vendor/chart.umd.js', async (c) => {
      chartJs ??= readFile(CHART_JS).catch((err) => {
        chartJs = undefined;
        throw err;
      });
      return c.body(await chartJs, 200, { 'content-type': 'text/javascript; charset=utf-8', 'cache-control': 'public, max-age=3600' });
    })
    .all('*', (c) => {
      throw new SliceWiseError(`no page at ${c.req.path}`, { status: 404, code: 'not_found' });
    });
}
