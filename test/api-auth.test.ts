/**
 * Authentication: bearer tokens (stored hashed), roles (user: everything but Bull Board's actions; admin: those
 * too), the login cookie for browsers, the tokens file's errors and live revocation, and `slicewise api`'s refusal
 * to serve an open API off loopback. Real Redis, PGlite, the real app through app.request(), the CLI as a child.
 */
import { spawn } from 'node:child_process';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { serve, type ServerType } from '@hono/node-server';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'bullmq';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createApp } from '../src/api/app.ts';
import { PUBLIC_PATHS, SESSION_COOKIE, TokenStore, hashToken } from '../src/api/auth.ts';
import { addressKey, SignInLimiter } from '../src/api/sign-in-limit.ts';
import { createToken, revokeToken } from '../src/cli/tokens.ts';
import { createContext, type AppContext } from '../src/context.ts';
import { DemoService } from '../src/serving/demo-service.ts';
import { BIN, bareEnv, runCli } from './helpers/cli.ts';
import { freshDb, TEST_REDIS_URL } from './helpers/services.ts';

const logs: string[] = [];
/** Every response the tests saw (status line, headers but the login's Set-Cookie, body), to search for tokens. */
const seen: string[] = [];

let ctx: AppContext;
let db: Awaited<ReturnType<typeof freshDb>>;
let dir: string;
let tokensFile: string;
let store: TokenStore;
let app: ReturnType<typeof createApp>;
let demo: DemoService;
const tokens = { user: '', admin: '', revoked: '' };

