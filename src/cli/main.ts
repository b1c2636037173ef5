import { writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { serve } from '@hono/node-server';
import { createApp } from '../api/app.ts';
import { openDb } from '../db/client.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { DEFAULT_WORKER_QUEUES, MODEL_QUEUES, QUEUE_NAMES, type QueueName } from '../queues/names.ts';
import { buildResults } from '../runs/results.ts';
import { cancelRun, createRun, enqueueOrphanedRuns, retryStep } from '../runs/service.ts';
import { getEvaluation } from '../runs/reports.ts';
import { EVAL_STEPS } from '../runs/modes.ts';
import type { RunRow } from '../db/schema.ts';
import { commandLineOverrides } from '../config/overrides.ts';
import { formatEvaluation, formatPhases } from './evaluation-table.ts';
import { DemoService } from '../serving/demo-service.ts';
import { closeOpenSteps, finishRun, getRunRow } from '../runs/store.ts';
import { startRunWatchdog, type RunWatchdog } from '../runs/watchdog.ts';
import { redisHealth, within } from '../queues/connection.ts';
import { startWorkers, type WorkerHost } from '../workers/host.ts';
import { followRun, painter } from './follow.ts';
import { openRuntime, type Runtime } from './runtime.ts';
import { PIPELINE_MODES } from '../runs/input.ts';
import { TRAINING_MODES } from '../config/schema.ts';
import { env } from '../env.ts';
import { pgliteDir } from '../disk/layout.ts';
import { allowOperatorSources, assertSyntheticCount } from '../download/policy.ts';
import { parseSource } from '../download/sources.ts';
import { isLoopback, TokenStore } from '../api/auth.ts';
import { tokenCommand } from './tokens.ts';

const paint = painter(process.stderr);
const say = (line: string) => process.stderr.write(line + '\n');

function int(name: string, min = 0) {
  return (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`${name} must be an integer >= ${min}`);
    return n;
  };
}

/**
 * A --brats-source / --kaggle-source value, checked for its form and, for `synthetic:N`, against the limits
 * (assertSyntheticCount) while the command line is read: the error names the flag and nothing has started yet.
 * Where a `path:` may point is createRun's question (it needs the data dir).
 */
function sourceFlag(flag: string, dataset: 'brats' | 'kaggle') {
  return (v: string) => {
    try {
      assertSyntheticCount(parseSource(v), dataset, { field: flag });
    } catch (err) {
      if (err instanceof SliceWiseError) throw new InvalidArgumentError(err.message.startsWith(flag) ? err.message : `${flag}: ${err.message}`);
      throw err;
    }
    return v;
  };
}

function queueList(v: string): QueueName[] {
  const qs = v.split(',').map((s) => s.trim()).filter(Boolean);
  const bad = qs.filter((q) => !(QUEUE_NAMES as readonly string[]).includes(q));
  if (bad.length) throw new InvalidArgumentError(`unknown queue(s) ${bad.join(', ')}; known: ${QUEUE_NAMES.join(', ')}`);
  return qs as QueueName[];
}

/** How long a forced stop may take before the process exits regardless. */
const FORCE_EXIT_MS = 5000;

/**
 * Stop on the first signal after finishing what is active; on the second, at once (graphile-worker's manner).
 * `force` returns what to tell the operator (which jobs it handed back). A dead Redis answers nothing, so a timer
 * has the last word on the forced path: the process is gone within FORCE_EXIT_MS whatever `force` waits on. A
 * third signal exits on the spot.
 */
function onSignals(describe: () => { doing: string; jobs?: string[] }, graceful: () => Promise<string | void>, force: () => Promise<string | void>) {
  let count = 0;
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      count++;
      if (count === 1) {
        const { doing, jobs } = describe();
        say(paint('yellow', `Received ${sig}; ${doing}, send again to force${jobs?.length ? `: ${jobs.join('; ')}` : ''}`));
        graceful().then(
          (said) => {
            if (said) say(paint('green', said));
            process.exit(0);
          },
          (err: Error) => {
            say(paint('red', `Could not stop cleanly: ${err.message}`));
            process.exit(1);
          },
        );
      } else if (count === 2) {
        say(paint('red', `Received ${sig} again; forcing, exiting within ${FORCE_EXIT_MS / 1000} s`));
        setTimeout(() => {
          say(paint('red', `Forced stop did not finish in ${FORCE_EXIT_MS / 1000} s; exiting anyway`));
          process.exit(130);
        }, FORCE_EXIT_MS);
        force()
          .then((said) => said && say(paint('red', said)), (err: Error) => say(paint('red', `Forced stop: ${err.message}`)))
          .finally(() => process.exit(130));
      } else {
        process.exit(130);
      }
    });
  }
}

