import { Readable } from 'node:stream';
import { Hono, type Context } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { z } from 'zod';
import type { AppContext } from '../context.ts';
import { CreateRunSchema, ListRunsQuery } from '../runs/input.ts';
import { ArtifactIdSchema, getEvaluation, getMetricSeries, listRunArtifacts, openArtifact } from '../runs/reports.ts';
import { cancelRun, createRun, getRunDetail, getRunResults, listRuns, retryStep } from '../runs/service.ts';
import { SliceWiseError } from '../lib/errors.ts';

async function jsonBody(req: Request): Promise<unknown> {
  const text = await req.text();
  if (!text.trim()) return {};
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new SliceWiseError(`request body is not valid JSON: ${(err as Error).message}`, { status: 400, code: 'invalid_json', cause: err });
  }
}

/** Printable ASCII (spaces allowed inside), as most clients make them: a UUID, "nightly-2026-11-26". */
const IdempotencyHeader = z.object({
  'Idempotency-Key': z
    .string()
    .regex(/^[\x20-\x7e]*$/, 'printable ASCII only')
    .trim()
    .min(1, 'must not be empty')
    .max(255, 'at most 255 characters')
    .optional(),
});
/** POST /runs is described by its body alone: a query parameter is a mistake to name, not to ignore. */
const NoQuery = z.record(z.string(), z.never({ error: 'POST /runs takes no query parameters; the run is described by the JSON body' }));

/**
 * Whose Idempotency-Key it is: with tokens on, the token's principal (set by the auth middleware), so two
 * clients choosing the same key get two runs, and one client keeps its keys across a token rotation; an open
 * API has one scope, ''.
 */
type RunsEnv = { Variables: { principal?: { name: string } } };
function idempotencyScope(c: Context<RunsEnv>): string {
  const principal = c.get('principal');
  return principal ? `principal:${principal.name}` : '';
}

/** Run ids are made by newRunId; anything else (a NUL, a path) is refused before it reaches a query. */
const RunIdParam = z.object({ id: z.string().regex(/^[A-Za-z0-9._-]{1,100}$/, 'not a run id (letters, digits, ".", "_" and "-", at most 100)') }).loose();
const ArtifactParams = z.object({ id: z.string().min(1), artifact: ArtifactIdSchema });
/** Over HTTP the data dir is the operator's (the server's), never the caller's. */
const CreateRunBody = CreateRunSchema.omit({ dataDir: true });
/** A run request is a few hundred bytes; anything near this is not one. */
const MAX_RUN_REQUEST_BYTES = 64 * 1024;

export function runsRoutes(ctx: AppContext) {
  return new Hono<RunsEnv>()
    .use('/:id', async (c, next) => {
      RunIdParam.parse(c.req.param());
      await next();
    })
    .use('/:id/*', async (c, next) => {
      RunIdParam.parse(c.req.param());
      await next();
    })
    .post(
      '/',
      bodyLimit({
        maxSize: MAX_RUN_REQUEST_BYTES,
        onError: () => {
          throw new SliceWiseError(`a run request is at most ${MAX_RUN_REQUEST_BYTES / 1024} KB`, { status: 413, code: 'body_too_large' });
        },
      }),
      async (c) => {
      NoQuery.parse(c.req.query());
      const { 'Idempotency-Key': key } = IdempotencyHeader.parse({ 'Idempotency-Key': c.req.header('Idempotency-Key') });
      const body = CreateRunBody.parse(await jsonBody(c.req.raw));
      const { run, created, replayed } = await createRun(ctx, body, { idempotencyKey: key, idempotencyScope: idempotencyScope(c) });
      // Stripe's header name for the same thing: clients that know it need no other signal.
      if (replayed) c.header('Idempotent-Replayed', 'true');
      return c.json({ run, created, replayed }, created ? 201 : 200);
      },
    )
    .get('/', async (c) => {
      const q = ListRunsQuery.parse(c.req.query());
      return c.json(await listRuns(ctx, q));
    })
    .get('/:id', async (c) => c.json(await getRunDetail(ctx, c.req.param('id'))))
    .get('/:id/results', async (c) => c.json(await getRunResults(ctx, c.req.param('id'))))
    .get('/:id/metrics', async (c) => c.json(await getMetricSeries(ctx, c.req.param('id'))))
    .get('/:id/evaluation', async (c) => c.json(await getEvaluation(ctx, c.req.param('id'))))
    .get('/:id/artifacts', async (c) => c.json({ artifacts: await listRunArtifacts(ctx, c.req.param('id')) }))
    // The artifact's path relative to the run's data dir, slashes and all (see listRunArtifacts' `id`).
    .get('/:id/artifacts/:artifact{.+}', async (c) => {
      const { id, artifact } = ArtifactParams.parse(c.req.param());
      const a = await openArtifact(ctx, id, artifact);
      const headers: Record<string, string> = {
        'content-type': a.contentType,
        'content-length': String(a.bytes),
        'content-disposition': `${a.inline ? 'inline' : 'attachment'}; filename*=UTF-8''${encodeURIComponent(a.fileName)}`,
        'cache-control': 'no-cache',
        'x-content-type-options': 'nosniff',
      };
      if (a.sha256) {
        headers['x-sha256'] = a.sha256;
        headers['repr-digest'] = `sha-256=:${Buffer.from(a.sha256, 'hex').toString('base64')}:`;
      }
      if (c.req.method === 'HEAD') {
        await a.file.close();
        return c.body(null, 200, headers);
      }
      // Streamed from the open handle: a 100 MB checkpoint is never held in memory.
      return c.body(Readable.toWeb(a.file.createReadStream()) as ReadableStream, 200, headers);
    })
    .post('/:id/cancel', async (c) => c.json({ run: await cancelRun(ctx, c.req.param('id')) }))
    .post('/:id/steps/:step/retry', async (c) => c.json({ run: await retryStep(ctx, c.req.param('id'), c.req.param('step')) }, 202));
}
