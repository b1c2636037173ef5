/**
 * The browser's way in: a browser cannot put an Authorization header on a navigation, so GET /login shows a form,
 * POST /login checks the token and answers with a cookie that holds it (HttpOnly, SameSite=Strict, Secure over
 * https), and POST /logout clears it. The token travels only in the form's body and the cookie, never in a URL.
 * Wrong tokens count against the client's address (SignInLimiter, shared with the bearer check): past the limit
 * the form answers 429 with Retry-After until the window ends.
 */
import { Hono, type Context } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { deleteCookie, setCookie } from 'hono/cookie';
import { html } from 'hono/html';
import { z } from 'zod';
import type { Logger } from '../lib/logger.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { SESSION_COOKIE, type TokenStore } from './auth.ts';
import { clientAddress, type SignInLimiter } from './sign-in-limit.ts';

const LOGIN_MAX_BYTES = 4096;

const LoginForm = z.object({
  token: z.string().trim().min(1, 'paste your token').max(200, 'that is longer than any token'),
  next: z.string().optional(),
});

/** Where to go after signing in: a path on this server only (no `//host`, no scheme), else /ui. */
function safeNext(next: string | undefined): string {
  if (!next || next.length > 2000 || !/^\/(?![/\\])/.test(next) || /[\\\r\n]/.test(next) || next.startsWith('/login')) return '/ui';
  return next;
}

// Self-contained (inline style): every other asset of the UI needs a token, and this page is how one gets it.
function loginPage({ next, message }: { next: string; message?: string }) {
  return html`<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <title>Sign in · SliceWise</title>
    <link rel="icon" href="data:," />
    <style>
      body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #1d2330; background: #f5f6f8; }
      .topbar { padding: 10px 24px; background: #1d2330; color: #fff; font-weight: 700; }
      form { max-width: 420px; margin: 48px auto; background: #fff; border: 1px solid #e3e6ec; border-radius: 8px; padding: 20px 24px; }
      label { display: block; margin-bottom: 6px; }
      input[type=password] { width: 100%; padding: 6px 8px; font: inherit; }
      button { margin-top: 12px; padding: 6px 16px; font: inherit; }
      .error { color: #c0392b; }
      .muted { color: #6b7385; }
    </style>
  </head>
  <body>
    <header class="topbar">SliceWise</header>
    <form method="post" action="/login">
      <h1>Sign in</h1>
      ${message ? html`<p class="error" role="alert">${message}</p>` : ''}
      <label for="token">API token</label>
      <input type="password" id="token" name="token" autocomplete="current-password" required autofocus />
      <input type="hidden" name="next" value="${next}" />
      <button type="submit">Sign in</button>
      <p class="muted">An admin makes tokens with <code>slicewise token create --name NAME</code>.</p>
    </form>
  </body>
</html>`;
}

/** Another site's form cannot sign a browser in (login CSRF) nor out: SameSite=Strict only keeps the cookie off. */
function refuseCrossSite(c: Context, what: string): void {
  if (c.req.header('sec-fetch-site') === 'cross-site') throw new SliceWiseError(`${what} from another site is refused`, { status: 403, code: 'forbidden' });
}

export function loginRoutes(store: TokenStore, logger: Logger, limiter: SignInLimiter) {
  return new Hono()
    .get('/login', (c) => c.html(loginPage({ next: safeNext(c.req.query('next')) })))
    // Anyone may post here before signing in: read no more than a token's worth of form.
    .post('/login', bodyLimit({ maxSize: LOGIN_MAX_BYTES, onError: () => { throw new SliceWiseError(`a sign-in form is at most ${LOGIN_MAX_BYTES} bytes`, { status: 413, code: 'payload_too_large' }); } }), async (c) => {
      refuseCrossSite(c, 'sign-in');
      const form = LoginForm.safeParse(await c.req.parseBody().catch(() => ({})));
      const next = safeNext(form.success ? form.data.next : undefined);
      if (!form.success) return c.html(loginPage({ next, message: form.error.issues[0]!.message }), 400);
      // Before the token is looked at: an address over the limit learns nothing more, right or wrong.
      const address = clientAddress(c);
      const wait = limiter.refusedFor(address);
      if (wait) {
        c.header('Retry-After', String(wait));
        return c.html(loginPage({ next, message: `Too many wrong tokens from your address: try again in ${wait} s.` }), 429);
      }
      const principal = await store.verify(form.data.token);
      if (!principal) {
        limiter.failed(address);
        logger.warn('sign-in refused: an unknown or revoked token was entered on /login');
        return c.html(loginPage({ next, message: 'That token is not valid (unknown or revoked).' }), 401);
      }
      const url = new URL(c.req.url);
      const https = url.protocol === 'https:' || c.req.header('x-forwarded-proto')?.split(',')[0]?.trim() === 'https';
      setCookie(c, SESSION_COOKIE, form.data.token, { httpOnly: true, sameSite: 'Strict', secure: https, path: '/' });
      logger.info(`signed in on /login: token ${principal.name} (${principal.role})`);
      return c.redirect(next, 303);
    })
    // POST only (GET /logout is no route): a link or an image cannot sign anyone out.
    .post('/logout', (c) => {
      refuseCrossSite(c, 'sign-out');
      deleteCookie(c, SESSION_COOKIE, { path: '/' });
      return c.redirect('/login', 303);
    });
}