/** What a stopped worker host did with its jobs, for the operator: `Handed back 2 job(s): preprocess_patient (run ..., patient ...); ...`. */
function jobsDone(verb: 'Finished' | 'Handed back', jobs: string[]): string {
  return jobs.length ? `${verb} ${jobs.length} job(s): ${jobs.join('; ')}` : 'No jobs were active';
}

async function listen(app: ReturnType<typeof createApp>, port: number, host: string): Promise<{ url: string; close(): Promise<void> }> {
  return new Promise((res, rej) => {
    const server = serve({ fetch: app.fetch, port, hostname: host }, (info) => {
      res({ url: `http://${host}:${info.port}`, close: () => new Promise<void>((r) => server.close(() => r())) });
    });
    server.once('error', rej);
  });
}

const program = new Command('slicewise')
  .description('Brain-tumour MRI pipeline on BullMQ: download -> per-patient preprocessing -> splits (-> training -> evaluation -> demo)')
  .showHelpAfterError();

/** Repeatable option: each occurrence adds to the list. */
const collect = (v: string, all: string[]) => [...all, v];

/**
 * What `pipeline` and `retry` share: this process is the whole system (private Redis, embedded database, workers,
 * the API on loopback), it starts a run (or a step of one) and follows it to its end, prints the evaluation when
 * the run has one, writes pipeline_results.json here and exits non-zero when the run did not succeed.
 */
