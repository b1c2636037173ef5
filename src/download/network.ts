/**
 * Which hosts a download may reach. A run's source URL comes from whoever may call the API, so without a check a
 * caller could make a worker fetch from the cloud metadata service (169.254.169.254), a database on the private
 * network or a service on loopback, and read the answer back through the run's error or data. Every address a
 * host name resolves to is checked, and the connection is pinned to a checked address, so a DNS answer that
 * changes between the check and the connect (rebinding) cannot slip past.
 */
import { lookup as dnsLookup } from 'node:dns/promises';
import type { LookupAddress, LookupOptions } from 'node:dns';
import { isIP } from 'node:net';
import { SliceWiseError } from '../lib/errors.ts';
import { env } from '../env.ts';
import { redactUrl } from './sources.ts';

/** An address range as [first address as a bigint, prefix length, address bits, name]. */
type Range = readonly [bigint, number, 32 | 128, string];

function v4(text: string): bigint | undefined {
  const parts = text.split('.');
  if (parts.length !== 4 || !parts.every((p) => /^\d{1,3}$/.test(p) && Number(p) <= 255)) return undefined;
  return parts.reduce((a, p) => (a << 8n) | BigInt(Number(p)), 0n);
}

function v6(text: string): bigint | undefined {
  let s = text.replace(/^\[|\]$/g, '').replace(/%.*$/, ''); // brackets and zone id
  // A trailing dotted quad (::ffff:1.2.3.4) is two groups.
  const quad = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (quad) {
    const n = v4(quad[2]!);
    if (n === undefined) return undefined;
    s = `${quad[1]}${((n >> 16n) & 0xffffn).toString(16)}:${(n & 0xffffn).toString(16)}`;
  }
  const halves = s.split('::');
  if (halves.length > 2) return undefined;
  const head = halves[0] ? halves[0].split(':') : [];
  const tail = halves.length === 2 && halves[1] ? halves[1].split(':') : [];
  const missing = 8 - head.length - tail.length;
  if ((halves.length === 1 && missing !== 0) || missing < 0) return undefined;
  const groups = [...head, ...Array(halves.length === 2 ? missing : 0).fill('0'), ...tail];
  if (groups.length !== 8 || !groups.every((g) => /^[0-9a-f]{1,4}$/i.test(g))) return undefined;
  return groups.reduce((a, g) => (a << 16n) | BigInt(parseInt(g, 16)), 0n);
}

function range(cidr: string, name: string): Range {
  const [base, len] = cidr.split('/') as [string, string];
  const four = v4(base);
  return four !== undefined ? [four, Number(len), 32, name] : [v6(base)!, Number(len), 128, name];
}

const V4_RANGES: Range[] = [
  range('0.0.0.0/8', 'unspecified ("this network")'),
  range('10.0.0.0/8', 'private'),
  range('100.64.0.0/10', 'carrier-grade NAT'),
  range('127.0.0.0/8', 'loopback'),
  range('169.254.0.0/16', 'link-local (cloud metadata services live here)'),
  range('172.16.0.0/12', 'private'),
  range('192.0.0.0/24', 'IETF protocol assignments'),
  range('192.0.2.0/24', 'documentation'),
  range('192.168.0.0/16', 'private'),
  range('198.18.0.0/15', 'benchmarking'),
  range('198.51.100.0/24', 'documentation'),
  range('203.0.113.0/24', 'documentation'),
  range('224.0.0.0/4', 'multicast'),
  range('240.0.0.0/4', 'reserved (and broadcast)'),
];

const V6_RANGES: Range[] = [
  range('::/128', 'unspecified'),
  range('::1/128', 'loopback'),
  range('::/96', 'IPv4-compatible (deprecated)'),
  range('64:ff9b:1::/48', 'local-use NAT64'),
  range('100::/64', 'discard-only'),
  range('2001:db8::/32', 'documentation'),
  range('fc00::/7', 'unique local (ULA)'),
  range('fe80::/10', 'link-local'),
  range('fec0::/10', 'site-local (deprecated)'),
  range('ff00::/8', 'multicast'),
];

function inRange(n: bigint, [base, len, bits]: Range): boolean {
  const shift = BigInt(bits - len);
  return n >> shift === base >> shift;
}

/**
 * The name of the non-public range `address` falls in ('loopback', 'private', 'link-local ...'), or undefined
 * for a public address. IPv6 forms that carry an IPv4 address (mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4
 * 2002::/16) are judged by that IPv4 address. Text that is not an IP address counts as blocked.
 */
