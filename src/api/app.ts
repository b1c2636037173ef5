import { Hono } from 'hono';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { HonoAdapter } from '@bull-board/hono';
import { serveStatic } from '@hono/node-server/serve-static';
import type { AppContext } from '../context.ts';
import { pingDb } from '../db/client.ts';
import type { DemoService } from '../serving/demo-service.ts';
import { demoRoutes } from './demo.ts';
import { errorResponse } from './errors.ts';
import { runsRoutes } from './runs.ts';
import { uiRoutes } from './ui.ts';

const BULL_BOARD_PATH = '/admin/queues';

export interface ApiOptions {
  /** Mount Bull Board at /admin/queues. Default: true. */
  bullBoard?: boolean;
  /** Serve the demo (its endpoints, /model/info and the page /ui/demo) with this model service. Default: none. */
  demo?: DemoService;
}

export function createApp(ctx: AppContext, { bullBoard = true, demo }: ApiOptions = {}) {
  const app = new Hono();
  app.onError(errorResponse);
  app.notFound((c) => c.json({ error: { code: 'not_found', message: `no route for ${c.req.method} ${c.req.path}` } }, 404));

  app.get('/healthz', async (c) => {
    const check = async (fn: () => Promise<unknown>) => {
      try {
        await fn();
        return { ok: true as const };
      } catch (err) {
        return { ok: false as const, error: (err as Error).message };
      }
    };
    const [redis, postgres] = await Promise.all([
      check(() => Promise.race([ctx.redis.ping(), new Promise((_, rej) => setTimeout(() => rej(new Error('Redis did not answer PING within 2 s')), 2000))])),
      check(() => pingDb(ctx.db)),
    ]);
    const ok = redis.ok && postgres.ok;
    return c.json({ ok, redis, postgres }, ok ? 200 : 503);
  });

  app.route('/runs', runsRoutes(ctx));
  if (demo) app.route('/', demoRoutes(demo));
  app.get('/', (c) => c.redirect('/ui'));
  app.route('/ui', uiRoutes(ctx, { bullBoard: bullBoard ? BULL_BOARD_PATH : null, demo: demo ? { maxUploadBytes: demo.limits.maxUploadBytes } : null }));

  if (bullBoard) {
    const board = new HonoAdapter(serveStatic);
    createBullBoard({ queues: Object.values(ctx.queues).map((q) => new BullMQAdapter(q, { readOnlyMode: false })), serverAdapter: board, options: { uiConfig: { boardTitle: 'SliceWise queues' } } });
    board.setBasePath(BULL_BOARD_PATH);
    app.route(BULL_BOARD_PATH, board.registerPlugin());
  }
  return app;
}
