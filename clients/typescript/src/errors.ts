/**
 * Every error the client throws, mirroring gpubridge's Python error tree (`gpubridge.errors`):
 *
 *     GpuBridgeError
 *     ├── ConfigError
 *     ├── WorkflowError            the workflow itself is wrong (fails before any GPU time)
 *     │   ├── WorkflowFormatError  not an API-format graph (UI export, ...)
 *     │   ├── WorkflowInputError   unknown node or input, bad image data
 *     │   │   └── TemplateNotFound no workflow template by that name
 *     │   └── WorkflowInvalid      ComfyUI-style validation failed; `details.node_errors`
 *     │       └── ParamInvalid     a template parameter is wrong; `params` names each
 *     ├── PayloadTooLarge          request over the server's size limit (413)
 *     ├── AuthError                credentials missing or rejected (401/403)
 *     ├── InvalidRequest           a malformed request (bad JSON, parameter, header)
 *     ├── Conflict                 not now: the job has not ended yet (409)              retryable
 *     ├── ProviderError            the backend could not be reached or misbehaved       retryable
 *     │   ├── ProviderUnavailable
 *     │   ├── RateLimited          429; `retryAfter` in seconds
 *     │   ├── ProtocolError
 *     │   └── InputUnavailable     an input URL could not be fetched now (424)
 *     ├── JobError                 a job was accepted, then did not produce a result
 *     │   ├── JobFailed
 *     │   ├── JobTimeout                                                                 retryable
 *     │   ├── JobCancelled
 *     │   └── JobNotFound
 *     │       └── ResultExpired
 *     ├── InternalError            a bug in the server (500)
 *     └── TransportError           no HTTP answer at all (connection refused, reset, aborted)
 *
 * `retryable` and `jobMayBeRunning` come from the server's error envelope, so a caller can decide to
 * resubmit without knowing the class.
 */

export interface ErrorEnvelope {
  type: string;
  message: string;
  retryable: boolean;
  job_may_be_running?: boolean;
  job_id?: string | null;
  provider?: string | null;
  retry_after?: number | null;
  [key: string]: unknown;
}

export class GpuBridgeError extends Error {
  /** The server's error type name (`JobFailed`, `RateLimited`, ...). */
  readonly type: string;
  readonly retryable: boolean;
  readonly jobMayBeRunning: boolean;
  /** HTTP status, when the error came from an HTTP answer. */
  readonly status?: number;
  readonly jobId?: string;
  /** The whole error envelope as the server sent it. */
  readonly details: ErrorEnvelope;

  constructor(details: ErrorEnvelope, status?: number, options?: { cause?: unknown }) {
    super(details.message, options);
    this.name = new.target.name;
    this.type = details.type;
    this.retryable = Boolean(details.retryable);
    this.jobMayBeRunning = Boolean(details.job_may_be_running);
    this.status = status;
    this.jobId = details.job_id ?? undefined;
    this.details = details;
  }
}

export class ConfigError extends GpuBridgeError {}
export class WorkflowError extends GpuBridgeError {}
export class WorkflowFormatError extends WorkflowError {}
export class WorkflowInputError extends WorkflowError {}
export class WorkflowInvalid extends WorkflowError {}
export class TemplateNotFound extends WorkflowInputError {}
export class ParamInvalid extends WorkflowInvalid {
  /** Each bad parameter's name and what is wrong with it. */
  get params(): Record<string, string> {
    const value = this.details.params;
    return value && typeof value === "object" ? (value as Record<string, string>) : {};
  }
}
export class PayloadTooLarge extends GpuBridgeError {}
export class AuthError extends GpuBridgeError {}
export class InvalidRequest extends GpuBridgeError {}
export class Conflict extends GpuBridgeError {}
export class ProviderError extends GpuBridgeError {}
export class ProviderUnavailable extends ProviderError {}
export class RateLimited extends ProviderError {
  /** Seconds to wait before trying again, when the server said. */
  get retryAfter(): number | undefined {
    const value = this.details.retry_after;
    return typeof value === "number" ? value : undefined;
  }
}
export class ProtocolError extends ProviderError {}
export class InputUnavailable extends ProviderError {}
export class JobError extends GpuBridgeError {}
export class JobFailed extends JobError {}
export class JobTimeout extends JobError {}
export class JobCancelled extends JobError {}
export class JobNotFound extends JobError {}
export class ResultExpired extends JobNotFound {}
export class InternalError extends GpuBridgeError {}
export class TransportError extends GpuBridgeError {}

const CLASSES: Record<string, new (d: ErrorEnvelope, s?: number) => GpuBridgeError> = {
  ConfigError, ProviderNotFound: ConfigError, WorkflowError, WorkflowFormatError, WorkflowInputError,
  WorkflowInvalid, TemplateNotFound, ParamInvalid, PayloadTooLarge, AuthError, InvalidRequest, Conflict, ProviderError, ProviderUnavailable,
  RateLimited, ProtocolError, InputUnavailable, JobError, JobFailed, JobTimeout, JobCancelled, JobNotFound,
  ResultExpired, InternalError,
};

/** The typed error for an envelope (an unknown type name becomes the nearest class by HTTP status). */
export function errorFrom(details: ErrorEnvelope, status?: number): GpuBridgeError {
  const cls = CLASSES[details.type];
  if (cls) return new cls(details, status);
  if (status === 401 || status === 403) return new AuthError(details, status);
  if (status === 404) return new JobNotFound(details, status);
  if (status === 429) return new RateLimited(details, status);
  if (status !== undefined && status >= 500) return new ProviderUnavailable(details, status);
  if (status !== undefined && status >= 400) return new InvalidRequest(details, status);
  return new GpuBridgeError(details, status);
}