async function runToEnd(
  { dataDir, port, workers, model }: { dataDir: string; port: number; workers: boolean; model: boolean },
  start: (rt: Runtime) => Promise<RunRow>,
): Promise<never> {
  const rt = await openRuntime({ dataDir, say, logLevel: env().logLevel ?? 'warn' });
  let host: WorkerHost | undefined;
  let watchdog: RunWatchdog | undefined;
  let api: { url: string; close(): Promise<void> } | undefined;
  let runId: string | undefined;
  const shutdown = async (force = false) => {
    watchdog?.stop();
    const jobs = (await host?.close(force)) ?? [];
    await (force ? within(500, api?.close() ?? Promise.resolve()) : api?.close());
    await rt.close(force);
    return jobs;
  };
  // This process owns the run, so when Redis is gone for good (unreachable past the deadline, or the private
  // redis-server's supervisor gave up) the run gets that verdict here, in the database that is still there.
  const health = redisHealth(rt.ctx.redisUrl);
  const deadlineS = Math.round(health.deadlineMs / 1000);
  health.configure({
    report: (level, line) => say(paint(level === 'info' ? 'green' : 'yellow', line)),
    consequence: `the run fails after ${deadlineS} s, SLICEWISE_REDIS_DEADLINE_MS`,
  });
  // Set once the run is being abandoned: that path gives the verdict and exits, and the normal ending waits for it.
  let ending: Promise<never> | undefined;
  const abandon = (reason: string) => (ending ??= giveUp(reason));
  const giveUp = async (reason: string): Promise<never> => {
    try {
      if (runId) {
        // A run already settled (cancelled by a first signal, say) keeps its verdict; the reason is still said.
        const settled = await finishRun(rt.ctx.db, runId, 'failed', { message: reason, details: { reason: 'redis_unreachable' } });
        if (settled) await closeOpenSteps(rt.ctx.db, runId, 'skipped');
        const row = (await getRunRow(rt.ctx.db, runId))!;
        await writeFile('pipeline_results.json', JSON.stringify(await buildResults(rt.ctx.db, row), null, 2) + '\n');
        say(paint('red', settled ? `Run ${runId} failed: ${reason}; wrote pipeline_results.json` : `Run ${runId} ${row.status}; stopping: ${reason}`));
      } else say(paint('red', `Error: ${reason}`));
    } catch (err) {
      say(paint('red', `Error: ${reason}; and the run could not be marked failed: ${(err as Error).message}`));
    }
    await within(3000, shutdown(true));
    // The verdict is given: what the jobs still running here say as the process ends is not news.
    rt.ctx.logger.level = 'silent';
    process.exit(1);
  };
  health.on('deadline', () => void abandon(`Redis at ${health.where} unreachable for more than ${deadlineS} s (SLICEWISE_REDIS_DEADLINE_MS): the run's queues live there, so it cannot go on`));
  rt.onFatal((err) => void abandon(err.message));
  onSignals(
    () => {
      const jobs = host?.describeActive() ?? [];
      return { doing: runId ? `cancelling run ${runId} and stopping its ${jobs.length} active job(s)` : 'shutting down', jobs };
    },
    async () => {
      if (runId) {
        // The database part is immediate; telling the other workers goes through Redis, which may be gone.
        await within(5000, cancelRun(rt.ctx, runId));
        host?.abortRun(runId, `run ${runId} cancelled`);
      }
      await shutdown(false);
    },
    async () => jobsDone('Handed back', await shutdown(true)),
  );
  try {
    // The model queues run here too when the run trains or evaluates.
    if (workers) host = await startWorkers(rt.ctx, { queues: model ? [...DEFAULT_WORKER_QUEUES, ...MODEL_QUEUES] : DEFAULT_WORKER_QUEUES });
    else watchdog = startRunWatchdog(rt.ctx);
    if (rt.embedded) {
      api = await listen(createApp(rt.ctx), port, '127.0.0.1');
      say(paint('blue', `API ${api.url}  ·  Bull Board ${api.url}/admin/queues  ·  run page ${api.url}/ui  ·  open (no tokens): loopback only`));
    }
    const run = await start(rt);
    runId = run.id;
    const final = await followRun(rt.ctx, run.id);
    if (ending) await ending;
    const results = await buildResults(rt.ctx.db, (await getRunRow(rt.ctx.db, run.id))!);
    const reports = await getEvaluation(rt.ctx, run.id);
    if (reports.multitask) process.stdout.write(`\n${formatEvaluation(reports.multitask)}\n`);
    if (reports.phase_comparison) process.stdout.write(`\nPhase comparison (each stage's best checkpoint on the test set)\n${formatPhases(reports.phase_comparison)}\n\n`);
    await writeFile('pipeline_results.json', JSON.stringify(results, null, 2) + '\n');
    if (final.status === 'succeeded') say(paint('green', `Run ${run.id} succeeded in ${results.total_duration_seconds?.toFixed(1)} s; wrote pipeline_results.json`));
    else say(paint('red', `Run ${run.id} ${final.status}${final.error ? `: ${final.error}` : ''}; wrote pipeline_results.json`));
    // A run with its verdict needs nothing more: jobs of it still running here (a verdict from the run watchdog, or
    // a failure elsewhere) stop now instead of holding the exit until they finish.
    if (final.status !== 'succeeded') host?.abortRun(run.id, `run ${run.id} ${final.status}`);
    await shutdown();
    // Exit explicitly: a stray timer in a dependency must not keep a finished pipeline hanging.
    process.exit(final.status === 'succeeded' ? 0 : 1);
  } catch (err) {
    if (ending) await ending;
    await within(3000, shutdown(true));
    throw err;
  }
}

function demoLimits(maxUploadMb: number | undefined) {
  return maxUploadMb ? { maxUploadBytes: maxUploadMb * 1024 * 1024 } : {};
}

/**
 * `slicewise pipeline --mode demo`: serves the final model of the newest succeeded full/train-eval run (or
 * --from-run's) on the API's port: the page, the original's prediction endpoints and /model/info. The model is
 * loaded before the port opens, so a missing one is an error now, not on the first upload.
 */
