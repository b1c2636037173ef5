/**
 * Bearer-token authentication for the API: the tokens (stored as hashes only), the middleware that checks them on
 * every route but /healthz and the login pages, and the roles (`user`: everything but Bull Board's actions;
 * `admin`: those too).
 *
 * Tokens live in a file (SLICEWISE_TOKENS_FILE, written by `slicewise token create`) and/or in SLICEWISE_TOKENS,
 * one entry per token: `name:role:sha256-hex`. The plain token is printed once, when it is made, and is never
 * stored, logged or echoed.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import type { Context, MiddlewareHandler } from 'hono';
import { deleteCookie, getCookie } from 'hono/cookie';
import { z } from 'zod';
import { SliceWiseError } from '../lib/errors.ts';
import { createLogger, type Logger } from '../lib/logger.ts';
import { clientAddress, type SignInLimiter } from './sign-in-limit.ts';

export const ROLES = ['user', 'admin'] as const;
export type Role = (typeof ROLES)[number];

/** Who a request is: the token's name and role (never the token). */
export interface Principal {
  name: string;
  role: Role;
}

export interface TokenEntry extends Principal {
  /** sha256 of the token. */
  hash: Buffer;
}

/** The cookie the login page sets; it holds the token itself, so it is checked exactly like a bearer token. */
export const SESSION_COOKIE = 'slicewise_session';
/** Routes that must answer without a token: the health check (load balancers) and the way to log in. */
export const PUBLIC_PATHS = new Set(['/healthz', '/login', '/logout']);
const TOKEN_PREFIX = 'sw_';
/** How often the tokens file is looked at again, so that a revoked token stops working without a restart. */
const RELOAD_CHECK_MS = 1000;

export const TokenName = z
  .string()
  .regex(/^[A-Za-z0-9._-]{1,64}$/, 'a token name is 1-64 letters, digits, dots, dashes or underscores');

const Entry = z.object({
  name: TokenName,
  role: z.enum(ROLES, { error: `the role is one of ${ROLES.join(', ')}` }),
  hash: z.string().regex(/^[0-9a-f]{64}$/, 'the hash is 64 lowercase hex digits (sha256)'),
});

/** A malformed tokens file or SLICEWISE_TOKENS entry; the message names the file (or variable) and the line. */
export class TokensFileError extends SliceWiseError {
  constructor(where: string, reason: string) {
    super(`${where}: ${reason}`, { status: 500, code: 'bad_tokens_file', details: { where } });
    this.name = 'TokensFileError';
  }
}

/** A new token: 256 random bits, base64url, with a prefix that secret scanners and people can recognise. */
export function generateToken(): string {
  return TOKEN_PREFIX + randomBytes(32).toString('base64url');
}

/**
 * What is stored of a token. A plain sha256, not a slow password hash: tokens carry 256 random bits, so the
 * stored hash cannot be brute-forced however fast the hash is; bcrypt/scrypt exist for guessable passwords and
 * would only add CPU to every request.
 */
export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

export function formatEntry(name: string, role: Role, hashHex: string): string {
  return `${name}:${role}:${hashHex}`;
}

/** Parses one entry (`name:role:sha256-hex`); `where` names it in an error ("tokens.txt line 3"). */
export function parseEntry(text: string, where: string): TokenEntry {
  const parts = text.split(':');
  if (parts.length !== 3) throw new TokensFileError(where, 'expected name:role:sha256-hex (create entries with `slicewise token create`)');
  const parsed = Entry.safeParse({ name: parts[0], role: parts[1], hash: parts[2] });
  if (!parsed.success) throw new TokensFileError(where, parsed.error.issues.map((i) => i.message).join('; '));
  return { name: parsed.data.name, role: parsed.data.role, hash: Buffer.from(parsed.data.hash, 'hex') };
}

/** A tokens file's text: one entry a line; blank lines and `#` comments are skipped. Names are unique. */
export function parseTokensFile(text: string, file: string): TokenEntry[] {
  const out: TokenEntry[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.replace(/#.*$/, '').trim();
    if (!line) return;
    const entry = parseEntry(line, `${file} line ${i + 1}`);
    if (out.some((e) => e.name === entry.name)) throw new TokensFileError(`${file} line ${i + 1}`, `the name ${entry.name} is used twice`);
    out.push(entry);
  });
  return out;
}

