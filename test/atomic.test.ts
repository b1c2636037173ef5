/**
 * What sweepDeadWriters removes of the temporaries atomic writes leave behind, on real files: this host's whose
 * process is gone, and another host's only once they are older than any write takes.
 */
import { mkdir, mkdtemp, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OTHER_HOST_STALE_MS, sweepDeadWriters } from '../src/lib/atomic.ts';

const host = hostname().replace(/[^A-Za-z0-9_.]/g, '_');
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'slicewise-atomic-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A pid no process has: above the kernel's pid_max default and not ours. */
const DEAD_PID = 4_194_304 + 17;

describe('sweepDeadWriters', () => {
  it("removes this host's temporaries of dead processes and another host's stale ones, and nothing else", async () => {
    const old = new Date(Date.now() - OTHER_HOST_STALE_MS - 3600_000);
    const names = {
      mineDead: `.BraTS20_Training_001.tmp-${host}-${DEAD_PID}-0a1b2c3d`,
      mineLive: `.BraTS20_Training_002.tmp-${host}-${process.pid}-0a1b2c3d`,
      otherStale: '.BraTS20_Training_003.tmp-otherhost.example-4242-0a1b2c3d',
      otherFresh: '.BraTS20_Training_004.old-otherhost.example-4242-0a1b2c3d',
      output: 'BraTS20_Training_005',
    };
    for (const n of Object.values(names)) {
      await mkdir(join(dir, n), { recursive: true });
      await writeFile(join(dir, n, 'images.npy'), 'x');
    }
    // Old on the outside and inside: a writer on another host that died a day ago.
    await utimes(join(dir, names.otherStale), old, old);
    // Old too, but this host's and alive: kept whatever its age.
    await utimes(join(dir, names.mineLive), old, old);
    await sweepDeadWriters(dir);
    expect((await readdir(dir)).sort()).toEqual([names.mineLive, names.otherFresh, names.output].sort());
  });
});
