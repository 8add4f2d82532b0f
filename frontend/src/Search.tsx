// The search box beside the chat: the user's own threads, searched as they type
// (GET {CHATKIT_API_URL}/threads/search, docs/search.md). Choosing a result opens its thread
// in the ChatKit component. Snippets arrive as plain-text pieces; the matched ones are shown
// in <mark>, as text, never as markup.
import { useEffect, useRef, useState } from "react";

import { authFetch } from "./auth";
import { CHATKIT_API_URL } from "./config";

const DEBOUNCE_MS = 200;
const PAGE_SIZE = 20;
const MAX_QUERY_CHARS = 256;

type Piece = { text: string; hit: boolean };
export type SearchHit = {
  thread_id: string;
  item_id: string | null;
  title: string | null;
  rank: number;
  snippet: Piece[];
};
type SearchPage = { data: SearchHit[]; after: string | null };

export const SEARCH_URL = `${CHATKIT_API_URL.replace(/\/+$/, "")}/threads/search`;

async function fetchPage(q: string, after: string | null, signal: AbortSignal): Promise<SearchPage> {
  const params = new URLSearchParams({ q, limit: String(PAGE_SIZE) });
  if (after) params.set("after", after);
  const response = await authFetch(`${SEARCH_URL}?${params}`, { signal });
  if (!response.ok) {
    let message = `Search failed (${response.status}).`;
    try {
      const body = await response.json();
      if (body?.error?.message) message = body.error.message;
    } catch {
      // not JSON: keep the status line
    }
    throw new Error(message);
  }
  return (await response.json()) as SearchPage;
}

export function ThreadSearch({ onOpen }: { onOpen: (threadId: string) => void }) {
  const [query, setQuery] = useState("");
  const [hits, setHits] = useState<SearchHit[]>([]);
  const [after, setAfter] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const current = useRef<AbortController | null>(null);

  // Each keystroke (after a pause) replaces the results; an older answer arriving late is
  // dropped by aborting its request.
  useEffect(() => {
    current.current?.abort();
    if (!query.trim()) {
      setHits([]);
      setAfter(null);
      setError(null);
      return;
    }
    const controller = new AbortController();
    current.current = controller;
    const timer = setTimeout(() => {
      setBusy(true);
      fetchPage(query, null, controller.signal)
        .then((page) => {
          setHits(page.data);
          setAfter(page.after);
          setError(null);
        })
        .catch((err: unknown) => {
          if (!controller.signal.aborted) setError(err instanceof Error ? err.message : String(err));
        })
        .finally(() => {
          if (!controller.signal.aborted) setBusy(false);
        });
    }, DEBOUNCE_MS);
    return () => {
      clearTimeout(timer);
      controller.abort();
    };
  }, [query]);

  const loadMore = () => {
    if (!after) return;
    const controller = new AbortController();
    current.current = controller;
    setBusy(true);
    fetchPage(query, after, controller.signal)
      .then((page) => {
        setHits((old) => [...old, ...page.data]);
        setAfter(page.after);
      })
      .catch((err: unknown) => {
        if (!controller.signal.aborted) setError(err instanceof Error ? err.message : String(err));
      })
      .finally(() => setBusy(false));
  };

  return (
    <aside className="search" aria-label="Search conversations">
      <input
        type="search"
        className="search-input"
        placeholder="Search conversations"
        aria-label="Search conversations"
        maxLength={MAX_QUERY_CHARS}
        value={query}
        onChange={(event) => setQuery(event.target.value)}
      />
      {error && (
        <p className="search-error" role="alert">
          {error}
        </p>
      )}
      <ul className="search-results" aria-busy={busy}>
        {hits.map((hit) => (
          <li key={`${hit.thread_id}/${hit.item_id ?? ""}`}>
            <button
              type="button"
              className="search-hit"
              data-thread-id={hit.thread_id}
              onClick={() => onOpen(hit.thread_id)}
            >
              <span className="search-title">{hit.title || "Untitled conversation"}</span>
              <span className="search-snippet">
                {hit.snippet.map((piece, i) => (piece.hit ? <mark key={i}>{piece.text}</mark> : piece.text))}
              </span>
            </button>
          </li>
        ))}
      </ul>
      {query.trim() && !busy && !error && hits.length === 0 && <p className="search-empty">No matches.</p>}
      {after && (
        <button type="button" className="search-more" onClick={loadMore} disabled={busy}>
          More results
        </button>
      )}
    </aside>
  );
}