async function until(ok: () => Promise<boolean>, ms = 10_000) {
  const end = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`condition not met within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function call(path: string, init: RequestInit & { token?: string; cookie?: string } = {}, base = 'http://localhost') {
  const headers = new Headers(init.headers);
  if (init.token !== undefined) headers.set('authorization', `Bearer ${init.token}`);
  if (init.cookie !== undefined) headers.set('cookie', `${SESSION_COOKIE}=${init.cookie}`);
  const res = await app.request(new Request(new URL(path, base), { ...init, headers }));
  const body = await res.clone().text();
  const hs = [...res.headers].filter(([k]) => !(k === 'set-cookie' && path.startsWith('/login'))).map(([k, v]) => `${k}: ${v}`);
  seen.push(`${res.status} ${path}\n${hs.join('\n')}\n${body}`);
  return res;
}

beforeAll(async () => {
  db = await freshDb('pglite');
  dir = await mkdtemp(join(tmpdir(), 'slicewise-auth-'));
  tokensFile = join(dir, 'etc', 'tokens');
  const logger = pino({ level: 'debug' }, { write: (line: string) => void logs.push(line) });
  ctx = createContext({ db: db.db, redisUrl: TEST_REDIS_URL, dataDir: dir, prefix: `swt${randomBytes(3).toString('hex')}`, logger });
  tokens.user = await createToken({ name: 'alice', role: 'user', file: tokensFile });
  tokens.admin = await createToken({ name: 'root', role: 'admin', file: tokensFile });
  tokens.revoked = await createToken({ name: 'bob', role: 'user', file: tokensFile });
  await revokeToken({ name: 'bob', file: tokensFile });
  store = await TokenStore.open({ file: tokensFile, logger });
  demo = new DemoService({ db: db.db });
  app = createApp(ctx, { auth: store, demo });
});

afterAll(async () => {
  await demo?.close();
  if (ctx) {
    const keys = await ctx.redis.keys(`${ctx.prefix}:*`);
    if (keys.length) await ctx.redis.del(...keys);
    await ctx.close();
  }
  await db?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('the tokens file', () => {
  it('is written 0600 and holds hashes, never a token', async () => {
    expect((await stat(tokensFile)).mode & 0o777).toBe(0o600);
    const text = await readFile(tokensFile, 'utf8');
    expect(text).toContain(`alice:user:${hashToken(tokens.user)}`);
    expect(text).toContain(`root:admin:${hashToken(tokens.admin)}`);
    expect(text).not.toContain('bob:');
    for (const t of Object.values(tokens)) expect(text).not.toContain(t);
    // 256 random bits in base64url after the prefix.
    expect(tokens.user).toMatch(/^sw_[A-Za-z0-9_-]{43}$/);
    expect(store.entries().map((e) => `${e.name}:${e.role}`)).toEqual(['alice:user', 'root:admin']);
  });

  it('a malformed entry is an error naming the file and the line', async () => {
    const bad = join(dir, 'bad-tokens');
    await writeFile(bad, `# comment\n\nalice:user:${'a'.repeat(64)}\ncarol:owner:${'b'.repeat(64)}\n`, { mode: 0o600 });
    await expect(TokenStore.open({ file: bad })).rejects.toThrow(`${bad} line 4: the role is one of user, admin`);
    await writeFile(bad, `alice:user:${'a'.repeat(64)}\nalice:admin:${'b'.repeat(64)}\n`);
    await expect(TokenStore.open({ file: bad })).rejects.toThrow(`${bad} line 2: the name alice is used twice`);
    await writeFile(bad, `alice:user:${'a'.repeat(64)}\nbob:user:${tokens.user}\n`);
    await expect(TokenStore.open({ file: bad })).rejects.toThrow(`${bad} line 2: the hash is 64 lowercase hex digits (sha256)`);
    await writeFile(bad, `just-a-name\n`);
    await expect(TokenStore.open({ file: bad })).rejects.toThrow(`${bad} line 1: expected name:role:sha256-hex`);
    await expect(TokenStore.open({ file: join(dir, 'nope') })).rejects.toThrow(`${join(dir, 'nope')}: no such file`);
    await expect(TokenStore.open({ inline: `a:user:${'a'.repeat(64)}, b:root:${'b'.repeat(64)}` })).rejects.toThrow('SLICEWISE_TOKENS entry 2: the role is one of user, admin');
  });

  it('a token made with the CLI: printed once on stdout, only its hash in the file', async () => {
    const file = join(dir, 'cli', 'tokens');
    const made = await runCli(['token', 'create', '--name', 'ci-bot', '--role', 'admin', '--file', file], dir);
    expect(made.code, made.out).toBe(0);
    const token = made.stdout.trim();
    expect(token).toMatch(/^sw_[A-Za-z0-9_-]{43}$/);
    expect(made.out).toContain(`Created token ci-bot (admin) in ${file}`);
    expect(await readFile(file, 'utf8')).toContain(`ci-bot:admin:${hashToken(token)}`);
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    await expect(createToken({ name: 'ci-bot', role: 'user', file })).rejects.toThrow(`tokens file ${file} already has a token named ci-bot`);
    await expect(createToken({ name: 'no spaces', role: 'user', file })).rejects.toThrow('--name no spaces: a token name is 1-64 letters');
  });
});

