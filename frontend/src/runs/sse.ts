// Server-Sent Events split into whole events, as bytes arrive (chunks may cut an event, a line
// or a UTF-8 character anywhere). Each event keeps its text as received, so it can be passed on
// unchanged, and its `id:` (chatkit-pg numbers a resumable reply's events `<run_id>:<seq>`).

export interface SseEvent {
  /** The event's lines, without the blank line that ended it. */
  readonly text: string;
  /** Its `id:` field, or null (a heartbeat comment has none). */
  readonly id: string | null;
}

/** Feeds bytes, returns the events they complete; the rest waits for the next chunk. */
export class SseSplitter {
  private buffer = "";
  private decoder = new TextDecoder();

  push(chunk: Uint8Array): SseEvent[] {
    this.buffer += this.decoder.decode(chunk, { stream: true }).replace(/\r\n?/g, "\n");
    const events: SseEvent[] = [];
    let cut: number;
    while ((cut = this.buffer.indexOf("\n\n")) >= 0) {
      const text = this.buffer.slice(0, cut);
      this.buffer = this.buffer.slice(cut + 2);
      if (text) events.push({ text, id: eventId(text) });
    }
    return events;
  }

  /** Forget a partial event (its connection broke: it will be sent again in full). */
  reset(): void {
    this.buffer = "";
    this.decoder = new TextDecoder();
  }
}

function eventId(text: string): string | null {
  for (const line of text.split("\n")) {
    if (line.startsWith("id:")) return line.slice(3).trim();
  }
  return null;
}

/** The seq of an event id `<runId>:<seq>` of this run, or null. */
export function seqOf(id: string | null, runId: string): number | null {
  if (id === null) return null;
  const cut = id.lastIndexOf(":");
  if (cut < 0 || id.slice(0, cut) !== runId) return null;
  const seq = Number(id.slice(cut + 1));
  return Number.isSafeInteger(seq) && seq >= 0 ? seq : null;
}