/** SLICEWISE_TOKENS: entries separated by commas or whitespace. */
export function parseInlineTokens(text: string, variable = 'SLICEWISE_TOKENS'): TokenEntry[] {
  return text
    .split(/[\s,]+/)
    .filter(Boolean)
    .map((e, i) => parseEntry(e, `${variable} entry ${i + 1}`));
}

export interface TokenStoreOptions {
  /** The tokens file; read now, and again whenever it changes. */
  file?: string;
  /** Entries from SLICEWISE_TOKENS (fixed for the process's life). */
  inline?: string;
  logger?: Logger;
}

/**
 * The configured tokens. The file is looked at again (at most once a second) and re-read when it changed, so
 * `slicewise token revoke` takes effect on a running API. A file that turns unreadable or malformed refuses every
 * token until it is fixed: failing open would keep a token working that the edit meant to revoke.
 */
export class TokenStore {
  private fileEntries: TokenEntry[] = [];
  private readonly inlineEntries: TokenEntry[];
  private readonly file?: string;
  private readonly logger: Logger;
  private signature = '';
  private checkedAt = 0;
  private checking: Promise<void> | null = null;
  private broken: string | null = null;

  private constructor({ file, inline, logger }: TokenStoreOptions) {
    this.file = file;
    this.logger = logger ?? createLogger('auth');
    this.inlineEntries = inline ? parseInlineTokens(inline) : [];
  }

  /** Reads the file (a missing or malformed one is an error naming it). */
  static async open(opts: TokenStoreOptions): Promise<TokenStore> {
    const store = new TokenStore(opts);
    if (store.file) {
      const st = await stat(store.file).catch((err: NodeJS.ErrnoException) => {
        throw new TokensFileError(store.file!, err.code === 'ENOENT' ? 'no such file (create it with `slicewise token create --name NAME --file FILE`)' : err.message);
      });
      store.fileEntries = parseTokensFile(await readFile(store.file, 'utf8'), store.file);
      store.signature = signatureOf(st);
      store.checkedAt = Date.now();
      // Only hashes are in it, but it says who may do what; the CLI writes it 0600.
      if (st.mode & 0o077) store.logger.warn(`tokens file ${store.file} is readable by other users (mode ${(st.mode & 0o777).toString(8)}); chmod 600 it`);
    }
    const dupe = store.entries().find((e, i, all) => all.findIndex((o) => o.name === e.name) !== i);
    if (dupe) throw new TokensFileError(store.file ?? 'SLICEWISE_TOKENS', `the name ${dupe.name} is used twice (in the file and in SLICEWISE_TOKENS)`);
    return store;
  }

  /** Every entry in force (names and roles only are of interest to callers). */
  entries(): TokenEntry[] {
    return [...this.fileEntries, ...this.inlineEntries];
  }

  /** Where the tokens come from, for the startup line. */
  describe(): string {
    const n = this.entries().length;
    const from = [this.file, this.inlineEntries.length ? 'SLICEWISE_TOKENS' : null].filter(Boolean).join(' and ');
    return n ? `${n} token${n === 1 ? '' : 's'} from ${from}` : `no tokens in ${from} yet: every request is refused until one is made with \`slicewise token create\``;
  }

  /** The principal a token stands for, or null. Compares hashes in constant time against every entry. */
  async verify(token: string): Promise<Principal | null> {
    await this.refresh();
    const hash = createHash('sha256').update(token, 'utf8').digest();
    let found: TokenEntry | null = null;
    for (const e of this.entries()) if (timingSafeEqual(e.hash, hash) && !found) found = e;
    return found ? { name: found.name, role: found.role } : null;
  }

  private refresh(): Promise<void> {
    if (!this.file || Date.now() - this.checkedAt < RELOAD_CHECK_MS) return Promise.resolve();
    this.checking ??= this.reload().finally(() => {
      this.checkedAt = Date.now();
      this.checking = null;
    });
    return this.checking;
  }

  private async reload() {
    const file = this.file!;
    try {
      const st = await stat(file);
      const sig = signatureOf(st);
      if (sig === this.signature && !this.broken) return;
      const entries = parseTokensFile(await readFile(file, 'utf8'), file);
      this.signature = sig;
      this.fileEntries = entries;
      if (this.broken) this.logger.info(`tokens file ${file} is readable again: ${entries.length} token(s) in force`);
      else this.logger.info(`tokens file ${file} changed: ${entries.length} token(s) in force`);
      this.broken = null;
    } catch (err) {
      const reason = err instanceof TokensFileError ? err.message : `${file}: ${(err as Error).message}`;
      this.fileEntries = [];
      this.signature = '';
      // Said once per problem, not on every request.
      if (this.broken !== reason) this.logger.error(`${reason}; refusing every token of the file until it is fixed`);
      this.broken = reason;
    }
  }
}

