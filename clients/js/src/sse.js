// The fallback transport behind a WebSocket-like face (docs/protocol.md §2.5).

/**
 * The fallback transport (protocol §2.5) behind a WebSocket-like face: `GET /sse` streams the
 * server's frames as Server-Sent Events (read with fetch, so it works in browsers and Node),
 * and each frame the client sends is a `POST /sse/{session}`, in order. JSON frames only.
 */
export class SseSocket {
  /** @param {string} url the broker's WebSocket URL (`ws://host:port/ws`) */
  constructor(url) {
    const http = url.replace(/^ws(s?):/, "http$1:");
    const at = http.search(/\/ws(\?|$)/);
    this.base = at < 0 ? http : http.slice(0, at);
    // A token in the URL (`?token=`) goes to `GET /sse` too.
    this.query = at < 0 ? "" : http.slice(at + 3);
    this.readyState = 0;
    this.binaryType = "arraybuffer";
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this._abort = new AbortController();
    this._post = null;
    this._sending = Promise.resolve();
    this._close = null;
    this._run();
  }

  async _run() {
    let code = 1006;
    let reason = "event stream lost";
    try {
      const response = await fetch(`${this.base}/sse${this.query}`, {
        headers: { accept: "text/event-stream" },
        signal: this._abort.signal,
        cache: "no-store",
      });
      if (!response.ok || !response.body) throw new Error(`GET /sse answered ${response.status}`);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          this._event(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
      if (this._close) ({ code, reason } = this._close);
    } catch (error) {
      if (this._close) ({ code, reason } = this._close);
      else reason = String(error);
    }
    this._finish(code, reason);
  }

  _event(block) {
    let type = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // a comment: the broker's ping
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    }
    const text = data.join("\n");
    if (type === "session") {
      this._post = `${this.base}${JSON.parse(text).post}`;
      this.readyState = 1;
      this.onopen?.({});
    } else if (type === "close") {
      this._close = JSON.parse(text);
    } else if (text) {
      this.onmessage?.({ data: text });
    }
  }

  send(text) {
    if (this.readyState !== 1) return;
    // One POST at a time, so frames reach the broker in the order they were sent.
    this._sending = this._sending.then(async () => {
      if (this.readyState !== 1) return;
      try {
        const response = await fetch(this._post, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: text,
          signal: this._abort.signal,
        });
        if (response.status === 404) this.close(4004, "event stream ended");
        else await response.arrayBuffer();
      } catch {
        this.close(1006, "post failed");
      }
    });
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= 2) return;
    this._close = this._close || { code, reason };
    const wasOpen = this.readyState === 1;
    this.readyState = 2;
    if (wasOpen && this._post) {
      // Tell the broker at once, so the session's viewer counts and connection slot go now;
      // `keepalive` lets it outlive a closing page.
      fetch(this._post, { method: "DELETE", keepalive: true }).catch(() => {});
    }
    this._abort.abort();
  }

  _finish(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}