async function serveDemo({ dataDir, port, fromRun, maxUploadMb }: { dataDir: string; port: number; fromRun?: string; maxUploadMb?: number }): Promise<void> {
  const rt = await openRuntime({ dataDir, say, logLevel: env().logLevel ?? 'warn' });
  const demo = new DemoService({ db: rt.ctx.db, fromRun, limits: demoLimits(maxUploadMb) });
  let model;
  try {
    model = await demo.model();
  } catch (err) {
    await rt.close();
    throw err;
  }
  const api = await listen(createApp(rt.ctx, { demo }), port, '127.0.0.1');
  const m = model.info;
  say(paint('green', `Serving run ${m.run_id}'s final model (${m.preset ?? 'custom'} preset, ${m.image_size} px, weights sha256 ${m.checkpoint.sha256.slice(0, 12)}) on ${model.pool.size} thread(s)`));
  say(paint('green', `Demo page ${api.url}/ui/demo  ·  POST ${api.url}/predict_multitask  ·  ${api.url}/model/info  ·  open (no tokens): loopback only`));
  onSignals(
    () => ({ doing: 'stopping the demo server' }),
    async () => {
      await api.close();
      await demo.close();
      await rt.close();
    },
    async () => {
      await within(500, demo.close());
      await rt.close(true);
    },
  );
}

program
  .command('pipeline')
  .description('create a run and follow it to the end (the original run_full_pipeline.py); writes pipeline_results.json here')
  .addOption(new Option('--mode <mode>', 'which part of the pipeline').choices(PIPELINE_MODES).default('full'))
  .addOption(new Option('--training-mode <mode>', 'quick | baseline | production').choices(TRAINING_MODES).default('quick'))
  .option('--skip-download', 'reuse what is already in the data dir', false)
  .option('--brats-source <src>', 'synthetic[:N] | path:DIR_OR_ARCHIVE | https://... | kaggle:OWNER/DATASET', sourceFlag('--brats-source', 'brats'), 'synthetic')
  .option('--kaggle-source <src>', 'same forms as --brats-source', sourceFlag('--kaggle-source', 'kaggle'), 'synthetic')
  .option('--brats-layout <spec>', 'modality=pattern pairs for other layouts, e.g. flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz')
  .option('--data-dir <dir>', 'raw data, processed slices, embedded database and Redis files', 'data')
  .option('--max-patients <n>', 'cap the number of patients', int('--max-patients', 1))
  .option('--image-size <n>', 'slice size in pixels (default 256)', int('--image-size', 16))
  .option('--seed <n>', 'seed for subsets, slice sampling and splits (default 42)', int('--seed'))
  .option('--config <file>', 'a YAML layer over configs/ (same keys as configs/base.yaml)')
  .option('--set <key=value>', 'one setting, e.g. training.epochs=10 or data.splits.train=0.8 (repeatable; wins over --config)', collect, [])
  .option('--from-run <id>', 'train-eval: the run whose prepared data to train on; demo: the run whose model to serve (default: the latest that succeeded)')
  .option('--port <n>', 'port for the in-process API and Bull Board (0: any free port; the demo: 8787)', int('--port'), 0)
  .option('--max-upload <mb>', 'demo: the largest upload, in MB (default 64)', int('--max-upload', 1))
  .option('--no-workers', 'do not run workers in this process (others consume the queues)')
  .action(async (o) => {
    if (o.mode === 'demo') return serveDemo({ dataDir: o.dataDir, port: o.port || 8787, fromRun: o.fromRun, maxUploadMb: o.maxUpload });
    const data: Record<string, unknown> = {};
    if (o.maxPatients !== undefined) data.max_patients = o.maxPatients;
    if (o.imageSize !== undefined) data.image_size = o.imageSize;
    const flags: Record<string, unknown> = { ...(o.seed !== undefined ? { seed: o.seed } : {}), ...(Object.keys(data).length ? { data } : {}) };
    // Validated before anything starts: a bad key is an error naming its flag, not a failed run.
    const overrides = commandLineOverrides({ configFile: o.config, flags, sets: o.set });
    // This command line's user is the operator: the folders it names may be read, wherever they are.
    allowOperatorSources([o.bratsSource, o.kaggleSource]);
    await runToEnd({ dataDir: o.dataDir, port: o.port, workers: o.workers, model: o.mode !== 'data-only' }, async (rt) => {
      const { run } = await createRun(rt.ctx, {
        mode: o.mode,
        trainingMode: o.trainingMode,
        sources: { brats: o.bratsSource, kaggle: o.kaggleSource, ...(o.bratsLayout ? { bratsLayout: o.bratsLayout } : {}) },
        skipDownload: o.skipDownload,
        dataDir: o.dataDir,
        ...(o.fromRun ? { fromRun: o.fromRun } : {}),
        overrides,
      });
      say(paint('blue', `Run ${run.id}: --mode ${o.mode} --training-mode ${o.trainingMode}; data in ${resolve(o.dataDir)}`));
      if (Object.keys(overrides).length) say(paint('blue', `Settings over configs/: ${JSON.stringify(overrides)}`));
      if ((run.sources as { brats: string }).brats.startsWith('synthetic') || (run.sources as { kaggle: string }).kaggle.startsWith('synthetic')) {
        say(paint('yellow', 'Note: this run uses SYNTHETIC data (slicewise synth), not real scans: its numbers say nothing about real tumours'));
      }
      return run;
    });
  });

