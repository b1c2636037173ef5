/**
 * The one error type that crosses module boundaries. `status` is what the API answers with; `details` is
 * safe to show a user (never put credentials in it). `cause` keeps the error this one explains.
 */
export interface SliceWiseErrorOptions {
  /** HTTP status the API answers with. Default: 500. */
  status?: number;
  /** Machine-readable code. Default: 'internal'. */
  code?: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

export class SliceWiseError extends Error {
  readonly status: number;
  readonly code: string;
  readonly details?: Record<string, unknown>;

  constructor(message: string, { status = 500, code = 'internal', details, cause }: SliceWiseErrorOptions = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'SliceWiseError';
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// The subclasses below are alike by design: each names what went wrong in its own fields, for the run record.

/** Bad input data for one patient: names the patient and the file so the run record points at it. */
export class PatientDataError extends SliceWiseError {
  readonly patientId: string;
  readonly file: string;
  readonly reason: string;

  constructor(patientId: string, file: string, reason: string, { cause }: { cause?: unknown } = {}) {
    super(`patient ${patientId}: ${file}: ${reason}`, { status: 422, code: 'patient_data', details: { patientId, file, reason }, cause });
    this.name = 'PatientDataError';
    this.patientId = patientId;
    this.file = file;
    this.reason = reason;
  }
}

/** A file that cannot be decoded (corrupt, truncated, wrong format). */
export class DataFileError extends SliceWiseError {
  readonly file: string;
  constructor(file: string, reason: string, { cause }: { cause?: unknown } = {}) {
    super(`${file}: ${reason}`, { status: 422, code: 'data_file', details: { file, reason }, cause });
    this.name = 'DataFileError';
    this.file = file;
  }
}
