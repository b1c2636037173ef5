import { Hono } from 'hono';
import { z } from 'zod';
import type { AppContext } from '../context.ts';
import { CreateRunSchema, ListRunsQuery } from '../runs/input.ts';
import { cancelRun, createRun, getRunDetail, getRunResults, listArtifacts, listRuns } from '../runs/service.ts';
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

const IdempotencyKey = z.string().min(1).max(200).optional();

export function runsRoutes(ctx: AppContext) {
  return new Hono()
    .post('/', async (c) => {
      const body = CreateRunSchema.parse(await jsonBody(c.req.raw));
      const key = IdempotencyKey.parse(c.req.header('Idempotency-Key') || undefined);
      const { run, created } = await createRun(ctx, body, { idempotencyKey: key });
      return c.json({ run, created }, created ? 201 : 200);
    })
    .get('/', async (c) => {
      const q = ListRunsQuery.parse(c.req.query());
      return c.json(await listRuns(ctx, q));
    })
    .get('/:id', async (c) => c.json(await getRunDetail(ctx, c.req.param('id'))))
    .get('/:id/results', async (c) => c.json(await getRunResults(ctx, c.req.param('id'))))
    .get('/:id/artifacts', async (c) => c.json({ artifacts: await listArtifacts(ctx, c.req.param('id')) }))
    .post('/:id/cancel', async (c) => c.json({ run: await cancelRun(ctx, c.req.param('id')) }));
}
