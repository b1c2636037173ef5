import { readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { inspect } from 'node:util';
import { SliceWiseError } from '../lib/errors.ts';
import { downloadFile } from './fetch.ts';
import { extractArchive } from './extract.ts';
import { env } from '../env.ts';

export interface KaggleCredentials {
  username: string;
  key: string;
}

function credentialsError(reason: string): SliceWiseError {
  return new SliceWiseError(
    `Kaggle credentials ${reason}. Either set the environment variables KAGGLE_USERNAME and KAGGLE_KEY, or put ` +
      `{"username": "...", "key": "..."} in ~/.kaggle/kaggle.json (create it at kaggle.com > Settings > API > ` +
      `Create New Token; chmod 600 it). KAGGLE_CONFIG_DIR overrides the ~/.kaggle directory.`,
    { status: 400, code: 'kaggle_credentials' },
  );
}

/** Hide the key from JSON.stringify and util.inspect (console.log, pino's default serialisers). */
function guarded(username: string, key: string): KaggleCredentials {
  const creds = { username, key };
  Object.defineProperty(creds, 'toJSON', { enumerable: false, value: () => ({ username, key: '[redacted]' }) });
  Object.defineProperty(creds, inspect.custom, { enumerable: false, value: () => `KaggleCredentials { username: ${JSON.stringify(username)}, key: [redacted] }` });
  return creds;
}

/**
 * Kaggle API credentials: KAGGLE_USERNAME + KAGGLE_KEY from the environment, else `kaggle.json` in
 * KAGGLE_CONFIG_DIR or `<home>/.kaggle` (the same places the official CLI looks). Throws
 * SliceWiseError(400, 'kaggle_credentials') naming both options; the key never appears in an error.
 * The returned object hides the key from JSON.stringify and util.inspect.
 */
export function kaggleCredentials(source: NodeJS.ProcessEnv = process.env, home: string = homedir()): KaggleCredentials {
  const { kaggleUsername: user, kaggleKey: key, kaggleConfigDir } = env(source);
  if (user && key) return guarded(user, key);

  const dir = kaggleConfigDir || join(home, '.kaggle');
  const file = join(dir, 'kaggle.json');
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    const state = user
      ? 'are incomplete (KAGGLE_USERNAME is set but KAGGLE_KEY is not)'
      : key
        ? 'are incomplete (KAGGLE_KEY is set but KAGGLE_USERNAME is not)'
        : 'are not configured';
    throw credentialsError(`${state}, and ${file} does not exist or is unreadable`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw credentialsError(`in ${file} are not valid JSON`);
  }
  const obj = (parsed ?? {}) as { username?: unknown; key?: unknown };
  if (typeof obj.username !== 'string' || typeof obj.key !== 'string' || !obj.username.trim() || !obj.key.trim()) {
    throw credentialsError(`in ${file} lack a "username" or "key" string`);
  }
  return guarded(obj.username.trim(), obj.key.trim());
}

export interface KaggleDownloadOptions {
  /** Default: $KAGGLE_API_BASE or https://www.kaggle.com/api/v1 */
  apiBase?: string;
  signal?: AbortSignal;
  onProgress?: (msg: string, done?: number, total?: number) => void;
  /** Default: kaggleCredentials(). */
  credentials?: KaggleCredentials;
  /** Keep the downloaded zip after extraction (default false: BraTS is ~4 GB). */
  keepArchive?: boolean;
  /** Passed to downloadFile (default 3). */
  retries?: number;
}

export interface KaggleDownloadResult {
  /** The extracted dataset (destDir/extracted). */
  dir: string;
  owner: string;
  dataset: string;
  bytes: number;
}

const SLUG = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$/;

/**
 * Download a Kaggle dataset through the Kaggle API (GET {apiBase}/datasets/download/{owner}/{dataset}, HTTP
 * Basic auth) into `destDir/download/<owner>__<dataset>.zip` (resumable), then extract it into `destDir/extracted`.
 * Kaggle answers with a redirect to a signed storage URL; the Authorization header is not sent there.
 * The credentials are never logged, put in errors or returned.
 */
export async function downloadKaggleDataset(owner: string, dataset: string, destDir: string, opts: KaggleDownloadOptions = {}): Promise<KaggleDownloadResult> {
  if (!SLUG.test(owner) || !SLUG.test(dataset)) {
    throw new SliceWiseError(`bad Kaggle dataset reference ${JSON.stringify(`${owner}/${dataset}`)}`, { status: 400, code: 'bad_source' });
  }
  const creds = opts.credentials ?? kaggleCredentials();
  const apiBase = (opts.apiBase ?? env().kaggleApiBase).replace(/\/+$/, '');
  if (!URL.canParse(apiBase)) throw new SliceWiseError(`KAGGLE_API_BASE=${apiBase} is not a URL`, { status: 500, code: 'bad_env', details: { name: 'KAGGLE_API_BASE' } });
  const url = `${apiBase}/datasets/download/${encodeURIComponent(owner)}/${encodeURIComponent(dataset)}`;
  const zipPath = join(destDir, 'download', `${owner}__${dataset}.zip`);
  const ref = `kaggle:${owner}/${dataset}`;

  opts.onProgress?.(`downloading ${ref}`);
  let bytes: number;
  try {
    const r = await downloadFile(url, zipPath, {
      signal: opts.signal,
      retries: opts.retries,
      // The API base is the operator's setting (tests point it at loopback), not a caller's: its host is not
      // checked. The storage host Kaggle redirects to is, like any other.
      network: { trustedOrigins: [new URL(apiBase).origin] },
      headers: { authorization: 'Basic ' + Buffer.from(`${creds.username}:${creds.key}`).toString('base64') },
      onProgress: (done, total) => opts.onProgress?.(`downloading ${ref}`, done, total),
    });
    bytes = r.bytes;
  } catch (err) {
    if (err instanceof SliceWiseError && (err.code === 'download_unauthorized' || err.code === 'download_forbidden' || err.code === 'download_not_found')) {
      const hint =
        err.code === 'download_unauthorized'
          ? 'Kaggle rejected the credentials (check KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json; an expired token must be re-created)'
          : err.code === 'download_forbidden'
            ? 'Kaggle refused access (the dataset may require accepting its terms on kaggle.com while logged in)'
            : `no such Kaggle dataset ${owner}/${dataset}`;
      throw new SliceWiseError(`${ref}: ${hint}. ${err.message}`, { status: err.status, code: err.code, details: { ...err.details, source: ref } });
    }
    throw err;
  }

  opts.onProgress?.(`extracting ${ref}`);
  const extracted = await extractArchive(zipPath, join(destDir, 'extracted'), {
    signal: opts.signal,
    onProgress: (done, total) => opts.onProgress?.(`extracting ${ref}`, done, total),
  });
  if (!opts.keepArchive) await rm(zipPath, { force: true });
  return { dir: extracted.dir, owner, dataset, bytes };
}
