import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml } from 'yaml';
import type { z } from 'zod';
import { env } from '../env.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { ConfigLayerSchema, ConfigSchema, type Config, type StageName, type TrainingMode } from './schema.ts';

export const DEFAULT_CONFIG_DIR = fileURLToPath(new URL('../../configs', import.meta.url));

class ConfigError extends SliceWiseError {
  constructor(source: string, issues: { path: string; message: string }[], { cause }: { cause?: unknown } = {}) {
    super(`invalid configuration in ${source}: ${issues.map((i) => `${i.path || '(root)'}: ${i.message}`).join('; ')}`, {
      status: 400,
      code: 'bad_config',
      details: { source, issues },
      cause,
    });
    this.name = 'ConfigError';
  }
}

function issuesOf(err: z.ZodError) {
  return err.issues.map((i) => ({ path: i.path.join('.'), message: i.message }));
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Later layers win; objects merge key by key, arrays and scalars are replaced whole. */
export function deepMerge<T>(base: T, layer: unknown): T {
  if (!isPlainObject(base) || !isPlainObject(layer)) return (layer === undefined ? base : layer) as T;
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(layer)) out[k] = k in out ? deepMerge(out[k], v) : v;
  return out as T;
}

/** Checks one layer on its own (every key optional, none unknown); the error names `source` and the keys. */
export function validateLayer(source: string, layer: unknown): void {
  const res = ConfigLayerSchema.safeParse(layer);
  if (!res.success) throw new ConfigError(source, issuesOf(res.error));
}

/** A YAML layer from a file: {} when it does not exist (a mode or stage may have none). */
function readLayer(file: string): unknown {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw new SliceWiseError(`cannot read config ${file}: ${(err as Error).message}`, { status: 500, code: 'bad_config', cause: err });
  }
  let parsed: unknown;
  try {
    parsed = parseYaml(text) ?? {};
  } catch (err) {
    throw new ConfigError(file, [{ path: '', message: `not valid YAML: ${(err as Error).message}` }], { cause: err });
  }
  validateLayer(file, parsed);
  return parsed;
}

interface LoadConfigOptions {
  trainingMode: TrainingMode;
  /** When set, configs/stages/<stage>.yaml is layered on top of the mode. */
  stage?: StageName;
  /** Per-run overrides (from the API body or CLI flags), validated like a file. */
  overrides?: unknown;
  /** Default: SLICEWISE_CONFIG_DIR, else the repository's configs/ folder. */
  configDir?: string;
}

export function loadConfig({ trainingMode, stage, overrides, configDir = env().configDir ?? DEFAULT_CONFIG_DIR }: LoadConfigOptions): Config {
  const files = [join(configDir, 'base.yaml'), join(configDir, 'modes', `${trainingMode}.yaml`)];
  if (stage) files.push(join(configDir, 'stages', `${stage}.yaml`));
  let merged: unknown = {};
  for (const f of files) merged = deepMerge(merged, readLayer(f));
  if (overrides !== undefined) {
    validateLayer('overrides', overrides);
    merged = deepMerge(merged, overrides);
  }
  const res = ConfigSchema.safeParse(merged);
  if (!res.success) throw new ConfigError(`the merged config (${files.join(' -> ')}${overrides ? ' -> overrides' : ''})`, issuesOf(res.error));
  return res.data;
}

/** The original's subset rule: max(min, fraction of N), capped by max_patients and by N. */
export function patientCount(total: number, data: Config['data']): number {
  let n = Math.max(data.patients.min, Math.ceil(data.patients.fraction * total));
  if (data.max_patients != null) n = Math.min(n, data.max_patients);
  return Math.min(n, total);
}
