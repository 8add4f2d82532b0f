// A ChatKit stand-in that converses (tests/deploy/test_browser_runs.py): the real component
// loads only from OpenAI's CDN, which the test machines cannot reach. Like the real one it
// sends messages through the page's api.fetch (with an AbortSignal its stop button aborts),
// reads the SSE reply, follows thread changes (the chatkit.thread.change event), opens
// options.initialThread and, on fetchUpdates(), loads the thread's items again. It records:
//   window.__events  every event the component received: { id, type, delta } in arrival order
//   window.__views   the thread's items each time it loaded them (initial load, fetchUpdates)
//   window.__reply   { status, error, ended } of the last message sent
// and hands each delta to window.__ack (a Playwright binding) as it arrives (lockstep).
class ChatKitConversingStandIn extends HTMLElement {
  setOptions(options) {
    const first = !this.options;
    this.options = options;
    window.__chatkitOptions = options;
    window.__chatkit = { calls: (window.__chatkit?.calls ?? 0) + 1 };
    if (first && options.initialThread) {
      this.threadId = options.initialThread;
      void this.loadItems("initial");
    }
  }

  async call(body, signal) {
    const api = this.options.api;
    return api.fetch(api.url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
  }

  async loadItems(why) {
    const response = await this.call({
      type: "items.list",
      params: { thread_id: this.threadId, limit: 50, order: "asc" },
    });
    const items = (await response.json()).data;
    (window.__views ??= []).push({ why, items });
  }

  async fetchUpdates() {
    await this.loadItems("fetchUpdates");
  }

  setThreadId(threadId) {
    this.threadId = threadId;
    return Promise.resolve();
  }

  // The stop button: aborting the request, or (how = "cancel-body") cancelling its body.
  stop(how) {
    if (how === "cancel-body") void this.reader?.cancel();
    else this.controller?.abort();
  }

  async sendUserMessage({ text }) {
    const input = { content: [{ type: "input_text", text }], attachments: [], inference_options: {} };
    const body = this.threadId
      ? { type: "threads.add_user_message", params: { thread_id: this.threadId, input } }
      : { type: "threads.create", params: { input } };
    this.controller = new AbortController();
    const reply = (window.__reply = { status: null, error: null, ended: false });
    window.__events ??= [];
    try {
      const response = await this.call(body, this.controller.signal);
      reply.status = response.status;
      const reader = (this.reader = response.body.getReader());
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          this.receive(block);
        }
      }
    } catch (error) {
      reply.error = String(error && error.name) + ": " + String(error && error.message);
    }
    reply.ended = true;
  }

  receive(block) {
    const lines = block.split("\n");
    const idLine = lines.find((line) => line.startsWith("id:"));
    const data = lines.filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim());
    if (!data.length) return; // a heartbeat comment
    const event = JSON.parse(data.join("\n"));
    const delta = typeof event.update?.delta === "string" ? event.update.delta : null;
    window.__events.push({ id: idLine ? idLine.slice(3).trim() : null, type: event.type, delta });
    if (event.type === "thread.created") {
      this.threadId = event.thread.id;
      this.dispatchEvent(new CustomEvent("chatkit.thread.change", { detail: { threadId: this.threadId } }));
    }
    if (delta !== null && typeof window.__ack === "function") window.__ack(delta);
  }
}
customElements.define("openai-chatkit", ChatKitConversingStandIn);