function signatureOf(st: { mtimeMs: number; size: number; ino: number }) {
  return `${st.ino}:${st.size}:${st.mtimeMs}`;
}

export type AuthVariables = {
  principal?: Principal;
  /** The request was let in by the login cookie (not a header): its pages offer to sign out. */
  viaCookie?: boolean;
};

/** The token of a request: `Authorization: Bearer ...`, else the login cookie. */
function presentedToken(c: Context): { token: string | null; via: 'header' | 'cookie' | null } {
  const header = c.req.header('authorization');
  if (header !== undefined) {
    const m = /^Bearer[ ]+([^\s]+)\s*$/i.exec(header);
    return { token: m ? m[1]! : null, via: 'header' };
  }
  const cookie = getCookie(c, SESSION_COOKIE);
  return cookie ? { token: cookie, via: 'cookie' } : { token: null, via: null };
}

/** A browser navigating to a page (not a script or a client calling the API): it can be sent to /login. */
function wantsPage(c: Context): boolean {
  return (c.req.method === 'GET' || c.req.method === 'HEAD') && (c.req.header('accept') ?? '').includes('text/html');
}

/** 429 for an address that sent too many wrong tokens (see SignInLimiter), naming the wait. */
export class TooManyAttemptsError extends SliceWiseError {
  constructor(seconds: number) {
    super(`too many wrong tokens from your address; try again in ${seconds} s`, { status: 429, code: 'too_many_attempts', details: { retryAfterSeconds: seconds } });
    this.name = 'TooManyAttemptsError';
  }
}

/**
 * Requires a valid token on every route but PUBLIC_PATHS; puts the principal in `c.var.principal`. A page request
 * without one is redirected to /login; anything else is 401 with `WWW-Authenticate` (RFC 6750). Wrong tokens count
 * against the client's address (the same budget as /login's, see SignInLimiter); an address over it is answered
 * 429 before its token is even looked at, or it could go on guessing.
 */
export function requireToken(store: TokenStore, limiter: SignInLimiter): MiddlewareHandler<{ Variables: AuthVariables }> {
  return async (c, next) => {
    if (PUBLIC_PATHS.has(c.req.path)) return next();
    const { token, via } = presentedToken(c);
    const address = clientAddress(c);
    if (token) {
      const wait = limiter.refusedFor(address);
      if (wait) {
        c.header('Retry-After', String(wait));
        throw new TooManyAttemptsError(wait);
      }
    }
    const principal = token ? await store.verify(token) : null;
    if (principal) {
      c.set('principal', principal);
      c.set('viaCookie', via === 'cookie');
      return next();
    }
    if (token) limiter.failed(address);
    if (via === 'cookie') deleteCookie(c, SESSION_COOKIE, { path: '/' });
    if (via !== 'header' && wantsPage(c)) {
      const url = new URL(c.req.url);
      return c.redirect(`/login?next=${encodeURIComponent(url.pathname + url.search)}`, 302);
    }
    if (via === 'header' && !token) {
      c.header('WWW-Authenticate', 'Bearer realm="slicewise", error="invalid_request"');
      throw new SliceWiseError('the Authorization header must be `Bearer <token>`', { status: 401, code: 'unauthorized' });
    }
    if (!token) {
      c.header('WWW-Authenticate', 'Bearer realm="slicewise"');
      throw new SliceWiseError('this API needs a token: send `Authorization: Bearer <token>` (an admin makes one with `slicewise token create`), or sign in at /login', { status: 401, code: 'unauthorized' });
    }
    c.header('WWW-Authenticate', 'Bearer realm="slicewise", error="invalid_token"');
    throw new SliceWiseError('the token is not valid (unknown or revoked)', { status: 401, code: 'unauthorized' });
  };
}

/** The role a request acts with: an open API (no tokens configured) lets everyone act as admin. */
export function roleOf(c: Context<{ Variables: AuthVariables }>, authOn: boolean): Role {
  return authOn ? (c.get('principal')?.role ?? 'user') : 'admin';
}

/** Whether a host the API binds is loopback only, where an open API is allowed. */
export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h) || /^::ffff:127\.\d+\.\d+\.\d+$/.test(h);
}
