// Following a resumable reply (docs/runs.md) to its end, whatever happens to the network:
// read a body of SSE events; when the connection fails, ask any backend for the events after
// the last one handed on (`GET {api}/runs/<id>/events`, `Last-Event-ID: <id>:<seq>`), with a
// bounded backoff and a bounded number of attempts in a row. Every event is handed on exactly
// once, in order: one already handed on (a seq not above the last) is skipped, a gap is
// treated as a broken connection.

import { type SseEvent, SseSplitter, seqOf } from "./sse";

export interface RetryPolicy {
  /** Reconnections in a row without receiving an event before giving up. */
  maxAttempts: number;
  /** The first wait before reconnecting; doubled each failed attempt, up to maxDelayMs. */
  baseDelayMs: number;
  maxDelayMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 8, baseDelayMs: 250, maxDelayMs: 4000 };

/** The wait before reconnection `attempt` (1, 2, ...): the first at once, then doubling. */
export function backoffMs(attempt: number, policy: RetryPolicy): number {
  if (attempt <= 1) return 0;
  return Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 2));
}

/** The backend no longer has the run (404: ended past its retention, or never this user's), or
 * refused the request for good (another 4xx), or every attempt failed. */
export class RunFollowError extends Error {
  constructor(
    message: string,
    readonly status: number | null,
  ) {
    super(message);
    this.name = "RunFollowError";
  }
}

export interface FollowParams {
  fetch: typeof fetch;
  /** The ChatKit endpoint (CHATKIT_PATH), as given to ChatKit's api.url. */
  apiUrl: string;
  runId: string;
  /** The seq of the last event the caller has (0: none). */
  after: number;
  /** An open body to read first (the reply's own response), if any. */
  body?: ReadableStream<Uint8Array> | null;
  onEvent: (event: SseEvent, seq: number | null) => void;
  signal: AbortSignal;
  retry?: RetryPolicy;
}

export function runUrl(apiUrl: string, runId: string, action: "events" | "cancel"): string {
  return `${apiUrl.replace(/\/+$/, "")}/runs/${encodeURIComponent(runId)}/${action}`;
}

class Gap extends Error {}

/** Resolves when the run has ended and every event after `after` was handed to onEvent;
 * rejects with the signal's reason when it aborts, or a RunFollowError. */
export async function followRun(params: FollowParams): Promise<number> {
  const { runId, signal } = params;
  const retry = params.retry ?? DEFAULT_RETRY;
  const splitter = new SseSplitter();
  let last = params.after;
  let body = params.body ?? null;
  let attempt = 0;
  let failure: unknown = null;

  const deliver = (event: SseEvent): void => {
    const seq = seqOf(event.id, runId);
    if (seq !== null) {
      if (seq <= last) return; // already handed on (a replay overlapping what we have)
      if (seq !== last + 1) throw new Gap(`event ${seq} after ${last}`);
      last = seq;
      attempt = 0; // progress: the attempts in a row start again
    }
    params.onEvent(event, seq);
  };

  for (;;) {
    if (body !== null) {
      const reader = body.getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return last; // the response ended: so did the run
          for (const event of splitter.push(value)) deliver(event);
        }
      } catch (error) {
        if (signal.aborted) throw signal.reason;
        failure = error; // the network broke (or a gap): resume after `last`
        reader.cancel().catch(() => undefined);
      }
      splitter.reset();
      body = null;
    }
    attempt += 1;
    if (attempt > retry.maxAttempts) {
      throw new RunFollowError(`run ${runId}: gave up reconnecting (${String(failure)})`, null);
    }
    await sleep(backoffMs(attempt, retry), signal);
    let response: Response;
    try {
      response = await params.fetch(runUrl(params.apiUrl, runId, "events"), {
        method: "GET",
        headers: { "Last-Event-ID": `${runId}:${last}`, Accept: "text/event-stream" },
        cache: "no-store",
        signal,
      });
    } catch (error) {
      if (signal.aborted) throw signal.reason;
      failure = error;
      continue;
    }
    if (response.ok && response.body) {
      body = response.body;
    } else if (retriable(response.status)) {
      failure = new Error(`HTTP ${response.status}`);
      response.body?.cancel().catch(() => undefined);
    } else {
      response.body?.cancel().catch(() => undefined);
      throw new RunFollowError(`run ${runId}: HTTP ${response.status}`, response.status);
    }
  }
}

function retriable(status: number): boolean {
  return status === 408 || status === 425 || status === 429 || status >= 500;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.reject(signal.reason);
  if (ms <= 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}
