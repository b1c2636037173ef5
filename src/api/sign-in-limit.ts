/**
 * Failed sign-ins per client address: after `limit` wrong tokens within a window, the address is refused (429 with
 * Retry-After) until the window ends, whatever it sends, so guessing stops there while every other address signs in
 * as before.
 *
 * One budget covers every way a token is presented: the /login form, `Authorization: Bearer` and the login cookie.
 * The secret is the same whichever way it comes, so a limit on the form alone would be walked around by sending
 * the guesses as a header. Tokens made by `slicewise token create` carry 256 random bits and cannot be guessed at
 * any rate, but SLICEWISE_TOKENS takes any hash, so a weak token is possible; and the limit also bounds the noise
 * one client with a revoked token makes. The price: a script hammering the API with a revoked token gets 429s, and
 * clients sharing its address (behind one NAT) wait out the window with it.
 *
 * In memory, so per API process: two API processes behind a balancer each allow `limit`. That is still a fixed
 * budget per minute, which is what makes guessing hopeless; a shared store would add a Redis round trip to every
 * refused request for little more. Addresses are the TCP peer's: X-Forwarded-For is not trusted (a client could
 * name a new address with each request), so behind a reverse proxy every client shares the proxy's budget and the
 * proxy should do its own limiting.
 */
import { isIPv6 } from 'node:net';
import type { IncomingMessage } from 'node:http';
import type { Context } from 'hono';
import type { Logger } from '../lib/logger.ts';

export interface SignInLimitOptions {
  logger: Logger;
  /** Wrong tokens an address may send per window (default 10). */
  limit?: number;
  /** The window, from an address's first failure (default one minute). */
  windowMs?: number;
}

interface Window {
  failures: number;
  endsAt: number;
  /** The operator was told this window's refusal (once per address per window, not per attempt). */
  told: boolean;
}

/**
 * Addresses remembered at once. A flood from many addresses must not grow memory without bound; when full, the
 * expired windows go first, then the oldest, which at worst gives that address a fresh budget early.
 */
const MAX_ADDRESSES = 10_000;

/**
 * The key an address is counted under: IPv4 as is (also when written IPv4-in-IPv6), IPv6 by its /64, since one
 * machine is usually given a whole /64 and could otherwise take a new address per guess.
 */
export function addressKey(address: string): string {
  const a = address.replace(/%.*$/, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(a);
  if (mapped) return mapped[1]!;
  if (!isIPv6(a)) return a;
  const [head, tail] = a.split('::') as [string, string | undefined];
  const groups = (s: string | undefined) => (s ? s.split(':').flatMap((g) => (g.includes('.') ? ['0', '0'] : [g])) : []);
  const h = groups(head);
  const t = groups(tail);
  const full = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  return `${full.slice(0, 4).map((g) => parseInt(g, 16).toString(16)).join(':')}::/64`;
}

/** The TCP peer's address, or undefined when the request came from no socket (app.request() in tests). */
export function clientAddress(c: Context): string | undefined {
  return (c.env as { incoming?: IncomingMessage } | undefined)?.incoming?.socket?.remoteAddress;
}

export class SignInLimiter {
  private readonly windows = new Map<string, Window>();
  private readonly logger: Logger;
  readonly limit: number;
  readonly windowMs: number;

  constructor({ logger, limit = 10, windowMs = 60_000 }: SignInLimitOptions) {
    this.logger = logger;
    this.limit = limit;
    this.windowMs = windowMs;
  }

  /**
   * Whole seconds `address` must wait before it may present a token again, or 0. The first refusal of a window is
   * logged. A request from no socket has no address to count and is never refused.
   */
  refusedFor(address: string | undefined): number {
    if (address === undefined) return 0;
    const key = addressKey(address);
    const w = this.current(key);
    if (!w || w.failures < this.limit) return 0;
    const seconds = Math.max(1, Math.ceil((w.endsAt - Date.now()) / 1000));
    if (!w.told) {
      w.told = true;
      this.logger.warn(`${w.failures} wrong tokens from ${key} within ${Math.round(this.windowMs / 1000)} s: refusing its sign-ins and tokens for the next ${seconds} s (this API process only)`);
    }
    return seconds;
  }

  /** Counts a wrong token from `address`. */
  failed(address: string | undefined): void {
    if (address === undefined) return;
    const key = addressKey(address);
    const w = this.current(key);
    if (w) {
      w.failures++;
      return;
    }
    if (this.windows.size >= MAX_ADDRESSES) this.makeRoom();
    this.windows.set(key, { failures: 1, endsAt: Date.now() + this.windowMs, told: false });
  }

  private current(key: string): Window | undefined {
    const w = this.windows.get(key);
    if (w && w.endsAt <= Date.now()) {
      this.windows.delete(key);
      return undefined;
    }
    return w;
  }

  private makeRoom(): void {
    const now = Date.now();
    for (const [k, w] of this.windows) if (w.endsAt <= now) this.windows.delete(k);
    // Insertion order is the order windows began: the first is the oldest.
    while (this.windows.size >= MAX_ADDRESSES) this.windows.delete(this.windows.keys().next().value!);
  }
}