describe('without a valid token', () => {
  const BOARD_PATHS = [
    ['GET', '/admin/queues'],
    ['GET', '/admin/queues/queue/split'],
    ['GET', '/admin/queues/api/queues'],
    ['PUT', '/admin/queues/api/queues/split/clean/delayed'],
    ['PUT', '/admin/queues/api/queues/split/retry/failed'],
    ['PUT', '/admin/queues/api/queues/split/1/promote'],
    ['GET', '/admin/queues/static/index.css'],
  ] as const;

  /** Every route of the app (and Bull Board's, behind its one mount) with each method it answers, params filled in. */
  function targets(): [string, string][] {
    const out = new Map<string, [string, string]>();
    for (const r of app.routes) {
      if (PUBLIC_PATHS.has(r.path)) continue;
      const path = r.path.replace(/:[^/]+/g, 'x').replace(/\*/g, 'x');
      for (const m of r.method === 'ALL' ? ['GET', 'POST', 'PUT', 'DELETE'] : ['GET', r.method]) out.set(`${m} ${path}`, [m, path]);
    }
    for (const [m, p] of BOARD_PATHS) out.set(`${m} ${p}`, [m, p]);
    return [...out.values()];
  }

  it('every route but /healthz and the login pages answers 401 with WWW-Authenticate', async () => {
    const all = targets();
    // The routes this is about are there: REST, pages, the demo, Bull Board.
    for (const p of ['POST /runs', 'GET /runs/x', 'POST /runs/x/cancel', 'GET /ui/runs/x', 'POST /predict_multitask', 'GET /model/info', 'GET /admin/queues']) {
      expect(all.map(([m, path]) => `${m} ${path}`)).toContain(p);
    }
    const wrong = `sw_${randomBytes(32).toString('base64url')}`;
    for (const [method, path] of all) {
      for (const [how, init] of [
        ['no token', {}],
        ['a wrong token', { token: wrong }],
        ['a revoked token', { token: tokens.revoked }],
        ['a wrong cookie', { cookie: wrong }],
        ['not a bearer header', { headers: { authorization: `Basic ${Buffer.from(`x:${tokens.user}`).toString('base64')}` } }],
      ] as const) {
        const res = await call(path, { method, ...init, ...(method === 'GET' ? {} : { body: '{}', headers: { 'content-type': 'application/json', ...('headers' in init ? init.headers : {}) } }) });
        expect(res.status, `${method} ${path} with ${how}`).toBe(401);
        expect(res.headers.get('www-authenticate'), `${method} ${path} with ${how}`).toMatch(/^Bearer realm="slicewise"/);
        // The one error place: JSON, or the UI's HTML error page under /ui.
        if (path.startsWith('/ui')) expect(await res.text()).toContain('401');
        else expect((await res.json()).error.code, `${method} ${path} with ${how}`).toBe('unauthorized');
      }
    }
    expect((await call('/runs', { token: wrong })).headers.get('www-authenticate')).toContain('error="invalid_token"');
  });

  it('/healthz answers without one', async () => {
    expect((await call('/healthz')).status).toBe(200);
  });
});

describe('with a user token', () => {
  it('the REST API, the pages and the demo answer', async () => {
    const list = await call('/runs', { token: tokens.user });
    expect(list.status).toBe(200);
    expect(await list.json()).toMatchObject({ runs: [], total: 0 });
    expect((await call('/runs/nope', { token: tokens.user })).status).toBe(404);
    const bad = await call('/runs', { method: 'POST', token: tokens.user, headers: { 'content-type': 'application/json' }, body: '{"mode":"nope"}' });
    expect(bad.status).toBe(400);
    expect((await call('/ui', { token: tokens.user })).status).toBe(200);
    // No model trained in this database: the demo's own answer, past authentication.
    const info = await call('/model/info', { token: tokens.user });
    expect(info.status).toBe(409);
    expect((await info.json()).error.code).toBe('no_model');
  });
});

