/** Debian's Chromium driven by playwright-core, quiet and offline-safe, with a throwaway profile. */
import { existsSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

export async function launchChromium(): Promise<{ context: BrowserContext; close(): Promise<void> }> {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium), as .ci/run does`);
  const profile = await mkdtemp(join(tmpdir(), 'slicewise-chromium-'));
  // No background connections: on an offline machine they are refused and only add noise and delay.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  return {
    context,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** An app on a real port of the loopback address, for the browser to open. */
export async function serveOnLoopback(fetch: (req: Request) => Response | Promise<Response>): Promise<{ base: string; close(): Promise<void> }> {
  const server = serve({ fetch, port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((r) => (server.listening ? r() : server.once('listening', () => r())));
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

/** The test output folder (screenshots), git-ignored. */
export const OUT = join(__dirname, '..', '..', 'test-output');

export interface Browsing {
  base: string;
  page: Page;
  /** Uncaught errors of the page's scripts. */
  pageErrors: string[];
  close(): Promise<void>;
}

/** An app on loopback and one Chromium page to open it with; the screenshot folder is made ready. */
export async function browse(fetch: (req: Request) => Response | Promise<Response>): Promise<Browsing> {
  const server = await serveOnLoopback(fetch);
  const browser = await launchChromium().catch(async (err) => {
    await server.close();
    throw err;
  });
  const page = await browser.context.newPage();
  const pageErrors: string[] = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await mkdir(OUT, { recursive: true });
  await writeFile(join(OUT, '.gitignore'), '*\n');
  return {
    base: server.base,
    page,
    pageErrors,
    async close() {
      await browser.close();
      await server.close();
    },
  };
}
