import { Hono, type Context } from 'hono';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { HonoAdapter } from '@bull-board/hono';
import { serveStatic } from '@hono/node-server/serve-static';
import type { AppContext } from '../context.ts';
import { pingDb } from '../db/client.ts';
import type { DemoService } from '../serving/demo-service.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { requireToken, roleOf, type AuthVariables, type TokenStore } from './auth.ts';
import { demoRoutes } from './demo.ts';
import { errorResponse } from './errors.ts';
import { loginRoutes } from './login.ts';
import { SignInLimiter } from './sign-in-limit.ts';
import { runsRoutes } from './runs.ts';
import { uiRoutes } from './ui.ts';

const BULL_BOARD_PATH = '/admin/queues';

export interface ApiOptions {
  /** Mount Bull Board at /admin/queues. Default: true. */
  bullBoard?: boolean;
  /** Serve the demo (its endpoints, /model/info and the page /ui/demo) with this model service. Default: none. */
  demo?: DemoService;
  /**
   * Require a token (roles `user` and `admin`) on every route but /healthz and the login pages. Default: none,
   * an open API, which `slicewise api` allows on loopback only.
   */
  auth?: TokenStore;
}

export function createApp(ctx: AppContext, { bullBoard = true, demo, auth }: ApiOptions = {}) {
  const app = new Hono<{ Variables: AuthVariables }>();
  app.onError(errorResponse);
  const notFound = (c: Context) => c.json({ error: { code: 'not_found', message: `no route for ${c.req.method} ${c.req.path}` } }, 404);
  app.notFound(notFound);
  if (auth) {
    // One budget of wrong tokens per client address for the form and the header alike (see SignInLimiter).
    const limiter = new SignInLimiter({ logger: ctx.logger });
    app.use('*', requireToken(auth, limiter));
    app.route('/', loginRoutes(auth, ctx.logger, limiter));
  }

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
    // Two boards over the same queues: admins get the actions (retry, clean, promote, remove, pause...), users a
    // read-only one whose UI hides them and whose API refuses them. Refusing every non-GET of its API to a
    // non-admin below is the second lock, in case a Bull Board upgrade lets a read-only board change something.
    const boards = { admin: boardApp(ctx, false, notFound), user: boardApp(ctx, true, notFound) };
    const serveBoard = (c: Context<{ Variables: AuthVariables }>) => {
      const role = roleOf(c, Boolean(auth));
      if (role !== 'admin' && c.req.path.startsWith(`${BULL_BOARD_PATH}/api/`) && c.req.method !== 'GET' && c.req.method !== 'HEAD') {
        throw new SliceWiseError(`Bull Board's actions need an admin token; token ${c.get('principal')?.name} has the ${role} role (read-only)`, { status: 403, code: 'forbidden' });
      }
      return boards[role].fetch(c.req.raw, c.env);
    };
    app.all(BULL_BOARD_PATH, serveBoard);
    app.all(`${BULL_BOARD_PATH}/*`, serveBoard);
  }
  return app;
}

/** One Bull Board at BULL_BOARD_PATH over the context's queues, read-only or not. */
function boardApp(ctx: AppContext, readOnlyMode: boolean, notFound: (c: Context) => Response) {
  const board = new HonoAdapter(serveStatic);
  createBullBoard({ queues: Object.values(ctx.queues).map((q) => new BullMQAdapter(q, { readOnlyMode })), serverAdapter: board, options: { uiConfig: { boardTitle: 'SliceWise queues' } } });
  board.setBasePath(BULL_BOARD_PATH);
  const app = new Hono().route(BULL_BOARD_PATH, board.registerPlugin());
  app.onError(errorResponse);
  app.notFound(notFound);
  return app;
}
