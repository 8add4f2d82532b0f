import { ChatKit, useChatKit } from "@openai/chatkit-react";
import { useEffect, useMemo, useState } from "react";

import { authFetch } from "./auth";
import {
  CHATKIT_API_URL,
  CHATKIT_DOMAIN_KEY,
  GREETING,
  MAX_UPLOAD_BYTES,
  STARTER_PROMPTS,
} from "./config";
import { resumableFetch } from "./runs/resumable";
import { bringRunIntoView } from "./runs/thread";
import { ThreadSearch } from "./Search";

const CDN_WAIT_MS = 20_000;
// The open thread, kept across reloads of this tab (not shared with other tabs).
const THREAD_KEY = "chatkit-pg:thread";

function storedThread(): string | null {
  try {
    return sessionStorage.getItem(THREAD_KEY);
  } catch {
    return null; // storage disabled: every load starts a new thread, as before
  }
}

function storeThread(threadId: string | null): void {
  try {
    if (threadId) sessionStorage.setItem(THREAD_KEY, threadId);
    else sessionStorage.removeItem(THREAD_KEY);
  } catch {
    // storage disabled
  }
}

/** Follows the operating system's light/dark setting. */
function useColorScheme(): "light" | "dark" {
  const query = "(prefers-color-scheme: dark)";
  const [dark, setDark] = useState(() => matchMedia(query).matches);
  useEffect(() => {
    const media = matchMedia(query);
    const onChange = (event: MediaQueryListEvent) => setDark(event.matches);
    media.addEventListener("change", onChange);
    return () => media.removeEventListener("change", onChange);
  }, []);
  return dark ? "dark" : "light";
}

/** The component is loaded by index.html's CDN script; say so plainly when it never arrives. */
function useComponentMissing(): boolean {
  const [missing, setMissing] = useState(false);
  useEffect(() => {
    if (customElements.get("openai-chatkit")) return;
    let defined = false;
    void customElements.whenDefined("openai-chatkit").then(() => {
      defined = true;
      setMissing(false);
    });
    const onError = () => setMissing(!defined);
    if (window.chatkitScriptFailed) onError();
    window.addEventListener("chatkit-script-error", onError);
    const timer = setTimeout(onError, CDN_WAIT_MS); // a script that hangs instead of failing
    return () => {
      clearTimeout(timer);
      window.removeEventListener("chatkit-script-error", onError);
    };
  }, []);
  return missing;
}

export function App() {
  const colorScheme = useColorScheme();
  const componentMissing = useComponentMissing();
  const [error, setError] = useState<string | null>(null);
  const [initialThread] = useState(storedThread);
  const [threadId, setThreadId] = useState(initialThread);
  // Replies survive dropped connections and reloads; the stop button cancels (docs/runs.md).
  const apiFetch = useMemo(() => resumableFetch(authFetch, CHATKIT_API_URL), []);

  const chatkit = useChatKit({
    api: {
      url: CHATKIT_API_URL,
      domainKey: CHATKIT_DOMAIN_KEY,
      fetch: apiFetch,
      // chatkit-pg answers attachments.create with a signed upload URL (two-phase upload).
      uploadStrategy: { type: "two_phase" },
    },
    theme: { colorScheme, radius: "round" },
    history: { enabled: true },
    initialThread,
    startScreen: { greeting: GREETING, prompts: STARTER_PROMPTS },
    composer: {
      placeholder: "Message the assistant",
      attachments: { enabled: true, maxSize: MAX_UPLOAD_BYTES },
    },
    onError: ({ error }) => setError(error.message || "Something went wrong."),
    onResponseStart: () => setError(null),
    onThreadChange: ({ threadId }) => {
      storeThread(threadId);
      setThreadId(threadId);
    },
  });

  // A reply still running in the open thread (after a reload, or another tab's): show it
  // whole once it ends.
  const { fetchUpdates } = chatkit;
  useEffect(() => {
    if (!threadId) return;
    const controller = new AbortController();
    bringRunIntoView({
      fetch: authFetch,
      apiUrl: CHATKIT_API_URL,
      threadId,
      fetchUpdates: () => fetchUpdates(),
      signal: controller.signal,
    }).catch((reason: unknown) => {
      if (!controller.signal.aborted) console.warn("chatkit-pg: run not followed", reason);
    });
    return () => controller.abort();
  }, [threadId, fetchUpdates]);

  return (
    <div className="app">
      {componentMissing && (
        <div className="banner" role="alert">
          The chat component could not be loaded from OpenAI's CDN
          (cdn.platform.openai.com). Check the network connection and any content blocker.
        </div>
      )}
      {error && (
        <div className="banner" role="alert">
          {error}
          <button type="button" onClick={() => setError(null)} aria-label="Dismiss">
            ×
          </button>
        </div>
      )}
      <div className="main">
        <ThreadSearch onOpen={(threadId) => void chatkit.setThreadId(threadId)} />
        <ChatKit control={chatkit.control} className="chatkit" />
      </div>
    </div>
  );
}
