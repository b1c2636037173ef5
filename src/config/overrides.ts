/**
 * Settings from the command line: `--config my.yaml` (a YAML layer) and repeatable `--set key.path=value`
 * (values read as YAML, so 10 is a number, true a boolean, [flair, t1] a list). Each is validated on its own
 * before they are merged, so an error names the flag or the file that holds the bad key.
 */
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { SliceWiseError } from '../lib/errors.ts';
import { deepMerge, validateLayer } from './load.ts';

function badFlag(flag: string, reason: string): SliceWiseError {
  return new SliceWiseError(`invalid configuration in ${flag}: ${reason}`, { status: 400, code: 'bad_config', details: { source: flag } });
}

/** `training.epochs=10` -> { training: { epochs: 10 } }. */
function setFlagLayer(assignment: string): Record<string, unknown> {
  const flag = `--set ${assignment}`;
  const eq = assignment.indexOf('=');
  if (eq <= 0) throw badFlag(flag, 'expected key.path=value');
  const path = assignment.slice(0, eq).trim().split('.');
  if (path.some((p) => !/^[A-Za-z_][A-Za-z0-9_]*$/.test(p))) throw badFlag(flag, `'${assignment.slice(0, eq)}' is not a dotted key path`);
  let value: unknown;
  try {
    value = parseYaml(assignment.slice(eq + 1));
  } catch (err) {
    throw badFlag(flag, `the value is not valid YAML: ${(err as Error).message}`);
  }
  const layer = path.reduceRight<unknown>((inner, key) => ({ [key]: inner }), value) as Record<string, unknown>;
  validateLayer(flag, layer);
  return layer;
}

function configFileLayer(file: string): unknown {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new SliceWiseError(`--config ${file}: cannot read it: ${(err as Error).message}`, { status: 400, code: 'bad_config', cause: err });
  }
  let layer: unknown;
  try {
    layer = parseYaml(text) ?? {};
  } catch (err) {
    throw badFlag(`--config ${file}`, `not valid YAML: ${(err as Error).message}`);
  }
  validateLayer(`--config ${file}`, layer);
  return layer;
}

/** --config, then the dedicated flags (--image-size ...), then each --set in order: later ones win. */
export function commandLineOverrides({ configFile, flags = {}, sets = [] }: { configFile?: string; flags?: Record<string, unknown>; sets?: string[] }): Record<string, unknown> {
  let merged: Record<string, unknown> = configFile ? ((configFileLayer(configFile) as Record<string, unknown>) ?? {}) : {};
  merged = deepMerge(merged, flags);
  for (const s of sets) merged = deepMerge(merged, setFlagLayer(s));
  return merged;
}
