// Typed errors that carry an HTTP status and OpenAI error fields; the one error path from C++
// exceptions and validation to the API's error JSON.
export class LoraplexError extends Error {
  constructor(
    message: string,
    readonly status: number = 400,
    readonly type: string = 'invalid_request_error',
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
    this.name = 'LoraplexError';
  }
}

/** A model or adapter directory that cannot be loaded (CLI exit 1, HTTP 400/415). */
export class ModelLoadError extends LoraplexError {
  constructor(message: string, status = 400, code: string | null = 'invalid_model') {
    super(message, status, 'invalid_request_error', null, code);
    this.name = 'ModelLoadError';
  }
}

/** An adapter that cannot be served: bad config, bad weights, missing files (400 invalid_adapter). */
export class AdapterError extends LoraplexError {
  constructor(message: string, status = 400, param: string | null = null, code = 'invalid_adapter') {
    super(message, status, 'invalid_request_error', param, code);
    this.name = 'AdapterError';
  }
}
