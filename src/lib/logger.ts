import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * One logger for the process. Lines are for the operator: say what happened and what to do about it.
 * LOG_LEVEL=debug for more; SLICEWISE_LOG=silent in tests that print nothing.
 */
export function createLogger(name = 'slicewise', level = process.env.LOG_LEVEL ?? 'info'): Logger {
  return pino({
    name,
    level: process.env.SLICEWISE_LOG === 'silent' ? 'silent' : level,
    // Belt and braces: even if a credential ends up in an object we log, it is not printed.
    redact: { paths: ['*.password', '*.key', '*.token', '*.authorization', '*.KAGGLE_KEY', 'headers.authorization'], censor: '***' },
  });
}
