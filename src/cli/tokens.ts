/**
 * `slicewise token create|list|revoke`: the API's tokens file. Creating prints the token once (stdout, alone on
 * its line, so `$(slicewise token create ...)` captures it) and stores only its sha256; the file is written 0600
 * through a temporary file and a rename, so a running API never reads half of it.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { formatEntry, generateToken, hashToken, parseTokensFile, ROLES, TokenName, type Role } from '../api/auth.ts';
import { env } from '../env.ts';
import { SliceWiseError } from '../lib/errors.ts';

const HEADER = '# SliceWise API tokens: name:role:sha256 of the token. Written by `slicewise token create`; never holds a token itself.\n';

function tokensFile(file: string | undefined): string {
  const f = file ?? env().tokensFile;
  if (!f) throw new SliceWiseError('say which tokens file: --file FILE, or set SLICEWISE_TOKENS_FILE (the API reads the same variable)', { status: 400, code: 'no_tokens_file' });
  return resolve(f);
}

async function readText(file: string): Promise<string | null> {
  return readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null;
    throw new SliceWiseError(`cannot read tokens file ${file}: ${err.message}`, { status: 500, code: 'bad_tokens_file', cause: err });
  });
}

/** Replaces the file with `text`, mode 0600, atomically (temporary file in the same folder, then rename). */
async function writeTokensFile(file: string, text: string) {
  await mkdir(dirname(file), { recursive: true });
  const tmp = join(dirname(file), `.${basename(file)}.${randomBytes(4).toString('hex')}.tmp`);
  const fh = await open(tmp, 'wx', 0o600);
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  // The umask can only take bits away from 0600; set it outright anyway, in case the folder's ACLs added some.
  await chmod(tmp, 0o600);
  await rename(tmp, file).catch(async (err) => {
    await rm(tmp, { force: true });
    throw err;
  });
}

export async function createToken({ name, role, file }: { name: string; role: Role; file: string }): Promise<string> {
  const valid = TokenName.safeParse(name);
  if (!valid.success) throw new SliceWiseError(`--name ${name}: ${valid.error.issues[0]!.message}`, { status: 400, code: 'invalid_request' });
  const text = (await readText(file)) ?? HEADER;
  const existing = parseTokensFile(text, file);
  if (existing.some((e) => e.name === name)) {
    throw new SliceWiseError(`tokens file ${file} already has a token named ${name}: revoke it first (slicewise token revoke --name ${name}) or choose another name`, { status: 409, code: 'token_exists' });
  }
  const token = generateToken();
  await writeTokensFile(file, `${text}${text.endsWith('\n') || !text ? '' : '\n'}${formatEntry(name, role, hashToken(token))}\n`);
  return token;
}

export async function revokeToken({ name, file }: { name: string; file: string }): Promise<void> {
  const text = await readText(file);
  const entries = text === null ? [] : parseTokensFile(text, file);
  if (!entries.some((e) => e.name === name)) throw new SliceWiseError(`tokens file ${file} has no token named ${name}`, { status: 404, code: 'token_not_found' });
  const kept = text!.split(/(?<=\n)/).filter((line) => line.replace(/#.*$/, '').trim().split(':')[0] !== name);
  await writeTokensFile(file, kept.join(''));
}

export function tokenCommand(say: (line: string) => void): Command {
  const cmd = new Command('token').description('the API\'s bearer tokens (SLICEWISE_TOKENS_FILE): create, list, revoke');
  const fileOption = () => new Option('--file <file>', 'tokens file (default: SLICEWISE_TOKENS_FILE)');
  cmd
    .command('create')
    .description('make a token: prints it once and stores only its hash')
    .requiredOption('--name <name>', 'who or what the token is for (letters, digits, . _ -)')
    .addOption(new Option('--role <role>', 'user: the API, pages, demo and a read-only Bull Board; admin: Bull Board\'s actions too').choices(ROLES).default('user'))
    .addOption(fileOption())
    .action(async (o) => {
      const file = tokensFile(o.file);
      const token = await createToken({ name: o.name, role: o.role, file });
      process.stdout.write(`${token}\n`);
      say(`Created token ${o.name} (${o.role}) in ${file}. It is shown this once; only its hash is kept.`);
      say(`Use it as "Authorization: Bearer <token>" or sign in at /login; start the API with SLICEWISE_TOKENS_FILE=${file}`);
    });
  cmd
    .command('list')
    .description('names and roles in the tokens file')
    .addOption(fileOption())
    .action(async (o) => {
      const file = tokensFile(o.file);
      const text = await readText(file);
      if (text === null) throw new SliceWiseError(`no tokens file at ${file}; create one with slicewise token create --name NAME --file ${file}`, { status: 404, code: 'no_tokens_file' });
      for (const e of parseTokensFile(text, file)) process.stdout.write(`${e.name}\t${e.role}\n`);
    });
  cmd
    .command('revoke')
    .description('remove a token (a running API stops accepting it within a second or two)')
    .requiredOption('--name <name>', 'the token\'s name')
    .addOption(fileOption())
    .action(async (o) => {
      const file = tokensFile(o.file);
      await revokeToken({ name: o.name, file });
      say(`Revoked token ${o.name} in ${file}`);
    });
  return cmd;
}
