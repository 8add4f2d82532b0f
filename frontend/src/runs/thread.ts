// After a page reload (or on opening a thread from the list), a reply that outlived its
// connection may still be running in the open thread: ChatKit shows the thread as stored, which
// does not have that reply yet. Ask the backend (`GET {api}/threads/<id>/run`, docs/runs.md);
// when a run is going that this page is not streaming itself, follow it to its end (its events
// after the last one logged, through any backend, reconnecting as ./follow.ts does) and then
// let ChatKit fetch the thread's updates, so the finished reply comes into view.

import { type RetryPolicy, followRun } from "./follow";
import { streamingRuns } from "./resumable";

export interface RunGoing {
  run_id: string;
  seq: number;
}

/** The thread's running run, or null (none going; not found alike). */
export async function runGoing(
  base: typeof fetch,
  apiUrl: string,
  threadId: string,
  signal: AbortSignal,
): Promise<RunGoing | null> {
  const url = `${apiUrl.replace(/\/+$/, "")}/threads/${encodeURIComponent(threadId)}/run`;
  const response = await base(url, { method: "GET", cache: "no-store", signal });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`${url} answered ${response.status}`);
  const body = (await response.json()) as Partial<RunGoing>;
  if (typeof body.run_id !== "string" || typeof body.seq !== "number") {
    throw new Error(`${url} answered an unexpected body`);
  }
  return { run_id: body.run_id, seq: body.seq };
}

/** When `threadId` has a run going (not this page's own), wait for its end, then call
 * `fetchUpdates`. Resolves whether it waited (true) or there was nothing to wait for. */
export async function bringRunIntoView(params: {
  fetch: typeof fetch;
  apiUrl: string;
  threadId: string;
  fetchUpdates: () => Promise<void> | void;
  signal: AbortSignal;
  retry?: RetryPolicy;
}): Promise<boolean> {
  const { fetch, apiUrl, signal } = params;
  const going = await runGoing(fetch, apiUrl, params.threadId, signal);
  if (going === null || streamingRuns.has(going.run_id)) return false;
  try {
    await followRun({
      fetch,
      apiUrl,
      runId: going.run_id,
      after: going.seq,
      onEvent: () => undefined, // only its end matters: ChatKit then loads what was stored
      signal,
      retry: params.retry,
    });
  } finally {
    // Ended, gone, or unreachable for now: show what the thread holds (unless we left it).
    if (!signal.aborted) await params.fetchUpdates();
  }
  return true;
}
