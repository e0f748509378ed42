// The API's one error shape: any error -> (HTTP status, OpenAI error body). Used by the Fastify
// error handler and by SSE streams that fail after their headers were sent.
import type { FastifyError } from 'fastify';
import { LoraplexError } from './engine/errors.js';

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export function errorBody(message: string, type: string, param: string | null, code: string | null): OpenAIErrorBody {
  return { error: { message, type, param, code } };
}

export interface MappedError {
  status: number;
  body: OpenAIErrorBody;
  retryAfter?: number;
  /** A condition the server reports on purpose (bad input, full, draining): logged at warn, no stack. */
  expected: boolean;
}

/** Maps any error to (status, OpenAI error body). Bad input is a 4xx; only our own bugs are 500. */
export function toOpenAIError(err: unknown): MappedError {
  if (err instanceof LoraplexError) {
    const retry = err.status === 429 || err.status === 503 ? 5 : undefined;
    return { status: err.status, body: errorBody(err.message, err.type, err.param, err.code), retryAfter: retry, expected: err.status < 500 || err.status === 503 };
  }
  const e = err as FastifyError & { validation?: Array<{ instancePath?: string; params?: Record<string, unknown>; message?: string }> };
  if (e.validation && e.validation.length) {
    const v = e.validation[0];
    const path = (v.instancePath ?? '').replace(/^\//, '').replace(/\//g, '.');
    const missing = v.params?.missingProperty as string | undefined;
    const param = missing ? (path ? `${path}.${missing}` : missing) : path || null;
    const msg = missing ? `${param} is required` : `${param ?? 'body'} ${v.message ?? 'is invalid'}`;
    return { status: 400, body: errorBody(msg, 'invalid_request_error', param, 'invalid_value'), expected: true };
  }
  switch (e.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return { status: 413, body: errorBody('request body is too large', 'invalid_request_error', null, 'request_too_large'), expected: true };
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return { status: 415, body: errorBody('unsupported content type; send application/json', 'invalid_request_error', null, 'unsupported_media_type'), expected: true };
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return { status: 400, body: errorBody('request body is not valid JSON', 'invalid_request_error', null, 'invalid_json'), expected: true };
  }
  if (e.statusCode && e.statusCode >= 400 && e.statusCode < 500)
    return { status: e.statusCode, body: errorBody(e.message, 'invalid_request_error', null, e.code ?? null), expected: true };
  return { status: 500, body: errorBody('internal server error', 'server_error', null, null), expected: false };
}
