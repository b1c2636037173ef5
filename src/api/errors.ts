import type { Context } from 'hono';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { ZodError } from 'zod';
import { SliceWiseError } from '../lib/errors.ts';
import { errorPage } from '../web/pages.ts';
import type { AuthVariables } from './auth.ts';

interface ErrorBody {
  code: string;
  message: string;
  fields?: { field: string; message: string }[];
  details?: Record<string, unknown>;
}

function describe(err: Error): { status: ContentfulStatusCode; error: ErrorBody } {
  if (err instanceof ZodError) {
    // An unknown key is named as the field it is (`dataDir`, `sources.foo`, a query's `foo`), not as its parent.
    const fields = err.issues.flatMap((i) =>
      i.code === 'unrecognized_keys'
        ? i.keys.map((k) => ({ field: [...i.path, k].join('.'), message: `Unrecognized key: "${k}"` }))
        : [{ field: i.path.join('.') || '(body)', message: i.message }],
    );
    return { status: 400, error: { code: 'invalid_request', message: `invalid request: ${fields.map((f) => `${f.field}: ${f.message}`).join('; ')}`, fields } };
  }
  if (err instanceof SliceWiseError) {
    return { status: err.status as ContentfulStatusCode, error: { code: err.code, message: err.message, ...(err.details ? { details: err.details } : {}) } };
  }
  if ((err as { status?: number }).status === 400 || err.name === 'HTTPException') {
    return { status: ((err as { status?: number }).status ?? 400) as ContentfulStatusCode, error: { code: 'bad_request', message: err.message } };
  }
  // The details (a query, a path, a stack) are for the operator's log, not for whoever sent the request.
  console.error(err);
  return { status: 500, error: { code: 'internal', message: 'internal error; the server log has the details' } };
}

/**
 * The one place an error becomes a response: JSON a person can act on, with the offending fields named; the
 * web UI's pages (/ui/...) get the same message as an HTML page.
 */
export function errorResponse(err: Error, c: Context) {
  const { status, error } = describe(err);
  // Any app may use this handler; only the authenticated one sets viaCookie (then its error pages offer to sign out).
  const signOut = (c as Context<{ Variables: AuthVariables }>).get('viaCookie') === true;
  if (c.req.path === '/ui' || c.req.path.startsWith('/ui/')) return c.html(errorPage(status, error.message, null, { signOut }), status);
  return c.json({ error }, status);
}
