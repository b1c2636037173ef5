import type { Context } from 'hono';
import { ZodError } from 'zod';
import { SliceWiseError } from '../lib/errors.ts';

/** The one place an error becomes a response: JSON a person can act on, with the offending fields named. */
export function errorResponse(err: Error, c: Context) {
  if (err instanceof ZodError) {
    const fields = err.issues.map((i) => ({ field: i.path.join('.') || '(body)', message: i.message }));
    return c.json({ error: { code: 'invalid_request', message: `invalid request: ${fields.map((f) => `${f.field}: ${f.message}`).join('; ')}`, fields } }, 400);
  }
  if (err instanceof SliceWiseError) {
    return c.json({ error: { code: err.code, message: err.message, ...(err.details ? { details: err.details } : {}) } }, err.status as 400);
  }
  if ((err as { status?: number }).status === 400 || err.name === 'HTTPException') {
    const status = ((err as { status?: number }).status ?? 400) as 400;
    return c.json({ error: { code: 'bad_request', message: err.message } }, status);
  }
  console.error(err);
  return c.json({ error: { code: 'internal', message: `internal error: ${err.message}` } }, 500);
}
