import { writeFileSync } from 'node:fs';
import { mkdir, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { SliceWiseError } from './errors.ts';

/**
 * Temporary names carry host and pid: a process killed mid-write (kill -9, out of memory) leaves its temporary
 * behind, and a later writer there removes those whose process is gone. A pid says nothing about another machine
 * sharing the data dir, so another host's temporaries go only once they are older than any write takes
 * (OTHER_HOST_STALE_MS). No '-' in the host part, so the name parses back.
 */
const HOST = hostname().replace(/[^A-Za-z0-9_.]/g, '_');
const STALE = /\.(?:tmp|old)-([A-Za-z0-9_.]+)-(\d+)-[0-9a-f]{8}$/;

/** A temporary of another host untouched this long belongs to no write in progress: the longest takes minutes. */
export const OTHER_HOST_STALE_MS = 24 * 3600_000;

function tempSuffix(what: 'tmp' | 'old'): string {
  return `.${what}-${HOST}-${process.pid}-${randomBytes(4).toString('hex')}`;
}

/** Whether a process of this number exists on this host (one we may not signal counts). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes the temporaries that dead writers left in `parent` (see HOST above). For an owner of a folder of many
 * outputs (a run's processed patients) once its writers are done: the writers themselves sweep a folder only the
 * first time they write there, as listing a folder of thousands of patients for each of them made a run quadratic.
 */
export async function sweepDeadWriters(parent: string): Promise<void> {
  const entries = await readdir(parent).catch(() => [] as string[]);
  for (const e of entries) {
    const m = STALE.exec(e);
    if (!m) continue;
    const path = join(parent, e);
    let dead: boolean;
    if (m[1] === HOST) {
      const pid = Number(m[2]);
      dead = pid !== process.pid && !processAlive(pid);
    } else {
      const modified = await stat(path).then((st) => st.mtimeMs, () => Date.now());
      dead = Date.now() - modified > OTHER_HOST_STALE_MS;
    }
    if (dead) await rm(path, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** The disk is out of room (or of quota, or of the file size this process may write). */
const NO_SPACE = new Set(['ENOSPC', 'EDQUOT', 'EFBIG']);

/**
 * A write that failed, naming the file: Node's own message for a failed write ("EFBIG: file too large, write")
 * names none. Not a 4xx: a full or read-only disk is the machine's state, not bad input, so the step is retried.
 */
export class FileWriteError extends SliceWiseError {
  readonly path: string;
  constructor(path: string, err: unknown) {
    const errno = (err as NodeJS.ErrnoException)?.code;
    super(`cannot write ${path}: ${(err as Error)?.message ?? String(err)}`, {
      status: errno && NO_SPACE.has(errno) ? 507 : 500,
      code: 'write_failed',
      details: { path, ...(errno ? { errno } : {}) },
      cause: err,
    });
    this.name = 'FileWriteError';
    this.path = path;
  }
}

/**
 * Folders this process has swept of dead writers' temporary files: once each, as a folder of many outputs (a
 * prediction's thousands of masks) would otherwise be listed for every file. A process that starts again
 * rewrites what it was writing, and sweeps then. Forgotten past a bound: a worker lives for months.
 */
const swept = new Set<string>();
async function sweepOnce(dir: string): Promise<void> {
  if (swept.has(dir)) return;
  if (swept.size >= 10_000) swept.clear();
  swept.add(dir);
  await sweepDeadWriters(dir);
}

/**
 * Write a file so that readers see either the old content or the new, never half of it: BullMQ delivers a
 * job at least once, and a worker killed mid-write must not leave a truncated output that a retry trusts.
 */
export async function writeFileAtomic(path: string, data: string | Uint8Array | NodeJS.ArrayBufferView): Promise<void> {
  const tmp = `${path}${tempSuffix('tmp')}`;
  try {
    await mkdir(dirname(path), { recursive: true });
    await sweepOnce(dirname(path));
    await writeFile(tmp, data as Uint8Array);
    await rename(tmp, path);
  } catch (err) {
    // The partial temp file of a full disk would take up the room a retry needs.
    await rm(tmp, { force: true }).catch(() => undefined);
    throw new FileWriteError(path, err);
  }
}

/** Same contract for a JSON document (pretty-printed, trailing newline). */
export function writeJsonAtomic(path: string, value: unknown): Promise<void> {
  return writeFileAtomic(path, JSON.stringify(value, null, 2) + '\n');
}

/** Below this size a file is written synchronously: one syscall costs less than a hand-off to libuv's thread pool. */
const SMALL_WRITE = 1 << 20;

/**
 * Write a file inside a folder that replaceDirAtomic is filling: no reader looks there before the folder is renamed
 * into place, so the file needs no temporary name of its own (for a tiny patient the extra mkdir, listing and
 * rename per file were most of its cost). A failure names the file and removes what was written of it.
 */
export async function writeNewFile(path: string, data: string | Uint8Array): Promise<void> {
  try {
    if (data.length < SMALL_WRITE) writeFileSync(path, data);
    else await writeFile(path, data);
  } catch (err) {
    await rm(path, { force: true }).catch(() => undefined);
    throw new FileWriteError(path, err);
  }
}

/** A sibling of `dir` for a temporary or discarded copy: hidden (dot), unique, on the same filesystem for rename. */
function siblingName(dir: string, what: 'tmp' | 'old'): string {
  return join(dirname(dir), `.${basename(dir)}${tempSuffix(what)}`);
}

/** Move `dir` out of the way (one rename, so no reader sees it half deleted), then delete it. Absent is fine. */
export async function removeDirAtomic(dir: string): Promise<void> {
  const old = siblingName(dir, 'old');
  try {
    await rename(dir, old);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new FileWriteError(dir, err);
  }
  await rm(old, { recursive: true, force: true });
}

/**
 * Replace the folder `dir` with one whose files `fill` writes into a fresh temporary folder: readers see the old
 * folder, then (briefly) none, then the new one complete, never a mix of old and new files or a partial set (a
 * process killed mid-way leaves only a hidden temporary sibling). For outputs made of several files, where renaming
 * each file into place would leave a window with some new and some old. When `fill` fails nothing is replaced.
 */
export async function replaceDirAtomic(dir: string, fill: (tmpDir: string) => Promise<void>): Promise<void> {
  const tmp = siblingName(dir, 'tmp');
  try {
    await mkdir(tmp, { recursive: true });
    await sweepOnce(dirname(dir));
  } catch (err) {
    throw new FileWriteError(tmp, err);
  }
  try {
    await fill(tmp);
    // rename() replaces an empty folder but not a full one: move the old one aside and try again. A concurrent
    // attempt at the same output (a job delivered twice) may put its own folder back in between; a few rounds
    // settle it, and either attempt's folder is a complete one.
    for (let round = 0; ; round++) {
      try {
        await rename(tmp, dir);
        return;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code !== 'ENOTEMPTY' && code !== 'EEXIST') || round >= 5) throw new FileWriteError(dir, err);
      }
      await removeDirAtomic(dir);
    }
  } catch (err) {
    await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
}