program
  .command('retry')
  .description(`run one evaluation step of a finished run again, from its checkpoints (${EVAL_STEPS.join(', ')})`)
  .argument('<run-id>', 'the run')
  .argument('<step>', `one of ${EVAL_STEPS.join(', ')}`)
  .option('--data-dir <dir>', 'the data dir the run was made in', 'data')
  .option('--port <n>', 'port for the in-process API and Bull Board (0: any free port)', int('--port'), 0)
  .option('--no-workers', 'do not run workers in this process (others consume the queues)')
  .action(async (runId: string, step: string, o) => {
    await runToEnd({ dataDir: o.dataDir, port: o.port, workers: o.workers, model: true }, async (rt) => {
      const run = await retryStep(rt.ctx, runId, step);
      say(paint('blue', `Run ${run.id}: ${step} queued to run again`));
      return run;
    });
  });

program
  .command('evaluate')
  .description("evaluate a finished run's final model on patients or images it never saw; prints the table and writes multitask_evaluation.json")
  .requiredOption('--run <id>', 'the run whose final model (stage 3 best checkpoint) to evaluate')
  .option('--brats-source <src>', 'BraTS patients with segmentations: synthetic[:N] | path:DIR_OR_ARCHIVE | https://... | kaggle:OWNER/DATASET', sourceFlag('--brats-source', 'brats'))
  .option('--brats-layout <spec>', 'modality=pattern pairs for other layouts, e.g. flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz')
  .option('--kaggle-source <src>', 'tumour / no-tumour images (yes/ and no/ folders), same forms', sourceFlag('--kaggle-source', 'kaggle'))
  .option('--out <dir>', 'where multitask_evaluation.json goes', 'evaluation')
  .option('--data-dir <dir>', 'the data dir the run was made in (its embedded database, and downloads)', 'data')
  .action(async (o) => {
    if (!o.bratsSource && !o.kaggleSource) throw new InvalidArgumentError('give --brats-source, --kaggle-source or both');
    const { evaluateExternal } = await import('./evaluate.ts');
    const report = await evaluateExternal({ runId: o.run, bratsSource: o.bratsSource, bratsLayout: o.bratsLayout, kaggleSource: o.kaggleSource, out: o.out, dataDir: o.dataDir, say });
    process.stdout.write(`${formatEvaluation(report)}\n`);
  });

program
  .command('predict')
  .description("a finished run's final model on images (JPEG/PNG) and NIfTI volumes: predictions.csv/json, mask and Grad-CAM PNGs, segmentation NIfTIs in the input's geometry")
  .requiredOption('--run <id>', 'the run whose final model (stage 3 best checkpoint) predicts')
  .requiredOption('--input <file-or-dir>', 'an image, a .nii/.nii.gz volume, or a folder of them (searched recursively)')
  .option('--brats-layout <spec>', "--input is a folder of patients: modality=pattern pairs (e.g. flair=Flair_*.nii.gz), or 'official' for BraTS file names; the model's modality is read")
  .option('--out <dir>', 'output folder', 'predictions')
  .option('--threshold <p>', "a pixel is tumour above this probability (default: the run's evaluation threshold, 0.5)", Number)
  .option('--data-dir <dir>', 'the data dir the run was made in (its embedded database)', 'data')
  .action(async (o) => {
    const { predictFiles } = await import('./predict.ts');
    const summary = await predictFiles({ runId: o.run, input: o.input, out: o.out, dataDir: o.dataDir, threshold: o.threshold, bratsLayout: o.bratsLayout, say });
    process.exitCode = summary.failed.length ? 1 : 0;
  });

