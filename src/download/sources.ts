import { SliceWiseError } from '../lib/errors.ts';

/**
 * Where a dataset comes from.
 *  - synthetic: generated locally by `slicewise synth` (count = patients for BraTS, images per class for Kaggle)
 *  - path: a local directory (used in place) or archive (.zip / .tar.gz / .tgz / .tar, extracted)
 *  - https: an archive to download, optionally pinned by sha256
 *  - kaggle: a Kaggle dataset, downloaded through the Kaggle API with the user's credentials
 */
export type Source =
  | { kind: 'synthetic'; count?: number }
  | { kind: 'path'; path: string }
  | { kind: 'https'; url: string; sha256?: string }
  | { kind: 'kaggle'; owner: string; dataset: string };

export const ACCEPTED_SOURCE_FORMS = [
  'synthetic',
  'synthetic:N                      (N = patients for BraTS, images per class for Kaggle)',
  'path:DIR_OR_ARCHIVE              (a directory used in place, or a .zip/.tar.gz/.tgz/.tar)',
  'https://HOST/FILE[#sha256=HEX64] (an archive to download, optionally pinned by its sha256)',
  'kaggle:OWNER/DATASET             (e.g. kaggle:awsaf49/brats20-dataset-training-validation)',
] as const;

/** Kaggle owner and dataset slugs: letters, digits, '-', '_', '.', not starting with a dot. */
const SLUG = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$/;

const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);

/** True for hosts that plain http is allowed to (loopback only: test servers). */
export function isLoopbackHost(hostname: string): boolean {
  return LOOPBACK_HOSTS.has(hostname.toLowerCase()) || /^127\.\d+\.\d+\.\d+$/.test(hostname);
}

/**
 * A URL safe to print: no user-info, and query values hidden (signed storage URLs carry their signature
 * in the query string). Falls back to a coarse redaction for strings that are not URLs.
 */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    u.username = '';
    u.password = '';
    const keys = [...u.searchParams.keys()];
    u.search = '';
    u.hash = '';
    const query = keys.length ? '?' + [...new Set(keys)].map((k) => `${encodeURIComponent(k)}=...`).join('&') : '';
    return u.toString() + query;
  } catch {
    return url.replace(/\/\/[^/@\s]*@/, '//').replace(/\?.*$/, '?...');
  }
}

function badSource(spec: string, reason: string): SliceWiseError {
  const shown = redactUrl(spec).slice(0, 300);
  return new SliceWiseError(`bad data source ${JSON.stringify(shown)}: ${reason}. Accepted forms:\n  ${ACCEPTED_SOURCE_FORMS.join('\n  ')}`, {
    status: 400,
    code: 'bad_source',
    details: { source: shown, reason, accepted: ACCEPTED_SOURCE_FORMS.map((f) => f.split(/\s+/)[0]) },
  });
}

/**
 * Parse a source spec:
 *   `synthetic`, `synthetic:N`, `path:DIR_OR_ARCHIVE`, `https://...[#sha256=<64 hex>]`, `kaggle:OWNER/DATASET`.
 * Plain `http://` is accepted only for loopback hosts (127.0.0.0/8, localhost, [::1]) so tests can run a
 * local server, which downloads then reach only with SLICEWISE_ALLOW_PRIVATE_NETWORKS=1 (network.ts); anything
 * else must be https. `file:` and other schemes are refused. Throws SliceWiseError(400, 'bad_source') listing
 * the forms. This checks the form only: where a source may point is policy.ts's question.
 */
const CREDENTIAL_PARAM = /^(x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|signature|sig|token|access_token|api_key|apikey|key|password|secret)$/i;

