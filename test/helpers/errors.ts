/** Assertions on the errors the domain modules throw, shared by the imaging tests. */
import { expect } from 'vitest';
import { SliceWiseError } from '../../src/lib/errors.js';

/** What `p` rejects with; fails the test when it resolves. */
export async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

/** What `fn` throws; fails the test when it returns. */
export function thrownBy(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  throw new Error('expected a throw');
}

/** Expect a SliceWiseError with this status and code whose message matches (a string: contains). */
export function expectSliceWiseError(err: unknown, want: { status: number; code: string; message: RegExp | string }): SliceWiseError {
  expect(err).toBeInstanceOf(SliceWiseError);
  const e = err as SliceWiseError;
  expect({ status: e.status, code: e.code }).toEqual({ status: want.status, code: want.code });
  if (typeof want.message === 'string') expect(e.message).toContain(want.message);
  else expect(e.message).toMatch(want.message);
  return e;
}
