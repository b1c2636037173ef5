import { pino, type Logger } from 'pino';
import { env } from '../env.ts';

export type { Logger };

/**
 * One logger for the process. Lines are for the operator: say what happened and what to do about it.
 * LOG_LEVEL=debug for more; SLICEWISE_LOG=silent in tests that print nothing.
 */
export function createLogger(name = 'slicewise', level = env().logLevel ?? 'info'): Logger {
  return pino({
    name,
    level: env().logSilent ? 'silent' : level,
    // Belt and braces: even if a credential ends up in an object we log, it is not printed.
    redact: { paths: ['*.password', '*.key', '*.token', '*.authorization', '*.KAGGLE_KEY', 'headers.authorization'], censor: '***' },
  });
}