export function parseSource(spec: string): Source {
  if (typeof spec !== 'string') throw badSource(String(spec), 'not a string');
  const s = spec.trim();
  if (s === '') throw badSource(s, 'empty');

  if (s === 'synthetic') return { kind: 'synthetic' };
  if (s.startsWith('synthetic:')) {
    const n = s.slice('synthetic:'.length);
    // Only the form here; how many may be generated is policy.ts's question (assertSyntheticCount), which names
    // the limit. Nine digits keep the number exact and the message short.
    if (!/^\d{1,9}$/.test(n) || Number(n) < 1) throw badSource(s, `count must be a positive integer of at most 9 digits (got ${JSON.stringify(n.slice(0, 20))})`);
    return { kind: 'synthetic', count: Number(n) };
  }

  if (s.startsWith('path:')) {
    const p = s.slice('path:'.length);
    if (p.trim() === '') throw badSource(s, 'path is empty');
    return { kind: 'path', path: p };
  }

  if (s.startsWith('kaggle:')) {
    const rest = s.slice('kaggle:'.length);
    const parts = rest.split('/');
    if (parts.length !== 2 || !SLUG.test(parts[0]!) || !SLUG.test(parts[1]!)) {
      throw badSource(s, 'expected kaggle:OWNER/DATASET (letters, digits, "-", "_", ".")');
    }
    return { kind: 'kaggle', owner: parts[0]!, dataset: parts[1]! };
  }

  if (/^file:/i.test(s)) {
    throw badSource(s, 'file: URLs are not accepted; a local folder or archive is path:DIR_OR_ARCHIVE, read only under the folders the operator allowed');
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(s) && !/^https?:\/\//i.test(s)) {
    throw badSource(s, `unsupported URL scheme ${JSON.stringify(s.slice(0, s.indexOf(':') + 1).toLowerCase())}; downloads are https://`);
  }

  if (/^https?:\/\//i.test(s)) {
    let u: URL;
    try {
      u = new URL(s);
    } catch {
      throw badSource(s, 'not a valid URL');
    }
    if (u.protocol === 'http:' && !isLoopbackHost(u.hostname)) {
      throw badSource(s, 'plain http is only accepted for loopback test servers; use https');
    }
    if (u.protocol !== 'https:' && u.protocol !== 'http:') throw badSource(s, 'unsupported URL scheme');
    // A run stores its sources, and job data, Bull Board and the database must never hold a secret.
    if (u.username || u.password) throw badSource(s, 'URLs with credentials are refused (they would be stored with the run)');
    const secretParam = [...u.searchParams.keys()].find((k) => CREDENTIAL_PARAM.test(k));
    if (secretParam) throw badSource(s, `the URL carries a credential in its query ('${secretParam}'), which would be stored with the run; serve the archive without it or use path:`);
    let sha256: string | undefined;
    if (u.hash) {
      const m = /^#sha256=([0-9a-fA-F]{64})$/.exec(u.hash);
      if (!m) throw badSource(s, 'the only accepted URL fragment is #sha256=<64 hex digits>');
      sha256 = m[1]!.toLowerCase();
      u.hash = '';
    }
    return sha256 ? { kind: 'https', url: u.toString(), sha256 } : { kind: 'https', url: u.toString() };
  }

  throw badSource(s, 'unrecognised form');
}

/**
 * The name of a source's raw-data folder (layout's rawDir): two runs with the same source share one download,
 * which is what --skip-download reuses.
 */
export function sourceKey(source: Source): string {
  switch (source.kind) {
    case 'synthetic':
      return `synthetic-${source.count ?? 'default'}`;
    case 'kaggle':
      return `kaggle-${source.owner}-${source.dataset}`;
    case 'https':
      return `https-${new URL(source.url).pathname.split('/').filter(Boolean).pop() ?? 'download'}`;
    case 'path':
      return 'path';
  }
}

/**
 * The spec form again (parseSource(formatSource(s)) equals s): what a run stores so a worker can rebuild the
 * source. It holds no credentials: parseSource refuses URLs that carry them.
 */
export function formatSource(s: Source): string {
  switch (s.kind) {
    case 'synthetic':
      return s.count === undefined ? 'synthetic' : `synthetic:${s.count}`;
    case 'path':
      return `path:${s.path}`;
    case 'https':
      return s.sha256 ? `${s.url}#sha256=${s.sha256}` : s.url;
    case 'kaggle':
      return `kaggle:${s.owner}/${s.dataset}`;
  }
}

/** A printable form of a source; never contains credentials (URL user-info and query values are hidden). */
export function describeSource(s: Source): string {
  if (s.kind !== 'https') return formatSource(s);
  return s.sha256 ? `${redactUrl(s.url)} (sha256 ${s.sha256.slice(0, 12)}...)` : redactUrl(s.url);
}
