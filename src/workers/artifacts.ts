import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import type { Db } from '../db/client.ts';
import { artifacts } from '../db/schema.ts';

async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Records a file a step produced, with its size and sha256; a re-run of the step updates the same row. */
export async function recordArtifact(db: Db, { runId, step, kind, path }: { runId: string; step: string; kind: string; path: string }): Promise<void> {
  const [sha256, st] = await Promise.all([sha256File(path), stat(path)]);
  await db
    .insert(artifacts)
    .values({ runId, step, kind, path, sha256, bytes: st.size })
    .onConflictDoUpdate({ target: [artifacts.runId, artifacts.path], set: { sha256, bytes: st.size, step, kind, createdAt: new Date() } });
}