program
  .command('api')
  .description('serve the REST API and Bull Board')
  .option('--port <n>', 'port', int('--port'), env().port ?? 8787)
  .option('--host <host>', 'interface to bind', env().host ?? '127.0.0.1')
  .option('--data-dir <dir>', 'default data dir for runs', env().dataDir ?? 'data')
  .option('--with-workers', 'also consume the queues in this process', false)
  .option('--max-upload <mb>', 'largest upload the demo takes, in MB (default 64)', int('--max-upload', 1))
  .option('--tokens-file <file>', 'bearer tokens (`slicewise token create`); needed unless --host is loopback', env().tokensFile)
  .action(async (o) => {
    // Before anything starts: an API without tokens on a reachable interface would be open to the network.
    const auth = o.tokensFile || env().tokens ? await TokenStore.open({ file: o.tokensFile, inline: env().tokens }) : undefined;
    if (!auth && !isLoopback(o.host)) {
      throw new SliceWiseError(
        `refusing to serve the API on ${o.host} without tokens: anyone who reaches it could start, cancel and read runs. Create one with \`slicewise token create --name admin --role admin --file /etc/slicewise/tokens\` and start with SLICEWISE_TOKENS_FILE=/etc/slicewise/tokens (or --tokens-file), or bind --host 127.0.0.1`,
        { status: 400, code: 'needs_tokens' },
      );
    }
    const rt = await openRuntime({ dataDir: o.dataDir, say });
    // A run recorded by an API that died before queueing its jobs would otherwise wait forever.
    const orphans = await enqueueOrphanedRuns(rt.ctx);
    if (orphans.length) say(paint('yellow', `Queued ${orphans.length} run(s) an earlier API process recorded but never queued: ${orphans.join(', ')}`));
    if (rt.db.kind === 'pglite' && !o.withWorkers) {
      say(paint('yellow', 'Warning: embedded PGlite serves this process only; workers in other processes cannot record progress. Set DATABASE_URL or use --with-workers.'));
    }
    const host = o.withWorkers ? await startWorkers(rt.ctx) : undefined;
    // Without workers here the API looks after the runs it queued itself (a worker host runs its own watchdog).
    const watchdog = host ? undefined : startRunWatchdog(rt.ctx);
    // The demo's routes too: the model is found on the first request, so an API started before any training
    // serves it as soon as a run has made one.
    const demo = new DemoService({ db: rt.ctx.db, limits: demoLimits(o.maxUpload) });
    const api = await listen(createApp(rt.ctx, { demo, auth }), o.port, o.host);
    say(paint('green', `API listening on ${api.url}  ·  run pages ${api.url}/ui  ·  demo ${api.url}/ui/demo  ·  Bull Board ${api.url}/admin/queues`));
    say(auth ? paint('green', `Tokens: ${auth.describe()}; browsers sign in at ${api.url}/login`) : paint('yellow', 'no tokens configured (SLICEWISE_TOKENS_FILE); the API is open, which is allowed only on loopback'));
    onSignals(
      () => {
        const jobs = host?.describeActive();
        return { doing: `closing the API${jobs ? ` and finishing ${jobs.length} job(s)` : ''}`, jobs };
      },
      async () => {
        watchdog?.stop();
        await api.close();
        await demo.close();
        const jobs = await host?.close(false);
        await rt.close();
        return jobs ? jobsDone('Finished', jobs) : undefined;
      },
      async () => {
        watchdog?.stop();
        await within(500, demo.close());
        const jobs = await host?.close(true);
        await rt.close(true);
        return jobs ? jobsDone('Handed back', jobs) : undefined;
      },
    );
  });