describe('Bull Board', () => {
  let worker: Worker | undefined;
  afterAll(async () => worker?.close());

  const board = (path: string, token: string, method = 'GET') => call(`/admin/queues/api${path}`, { method, token });
  const state = async (id: string) => (await ctx.queues.split.getJob(id))?.getState() ?? 'gone';

  it('a user sees it read-only and cannot clean, retry, promote or remove; an admin can', async () => {
    const q = ctx.queues.split;
    // A failed job (a real worker fails it), a delayed job and an old delayed job for clean.
    const failed = await q.add('auth-test-fail', {}, { attempts: 1 });
    const redis = new URL(TEST_REDIS_URL);
    const w = new Worker('split', async (): Promise<void> => { throw new Error('failed on purpose'); }, { connection: { host: redis.hostname, port: Number(redis.port || 6379) }, prefix: ctx.prefix });
    worker = w;
    await until(async () => (await state(failed.id!)) === 'failed');
    await w.close();
    worker = undefined;
    expect(await state(failed.id!)).toBe('failed');
    const delayed = await q.add('auth-test-delayed', {}, { delay: 3_600_000 });
    const old = await q.add('auth-test-old', {}, { delay: 3_600_000, timestamp: Date.now() - 60_000 });

    const userView = await (await board('/queues', tokens.user)).json();
    expect(userView.queues.find((x: { name: string }) => x.name === 'split').readOnlyMode).toBe(true);
    const adminView = await (await board('/queues', tokens.admin)).json();
    expect(adminView.queues.find((x: { name: string }) => x.name === 'split').readOnlyMode).toBe(false);
    expect((await call('/admin/queues', { token: tokens.user })).status).toBe(200);

    for (const [path, what] of [
      [`/queues/split/${failed.id}/retry`, 'retry a job'],
      ['/queues/split/retry/failed', 'retry all'],
      [`/queues/split/${delayed.id}/promote`, 'promote'],
      ['/queues/split/promote', 'promote all'],
      ['/queues/split/clean/delayed', 'clean'],
      [`/queues/split/${delayed.id}/clean`, 'remove a job'],
      ['/queues/split/pause', 'pause'],
      ['/queues/split/empty', 'empty'],
    ]) {
      const res = await board(path!, tokens.user, 'PUT');
      expect(res.status, what).toBe(403);
      const err = (await res.json()).error;
      expect(err.code).toBe('forbidden');
      expect(err.message).toContain('token alice has the user role');
    }
    expect((await board(`/queues/split/${failed.id}/update-data`, tokens.user, 'PATCH')).status).toBe(403);
    expect(await state(failed.id!)).toBe('failed');
    expect(await state(delayed.id!)).toBe('delayed');
    expect(await state(old.id!)).toBe('delayed');
    expect(await q.isPaused()).toBe(false);

    expect((await board(`/queues/split/${failed.id}/retry`, tokens.admin, 'PUT')).status).toBe(204);
    expect(await state(failed.id!)).toBe('waiting');
    expect((await board(`/queues/split/${delayed.id}/promote`, tokens.admin, 'PUT')).status).toBe(204);
    expect(await state(delayed.id!)).toBe('waiting');
    expect((await board('/queues/split/clean/delayed', tokens.admin, 'PUT')).status).toBe(200);
    expect(await state(old.id!)).toBe('gone');
    expect((await board(`/queues/split/${delayed.id}/clean`, tokens.admin, 'PUT')).status).toBe(204);
    expect(await state(delayed.id!)).toBe('gone');
  });
});

