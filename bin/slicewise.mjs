#!/usr/bin/env node
// Entry point for `npx slicewise`: runs the TypeScript CLI directly, no build step. tsx's loader is registered
// here for this thread; the worker threads we start (BullMQ's sandbox, training) register it themselves.
import { register } from 'tsx/esm/api';

register();
await import('../src/cli/main.ts');