program
  .command('worker')
  .description('consume queues (start as many as you like, on any machine sharing Redis, Postgres and the data dir)')
  .option('--queues <list>', `comma-separated, of ${QUEUE_NAMES.join(', ')}`, queueList, DEFAULT_WORKER_QUEUES)
  .option('--concurrency <n>', 'jobs computing at once per queue (default: CPU cores for preprocess, which also fetches as many again ahead; 2 otherwise)', int('--concurrency', 1))
  .option('--data-dir <dir>', 'data dir (must be the same path the API gives runs)', env().dataDir ?? 'data')
  .action(async (o) => {
    if (!env().redisUrl) throw new SliceWiseError('slicewise worker joins a shared Redis: set REDIS_URL (a private Redis would have no jobs for it)', { status: 400, code: 'needs_redis_url' });
    const rt = await openRuntime({ dataDir: o.dataDir, needsSharedDb: true, say });
    const host = await startWorkers(rt.ctx, { queues: o.queues, concurrency: o.concurrency });
    onSignals(
      () => {
        const jobs = host.describeActive();
        return { doing: `finishing ${jobs.length} job(s)`, jobs };
      },
      async () => {
        const jobs = await host.close(false);
        await rt.close();
        return jobsDone('Finished', jobs);
      },
      async () => {
        const jobs = await host.close(true);
        await rt.close(true);
        return jobsDone('Handed back', jobs);
      },
    );
  });

const db = program.command('db').description('database tasks');
db.command('migrate')
  .description('apply migrations to DATABASE_URL (or the embedded PGlite of --data-dir)')
  .option('--data-dir <dir>', 'data dir of the embedded database', 'data')
  .action(async (o) => {
    const h = await openDb({ pgliteDir: pgliteDir(resolve(o.dataDir)) });
    say(paint('green', `Migrations applied to ${h.where}`));
    await h.close();
  });

program
  .command('synth')
  .description('generate SYNTHETIC BraTS-2020-named cases and Kaggle-like yes/no JPEGs (the offline default source)')
  .requiredOption('--out <dir>', 'output folder')
  .option('--patients <n>', 'BraTS cases', int('--patients', 1), 6)
  .option('--size <XxYxZ>', 'volume size', '96x96x48')
  .option('--kaggle <n>', 'Kaggle-like images per class', int('--kaggle', 0), 20)
  .option('--seed <n>', 'seed', int('--seed'), 42)
  .action(async (o) => {
    const size = String(o.size).split('x').map(Number);
    if (size.length !== 3 || size.some((n) => !Number.isInteger(n) || n < 8)) throw new InvalidArgumentError('--size must look like 96x96x48 (each >= 8)');
    const { synthesize } = await import('../synth/index.ts');
    const res = await synthesize({ out: resolve(o.out), patients: o.patients, size: size as [number, number, number], kaggleYes: o.kaggle, kaggleNo: o.kaggle, seed: o.seed });
    say(paint('yellow', `Wrote SYNTHETIC data (not real scans): ${res.patients.length} BraTS-2020-named cases in ${res.bratsDir}, ${res.kaggleImages} Kaggle-like images in ${res.kaggleDir}`));
  });

program
  .command('bench')
  .description('benchmarks: preprocessing vs. the gunzip floor, training steps, the demo vs. PyTorch; figures also go to bench/results/')
  .option('--only <names>', 'comma-separated: preprocess, train-kernels, demo, queue (default: all)')
  .action(async (o) => {
    const { runBenchmarks } = await import('../../bench/index.ts');
    await runBenchmarks({ only: o.only ? String(o.only).split(',').map((s) => s.trim()).filter(Boolean) : undefined });
    // The figures are written; a bench's leftover worker threads or sockets must not keep the command alive.
    process.exit(0);
  });

program.addCommand(tokenCommand(say));

program.parseAsync().catch((err: unknown) => {
  if (err instanceof SliceWiseError) {
    say(paint('red', `Error: ${err.message}`));
    process.exit(err.code === 'redis_missing' ? 2 : 1);
  }
  say(paint('red', `Error: ${(err as Error)?.stack ?? String(err)}`));
  process.exit(1);
});
