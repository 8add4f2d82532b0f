// The event splitter and the id parsing (npm test). The reconnecting reader and the api.fetch
// are tested end to end in Chromium: tests/deploy/test_browser_runs.py.
import { describe, expect, it } from "vitest";

import { backoffMs, DEFAULT_RETRY } from "./follow";
import { SseSplitter, seqOf } from "./sse";

const bytes = (text: string) => new TextEncoder().encode(text);

describe("SseSplitter", () => {
  const stream = 'id: run_1:1\ndata: {"type":"a","t":"é€😀"}\n\n: ping\n\nid: run_1:2\ndata: {}\n\n';

  it("splits whole events, keeping their text and id", () => {
    const events = new SseSplitter().push(bytes(stream));
    expect(events).toEqual([
      { text: 'id: run_1:1\ndata: {"type":"a","t":"é€😀"}', id: "run_1:1" },
      { text: ": ping", id: null },
      { text: "id: run_1:2\ndata: {}", id: "run_1:2" },
    ]);
  });

  it("gives the same events whatever the chunks, even mid-character", () => {
    const whole = new SseSplitter().push(bytes(stream));
    const encoded = bytes(stream);
    for (let size = 1; size <= 7; size++) {
      const splitter = new SseSplitter();
      const events = [];
      for (let at = 0; at < encoded.length; at += size) {
        events.push(...splitter.push(encoded.slice(at, at + size)));
      }
      expect(events).toEqual(whole);
    }
  });

  it("reads CRLF line ends as LF", () => {
    expect(new SseSplitter().push(bytes("id: r:1\r\ndata: x\r\n\r\n"))).toEqual([
      { text: "id: r:1\ndata: x", id: "r:1" },
    ]);
  });

  it("forgets a partial event on reset", () => {
    const splitter = new SseSplitter();
    expect(splitter.push(bytes("id: r:1\ndata: {\"cut"))).toEqual([]);
    splitter.reset();
    expect(splitter.push(bytes("id: r:1\ndata: {}\n\n"))).toEqual([
      { text: "id: r:1\ndata: {}", id: "r:1" },
    ]);
  });
});

describe("seqOf", () => {
  it("reads this run's seq only", () => {
    expect(seqOf("run_ab:17", "run_ab")).toBe(17);
    expect(seqOf("run_ab:0", "run_ab")).toBe(0);
    expect(seqOf("run_cd:17", "run_ab")).toBeNull();
    expect(seqOf("run_ab", "run_ab")).toBeNull();
    expect(seqOf("run_ab:x", "run_ab")).toBeNull();
    expect(seqOf("run_ab:-1", "run_ab")).toBeNull();
    expect(seqOf("run_ab:1.5", "run_ab")).toBeNull();
    expect(seqOf(null, "run_ab")).toBeNull();
  });
});

describe("backoffMs", () => {
  it("reconnects at once, then doubles up to the cap", () => {
    const waits = Array.from({ length: DEFAULT_RETRY.maxAttempts }, (_, i) =>
      backoffMs(i + 1, DEFAULT_RETRY),
    );
    expect(waits).toEqual([0, 250, 500, 1000, 2000, 4000, 4000, 4000]);
  });
});
