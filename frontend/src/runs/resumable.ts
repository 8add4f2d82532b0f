// ChatKit's api.fetch for resumable replies (docs/runs.md, "The frontend"). Wraps a fetch (the
// one adding the user's token) so that:
//
// * every POST to the ChatKit endpoint opts in (`X-Chatkit-Resumable: true`); a streaming one
//   answers `X-Chatkit-Run: <run_id>` and numbers its events `<run_id>:<seq>`;
// * the body ChatKit reads is this module's stream: when the network drops mid-reply it
//   resumes through any backend after the last event it handed on (./follow.ts), so ChatKit
//   gets every event exactly once, in order, and never sees the cut;
// * ChatKit aborting its request (its stop button), or cancelling the body, is not a network
//   drop: the run is cancelled server-side (`POST .../runs/<id>/cancel`, keepalive) and the
//   stream ends with the abort;
// * the runs this page streams itself are in `streamingRuns`, so ./thread.ts does not follow
//   them a second time.
//
// Anything else (GETs, uploads, a non-streaming POST, an error answer) passes through as is.

import { DEFAULT_RETRY, type RetryPolicy, followRun, runUrl } from "./follow";

export const RESUMABLE_HEADER = "X-Chatkit-Resumable";
export const RUN_HEADER = "X-Chatkit-Run";

/** Runs whose reply this page is reading right now (through resumableFetch). */
export const streamingRuns = new Set<string>();

function requestUrl(input: RequestInfo | URL): string {
  if (typeof input === "string") return input;
  if (input instanceof URL) return input.href;
  return input.url;
}

function sameUrl(a: string, b: string): boolean {
  const base = globalThis.location?.href;
  try {
    return new URL(a, base).href.replace(/\/+$/, "") === new URL(b, base).href.replace(/\/+$/, "");
  } catch {
    return false;
  }
}

function abortError(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException("The operation was aborted.", "AbortError");
}

/** Ask the backend to stop the run wherever it runs. keepalive: it is sent even when the page
 * is going away. Failures are only logged: the run then ends by itself. */
export function cancelRun(base: typeof fetch, apiUrl: string, runId: string): void {
  base(runUrl(apiUrl, runId, "cancel"), { method: "POST", keepalive: true }).then(
    (response) => response.body?.cancel().catch(() => undefined),
    (error: unknown) => console.warn(`chatkit-pg: cancel of ${runId} not sent`, error),
  );
}

export function resumableFetch(
  base: typeof fetch,
  apiUrl: string,
  retry: RetryPolicy = DEFAULT_RETRY,
): typeof fetch {
  return async (input, init) => {
    const method = (init?.method ?? (input instanceof Request ? input.method : "GET")).toUpperCase();
    const caller = init?.signal ?? (input instanceof Request ? input.signal : null);
    if (method !== "POST" || !sameUrl(requestUrl(input), apiUrl) || caller?.aborted) {
      return base(input, init);
    }
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : {}));
    headers.set(RESUMABLE_HEADER, "true");
    // Our own signal: a caller's abort before the answer must still learn the run to cancel.
    const inner = new AbortController();
    const answer = base(input, { ...init, headers, signal: inner.signal });

    let runId: string | null = null;
    let ended = false;
    const onAbort = () => {
      if (runId !== null) {
        if (!ended) cancelRun(base, apiUrl, runId);
        inner.abort(abortError(caller!));
        return;
      }
      // Not answered yet: cancel the run as soon as the answer names it, then stop reading.
      answer.then(
        (response) => {
          const late = response.headers.get(RUN_HEADER);
          if (late) cancelRun(base, apiUrl, late);
          inner.abort(abortError(caller!));
        },
        () => undefined,
      );
    };
    caller?.addEventListener("abort", onAbort, { once: true });

    let response: Response;
    try {
      response = await (caller
        ? Promise.race([
            answer,
            new Promise<never>((_, reject) =>
              caller.addEventListener("abort", () => reject(abortError(caller)), { once: true }),
            ),
          ])
        : answer);
    } catch (error) {
      if (!caller?.aborted) caller?.removeEventListener("abort", onAbort);
      throw error;
    }
    runId = response.headers.get(RUN_HEADER);
    if (runId === null || !response.ok || response.body === null) {
      // Not a run: the plain response, still aborted with the caller.
      return response;
    }
    const run = runId;
    streamingRuns.add(run);
    // `ended`: the run is over (or cancelled), nothing to cancel. A body given up on leaves
    // the run going: an abort after that still cancels it.
    const finish = (runEnded: boolean) => {
      streamingRuns.delete(run);
      if (!runEnded) return;
      ended = true;
      caller?.removeEventListener("abort", onAbort);
    };
    const encoder = new TextEncoder();
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        followRun({
          fetch: base,
          apiUrl,
          runId: run,
          after: 0,
          body: response.body,
          onEvent: (event) => controller.enqueue(encoder.encode(`${event.text}\n\n`)),
          signal: inner.signal,
          retry,
        }).then(
          () => {
            finish(true);
            controller.close();
          },
          (error: unknown) => {
            finish(false);
            controller.error(error);
          },
        );
      },
      cancel(reason) {
        // The reader chose to stop reading: a stop, like an abort (without the opt-in,
        // closing the body closes the connection, which cancels the reply).
        if (!ended) cancelRun(base, apiUrl, run);
        finish(true);
        inner.abort(reason);
      },
    });
    return new Response(body, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  };
}