describe('signing in with a browser', () => {
  const form = (fields: Record<string, string>, headers: Record<string, string> = {}) => ({
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', ...headers },
    body: new URLSearchParams(fields).toString(),
  });
  const cookieOf = (res: Response) => res.headers.get('set-cookie') ?? '';

  it('a page without a token redirects to /login; the form sets an HttpOnly SameSite=Strict cookie that works like the token', async () => {
    const page = await call('/ui/runs/r1?tab=steps', { headers: { accept: 'text/html,application/xhtml+xml' } });
    expect(page.status).toBe(302);
    expect(page.headers.get('location')).toBe(`/login?next=${encodeURIComponent('/ui/runs/r1?tab=steps')}`);
    // An API client asking for JSON still gets 401, not a redirect.
    expect((await call('/runs', { headers: { accept: 'application/json' } })).status).toBe(401);

    const login = await call('/login?next=%2Fui%2Fruns%2Fr1');
    expect(login.status).toBe(200);
    const html = await login.text();
    expect(html).toContain('<form method="post" action="/login">');
    expect(html).toContain('type="password"');
    expect(html).toContain('value="/ui/runs/r1"');

    const refused = await call('/login', form({ token: tokens.revoked, next: '/ui' }));
    expect(refused.status).toBe(401);
    expect(cookieOf(refused)).toBe('');
    expect(await refused.text()).toContain('not valid');

    const ok = await call('/login', form({ token: tokens.user, next: '/ui/runs/r1' }));
    expect(ok.status).toBe(303);
    expect(ok.headers.get('location')).toBe('/ui/runs/r1');
    const cookie = cookieOf(ok);
    expect(cookie).toMatch(new RegExp(`^${SESSION_COOKIE}=`));
    expect(cookie).toContain('HttpOnly');
    expect(cookie).toContain('SameSite=Strict');
    expect(cookie).toContain('Path=/');
    expect(cookie).not.toContain('Secure');
    const value = decodeURIComponent(/^[^=]+=([^;]*)/.exec(cookie)![1]!);

    expect((await call('/ui', { cookie: value, headers: { accept: 'text/html' } })).status).toBe(200);
    expect((await call('/runs', { cookie: value })).status).toBe(200);
    // The cookie carries the user role: Bull Board read-only.
    expect((await call('/admin/queues/api/queues/split/clean/failed', { method: 'PUT', cookie: value })).status).toBe(403);

    const out = await call('/logout', { method: 'POST', cookie: value });
    expect(out.status).toBe(303);
    expect(cookieOf(out)).toMatch(new RegExp(`^${SESSION_COOKIE}=;.*Max-Age=0`));
  });

  it('Secure over https (also behind a proxy), no open redirect, no sign-in from another site', async () => {
    expect(cookieOf(await call('/login', form({ token: tokens.user }), 'https://slicewise.example'))).toContain('Secure');
    expect(cookieOf(await call('/login', form({ token: tokens.user }, { 'x-forwarded-proto': 'https' })))).toContain('Secure');
    for (const next of ['//evil.example/x', 'https://evil.example/', '/\\evil.example', '/login?next=/ui']) {
      expect((await call('/login', form({ token: tokens.user, next }))).headers.get('location'), next).toBe('/ui');
    }
    // Unauthenticated, so it must not read a large body.
    const big = await call('/login', form({ token: 'x'.repeat(10_000) }));
    expect(big.status).toBe(413);
    expect((await big.json()).error.code).toBe('payload_too_large');
    const cross = await call('/login', form({ token: tokens.user }, { 'sec-fetch-site': 'cross-site' }));
    expect(cross.status).toBe(403);
    expect(cookieOf(cross)).toBe('');
  });

  it('a stale cookie is cleared and the browser sent to /login', async () => {
    const res = await call('/ui', { cookie: tokens.revoked, headers: { accept: 'text/html' } });
    expect(res.status).toBe(302);
    expect(res.headers.get('location')).toBe('/login?next=%2Fui');
    expect(cookieOf(res)).toMatch(/Max-Age=0/);
  });
});

describe('signing out', () => {
  const form = (fields: Record<string, string>, headers: Record<string, string> = {}) => ({
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', ...headers },
    body: new URLSearchParams(fields).toString(),
  });
  const SIGN_OUT = '<form class="signout" method="post" action="/logout"><button type="submit" id="sign-out">Sign out</button></form>';
  const page = (path: string, init: { cookie?: string; token?: string } = {}) => call(path, { ...init, headers: { accept: 'text/html' } });

  it('pages opened with the login cookie offer it; POST /logout clears the cookie and the pages want a sign-in again', async () => {
    const signIn = await call('/login', form({ token: tokens.user, next: '/ui' }));
    expect(signIn.status).toBe(303);
    /** The browser's cookie jar: what Set-Cookie says, a Max-Age=0 removing it. */
    let jar: string | undefined = decodeURIComponent(/^[^=]+=([^;]*)/.exec(signIn.headers.get('set-cookie')!)![1]!);
    const created = await call('/runs', { method: 'POST', cookie: jar, headers: { 'content-type': 'application/json' }, body: '{"mode":"data-only"}' });
    expect(created.status).toBe(201);
    const runPage = `/ui/runs/${(await created.json()).run.id}`;

    for (const path of ['/ui', runPage, '/ui/demo', '/ui/runs/no-such-run']) {
      const res = await page(path, { cookie: jar });
      expect([200, 404], path).toContain(res.status);
      expect(await res.text(), path).toContain(SIGN_OUT);
    }
    // A client with the header has no cookie to clear.
    expect(await (await page(runPage, { token: tokens.user })).text()).not.toContain('action="/logout"');

    // Neither a link (GET) nor another site's form signs anyone out.
    const link = await call('/logout', { cookie: jar });
    expect(link.status).toBe(404);
    expect(link.headers.get('set-cookie')).toBeNull();
    const cross = await call('/logout', { method: 'POST', cookie: jar, headers: { 'sec-fetch-site': 'cross-site' } });
    expect(cross.status).toBe(403);
    expect(cross.headers.get('set-cookie')).toBeNull();

    // What the button sends.
    const out = await call('/logout', { method: 'POST', cookie: jar, headers: { 'sec-fetch-site': 'same-origin' } });
    expect(out.status).toBe(303);
    expect(out.headers.get('location')).toBe('/login');
    const cleared = out.headers.get('set-cookie')!;
    expect(cleared).toMatch(new RegExp(`^${SESSION_COOKIE}=;.*Max-Age=0.*Path=/`));
    if (/Max-Age=0/.test(cleared)) jar = undefined;

    expect(jar).toBeUndefined();
    const again = await page(runPage);
    expect(again.status).toBe(302);
    expect(again.headers.get('location')).toBe(`/login?next=${encodeURIComponent(runPage)}`);
    expect((await call('/runs/x/metrics')).status).toBe(401);
  });
});

