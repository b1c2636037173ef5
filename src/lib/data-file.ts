/**
 * Reading data files with errors that name the file: every failure to open or read one is a DataFileError whose
 * reason is 'file not found' when the file is not there (what layout's isMissingFile tests for), and whose
 * `cause` is the error the file system gave.
 */
import { open, readFile, type FileHandle } from 'node:fs/promises';
import { DataFileError } from './errors.ts';

/** The DataFileError for a failed open or read of `file` (`doing`: 'read', 'open'). */
export function fileAccessError(file: string, err: unknown, doing: string): DataFileError {
  const code = (err as NodeJS.ErrnoException).code;
  return new DataFileError(file, code === 'ENOENT' ? 'file not found' : `cannot ${doing} file: ${(err as Error).message}`, { cause: err });
}

/** The whole file. */
export async function readDataFile(file: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw fileAccessError(file, err, 'read');
  }
}

/** The file opened for reading. */
export async function openDataFile(file: string): Promise<FileHandle> {
  try {
    return await open(file, 'r');
  } catch (err) {
    throw fileAccessError(file, err, 'open');
  }
}