export function blockedRange(address: string): string | undefined {
  const four = v4(address);
  if (four !== undefined) return V4_RANGES.find((r) => inRange(four, r))?.[3];
  const six = v6(address);
  if (six === undefined) return 'not an IP address';
  const embedded =
    six >> 32n === 0xffffn
      ? six & 0xffffffffn // ::ffff:a.b.c.d
      : six >> 32n === 0x64ff9b0000000000000000n
        ? six & 0xffffffffn // NAT64 64:ff9b::a.b.c.d
        : six >> 112n === 0x2002n
          ? (six >> 80n) & 0xffffffffn // 6to4 2002:AABB:CCDD::
          : undefined;
  if (embedded !== undefined) {
    const dotted = [24n, 16n, 8n, 0n].map((s) => (embedded >> s) & 0xffn).join('.');
    const inner = blockedRange(dotted);
    return inner ? `${inner}, inside an IPv6 address` : undefined;
  }
  return V6_RANGES.find((r) => inRange(six, r))?.[3];
}

/** A URL's host without IPv6 brackets, lower-cased. */
function bareHost(url: URL): string {
  return url.hostname.replace(/^\[|\]$/g, '').toLowerCase();
}

/** Names that resolve to loopback by convention (RFC 6761), whatever DNS says. */
function isLocalhostName(host: string): boolean {
  return host === 'localhost' || host.endsWith('.localhost') || host === 'localhost.localdomain';
}

function refused(url: URL, host: string, address: string, why: string): SliceWiseError {
  const shown = redactUrl(url.toString());
  const via = address === host ? '' : ` (it resolves to ${address})`;
  return new SliceWiseError(
    `refusing to download ${shown}: ${host}${via} is a ${why} address; downloads reach public addresses only ` +
      `(an operator can allow others with SLICEWISE_ALLOW_PRIVATE_NETWORKS=1)`,
    { status: 400, code: 'private_address', details: { url: shown, host, address, range: why } },
  );
}

export interface NetworkPolicy {
  /** Default: SLICEWISE_ALLOW_PRIVATE_NETWORKS. */
  allowPrivate?: boolean;
  /** Origins the operator configured (KAGGLE_API_BASE): not checked. Redirects away from them are. */
  trustedOrigins?: readonly string[];
}

function allowsPrivate(policy: NetworkPolicy): boolean {
  return policy.allowPrivate ?? env().allowPrivateNetworks;
}

/**
 * What can be told about a URL without DNS: an IP literal in a blocked range, or a localhost name. For the API's
 * answer at the door; the download checks again, with DNS, at connect time. Throws 'private_address'.
 */
export function assertPublicLiteral(url: URL, policy: NetworkPolicy = {}): void {
  if (allowsPrivate(policy) || policy.trustedOrigins?.includes(url.origin)) return;
  const host = bareHost(url);
  if (isLocalhostName(host)) throw refused(url, host, host, 'loopback');
  if (isIP(host)) {
    const why = blockedRange(host);
    if (why) throw refused(url, host, host, why);
  }
}

export interface PinnedAddress {
  address: string;
  family: 4 | 6;
}

/**
 * Resolves the URL's host and checks every address it resolves to; returns the address to connect to, or
 * undefined when the policy allows the host without a check (then the usual DNS lookup applies).
 */
export async function resolvePublic(url: URL, policy: NetworkPolicy = {}): Promise<PinnedAddress | undefined> {
  if (allowsPrivate(policy) || policy.trustedOrigins?.includes(url.origin)) return undefined;
  assertPublicLiteral(url, policy);
  const host = bareHost(url);
  const literal = isIP(host);
  let addresses: LookupAddress[];
  if (literal) {
    addresses = [{ address: host, family: literal }];
  } else {
    try {
      addresses = await dnsLookup(host, { all: true, verbatim: true });
    } catch (err) {
      throw new SliceWiseError(`cannot resolve ${host} for ${redactUrl(url.toString())}: ${(err as Error).message}`, {
        status: 502,
        code: 'download_dns',
        details: { host },
        cause: err,
      });
    }
  }
  for (const a of addresses) {
    const why = blockedRange(a.address);
    if (why) throw refused(url, host, a.address, why);
  }
  if (addresses.length === 0) throw new SliceWiseError(`cannot resolve ${host}: no addresses`, { status: 502, code: 'download_dns', details: { host } });
  return { address: addresses[0]!.address, family: addresses[0]!.family === 6 ? 6 : 4 };
}

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

/**
 * A `lookup` for http.request that answers with the checked address only: the socket connects where the check
 * looked, and TLS still verifies the certificate against the host name.
 */
export function pinnedLookup(pinned: PinnedAddress) {
  return (_host: string, options: LookupOptions | LookupCallback, cb?: LookupCallback) => {
    const callback = (typeof options === 'function' ? options : cb)!;
    const all = typeof options === 'object' && options.all;
    if (all) callback(null, [{ address: pinned.address, family: pinned.family }]);
    else callback(null, pinned.address, pinned.family);
  };
}