describe('wrong tokens, per client address', () => {
  let server: ServerType;
  let port: number;
  beforeAll(async () => {
    // A server of its own (a fresh budget), on real sockets: the address counted is the TCP peer's.
    server = serve({ fetch: createApp(ctx, { auth: store }).fetch, port: 0, hostname: '127.0.0.1' });
    await new Promise<void>((r) => (server.listening ? r() : server.once('listening', () => r())));
    port = (server.address() as AddressInfo).port;
  });
  afterAll(async () => {
    await new Promise<void>((r) => server.close(() => r()));
  });

  /** One request from `from` (any 127.x address reaches the server over loopback). */
  function send(from: string, path: string, { token, signIn, accept }: { token?: string; signIn?: string; accept?: string } = {}): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
    const body = signIn === undefined ? undefined : new URLSearchParams({ token: signIn, next: '/ui' }).toString();
    const headers: Record<string, string> = {
      ...(token ? { authorization: `Bearer ${token}` } : {}),
      ...(body ? { 'content-type': 'application/x-www-form-urlencoded' } : {}),
      ...(accept ? { accept } : {}),
    };
    return new Promise((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port, path, method: body ? 'POST' : 'GET', localAddress: from, headers }, (res) => {
        let text = '';
        res.on('data', (d) => (text += d));
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: text }));
      });
      req.on('error', reject);
      req.end(body);
    });
  }

  it('the 11th wrong sign-in within the window is 429 naming the wait; other addresses still sign in; said once', async () => {
    const wrong = `sw_${randomBytes(32).toString('base64url')}`;
    for (let i = 1; i <= 10; i++) expect((await send('127.0.0.2', '/login', { signIn: wrong })).status, `attempt ${i}`).toBe(401);
    const refused = await send('127.0.0.2', '/login', { signIn: wrong });
    expect(refused.status).toBe(429);
    const wait = Number(refused.headers['retry-after']);
    expect(wait).toBeGreaterThanOrEqual(1);
    expect(wait).toBeLessThanOrEqual(60);
    expect(refused.body).toContain(`try again in ${wait} s`);
    // Refused before the token is looked at: a right guess now would teach nothing, so a good token waits too,
    // on the form and as a header.
    expect((await send('127.0.0.2', '/login', { signIn: tokens.user })).status).toBe(429);
    const api = await send('127.0.0.2', '/runs', { token: tokens.user });
    expect(api.status).toBe(429);
    expect(api.headers['retry-after']).toBeDefined();
    expect(JSON.parse(api.body).error).toMatchObject({ code: 'too_many_attempts', message: expect.stringMatching(/try again in \d+ s/) });

    // Another address is not affected.
    const other = await send('127.0.0.1', '/login', { signIn: tokens.user });
    expect(other.status).toBe(303);
    expect(other.headers['set-cookie']?.[0]).toMatch(new RegExp(`^${SESSION_COOKIE}=`));
    expect((await send('127.0.0.1', '/runs', { token: tokens.user })).status).toBe(200);

    // The operator hears it once for the window, not once per attempt.
    const said = logs.filter((l) => l.includes('wrong tokens from 127.0.0.2'));
    expect(said).toHaveLength(1);
    expect(said[0]).toMatch(/10 wrong tokens from 127\.0\.0\.2 within 60 s: refusing its sign-ins and tokens for the next \d+ s \(this API process only\)/);
  });

  it('wrong bearer tokens draw on the same budget as the form', async () => {
    const wrong = `sw_${randomBytes(32).toString('base64url')}`;
    for (let i = 1; i <= 5; i++) expect((await send('127.0.0.3', '/runs', { token: wrong })).status).toBe(401);
    for (let i = 1; i <= 5; i++) expect((await send('127.0.0.3', '/login', { signIn: wrong })).status).toBe(401);
    expect((await send('127.0.0.3', '/runs', { token: wrong })).status).toBe(429);
    // No token at all is not a guess: a page still sends the browser to the sign-in form (which then says wait).
    const page = await send('127.0.0.3', '/ui', { accept: 'text/html' });
    expect(page.status).toBe(302);
    expect(page.headers.location).toBe('/login?next=%2Fui');
  });
});

describe('the sign-in budget', () => {
  it('opens again when the window ends; IPv6 counts by /64, IPv4-in-IPv6 as IPv4', async () => {
    const limiter = new SignInLimiter({ logger: pino({ level: 'silent' }), limit: 2, windowMs: 300 });
    limiter.failed('2001:db8:1:2::5');
    limiter.failed('2001:db8:1:2:ffff::9');
    expect(limiter.refusedFor('2001:0db8:0001:0002::1')).toBe(1);
    expect(limiter.refusedFor('2001:db8:1:3::1')).toBe(0);
    await new Promise((r) => setTimeout(r, 350));
    expect(limiter.refusedFor('2001:db8:1:2::5')).toBe(0);
    expect(addressKey('::ffff:203.0.113.7')).toBe('203.0.113.7');
    expect(addressKey('::1')).toBe('0:0:0:0::/64');
    expect(addressKey('fe80::1%eth0')).toBe('fe80:0:0:0::/64');
    expect(addressKey('64:ff9b:1:2:3:4:1.2.3.4')).toBe('64:ff9b:1:2::/64');
    // No socket (app.request()): nothing to count by, never refused.
    limiter.failed(undefined);
    expect(limiter.refusedFor(undefined)).toBe(0);
  });
});

describe('revoking a token', () => {
  it('takes effect on the running app; a broken file refuses every token until fixed, said once', async () => {
    const carol = await createToken({ name: 'carol', role: 'user', file: tokensFile });
    // The file is looked at again at most once a second.
    await until(async () => (await call('/runs', { token: carol })).status === 200, 5_000);
    await revokeToken({ name: 'carol', file: tokensFile });
    await until(async () => (await call('/runs', { token: carol })).status === 401, 5_000);
    expect((await call('/runs', { token: tokens.user })).status).toBe(200);
    expect(logs.join('')).toContain(`tokens file ${tokensFile} changed: 2 token(s) in force`);

    const good = await readFile(tokensFile, 'utf8');
    await writeFile(tokensFile, `${good}oops\n`);
    await until(async () => (await call('/runs', { token: tokens.admin })).status === 401, 5_000);
    await new Promise((r) => setTimeout(r, 1_100));
    expect((await call('/runs', { token: tokens.user })).status).toBe(401);
    const complaints = logs.filter((l) => l.includes('refusing every token of the file'));
    expect(complaints).toHaveLength(1);
    expect(complaints[0]).toMatch(/line \d+: expected name:role:sha256-hex/);
    await writeFile(tokensFile, good);
    await until(async () => (await call('/runs', { token: tokens.user })).status === 200, 5_000);
    expect(logs.join('')).toContain('is readable again: 2 token(s) in force');
  });
});

describe('secrecy', () => {
  it('no token appears in the log or in any response (but the login cookie itself)', () => {
    expect(seen.length).toBeGreaterThan(100);
    expect(logs.some((l) => l.includes('signed in on /login: token alice (user)'))).toBe(true);
    const everything = logs.join('\n') + seen.join('\n');
    for (const [who, t] of Object.entries(tokens)) expect(everything.includes(t), `${who}'s token`).toBe(false);
  });
});

describe('slicewise api', () => {
  /** `slicewise api ARGS` until it prints `until` (then killed) or exits; never left running. */
  function serveUntil(args: string[], until: RegExp, env: NodeJS.ProcessEnv, ms = 30_000): Promise<{ out: string; code: number | null; url?: string }> {
    return new Promise((resolve, reject) => {
      const p = spawn(process.execPath, [BIN, 'api', ...args], { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      const timer = setTimeout(() => {
        p.kill('SIGKILL');
        reject(new Error(`slicewise api did not print ${until} within ${ms} ms:\n${out}`));
      }, ms);
      const onData = (d: Buffer) => {
        out += d;
        const m = until.exec(out);
        if (m) {
          clearTimeout(timer);
          resolve({ out, code: null, url: /API listening on (http:\/\/\S+)/.exec(out)?.[1] });
        }
      };
      p.stdout.on('data', onData);
      p.stderr.on('data', onData);
      p.on('exit', (code) => {
        clearTimeout(timer);
        resolve({ out, code });
      });
      // SIGTERM, not -9: the API then stops its private redis-server (a killed one would leave it running).
      cleanups.push(async () => {
        if (p.exitCode !== null || p.signalCode !== null) return;
        const gone = new Promise((r) => p.once('exit', r));
        p.kill('SIGTERM');
        const force = setTimeout(() => p.kill('SIGKILL'), 10_000);
        await gone;
        clearTimeout(force);
      });
    });
  }
  const cleanups: (() => Promise<void>)[] = [];
  afterAll(async () => {
    for (const f of cleanups) await f();
  });

  it('refuses to serve an open API on 0.0.0.0, telling how to make a token', async () => {
    // A database that cannot be reached: should the refusal ever come after start-up, this fails fast with
    // another message instead of serving.
    const res = await runCli(['api', '--host', '0.0.0.0', '--port', '0'], dir, bareEnv({ REDIS_URL: TEST_REDIS_URL, DATABASE_URL: 'postgres://nobody@127.0.0.1:1/none', SLICEWISE_TOKENS_FILE: '', SLICEWISE_TOKENS: '' }));
    expect(res.code).toBe(1);
    expect(res.out).toContain('refusing to serve the API on 0.0.0.0 without tokens');
    expect(res.out).toContain('slicewise token create --name admin --role admin');
    expect(res.out).not.toContain('API listening');
  });

  it('with a tokens file it serves 0.0.0.0 and wants a token; on loopback without tokens it says it is open', async () => {
    const env = bareEnv({ REDIS_URL: TEST_REDIS_URL, SLICEWISE_QUEUE_PREFIX: `${ctx.prefix}cli`, SLICEWISE_TOKENS: '' });
    const withTokens = await serveUntil(['--host', '0.0.0.0', '--port', '0', '--data-dir', join(dir, 'api1'), '--tokens-file', tokensFile], /Tokens: .*\n/, env);
    expect(withTokens.out).toContain(`Tokens: 2 tokens from ${tokensFile}; browsers sign in at`);
    const base = withTokens.url!.replace('0.0.0.0', '127.0.0.1');
    expect((await fetch(`${base}/runs`)).status).toBe(401);
    expect((await fetch(`${base}/runs`, { headers: { authorization: `Bearer ${tokens.user}` } })).status).toBe(200);
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
    await cleanups.pop()!();

    const open = await serveUntil(['--host', '127.0.0.1', '--port', '0', '--data-dir', join(dir, 'api2')], /allowed only on loopback\n/, { ...env, SLICEWISE_TOKENS_FILE: '' });
    expect(open.out).toContain('no tokens configured (SLICEWISE_TOKENS_FILE); the API is open, which is allowed only on loopback');
    expect((await fetch(`${open.url}/runs`)).status).toBe(200);
    await cleanups.pop()!();
  }, 90_000);
});
