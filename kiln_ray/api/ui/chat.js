// The chat playground: a model / adapter picker from GET /v1/models, and a conversation
// streamed from POST /v1/chat/completions (stream: true) through fetch + ReadableStream.

import { describe, errorFromBody, get, request } from "./api.js";
import { byId, h, setText, showLine } from "./dom.js";

// The JSON payloads of an SSE response, in order, until `data: [DONE]`. An error event
// (the server failed after the headers went out) is thrown as an ApiError.
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw errorFromBody(0, payload, "the stream failed");
      yield payload;
    }
  }
}

export class ChatPanel {
  constructor() {
    this.history = []; // [{role, content}] of finished turns
    this.controller = null; // AbortController of the answer being streamed
    byId("chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    byId("chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        this.send();
      }
    });
    byId("chat-stop").addEventListener("click", () => this.controller && this.controller.abort());
    byId("chat-clear").addEventListener("click", () => {
      this.history = [];
      byId("chat-log").replaceChildren();
      setText("chat-stats", "");
      showLine("chat-error", "");
    });
  }

  // Fill the picker: the base model, then each adapter; keeps the current choice if it still exists.
  async refreshModels() {
    let models;
    try {
      models = (await get("/v1/models")).data;
    } catch (error) {
      showLine("chat-error", `models: ${describe(error)}`);
      return;
    }
    const select = byId("chat-model");
    const previous = select.value;
    select.replaceChildren(...models.map((m) => {
      const kind = m.parent ? `adapter v${m.current_version ?? "?"}${m.default ? ", default" : ""}` : "base model";
      return h("option", { value: m.id }, `${m.id} (${kind})`);
    }));
    if (models.some((m) => m.id === previous)) select.value = previous;
  }

  async send() {
    const input = byId("chat-input");
    const text = input.value.trim();
    if (!text || this.controller) return;
    input.value = "";
    showLine("chat-error", "");
    const system = byId("chat-system").value.trim();
    const user = { role: "user", content: text };
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.history, user];
    this.bubble("user", text);
    const answer = this.bubble("assistant", "");
    answer.dataset.state = "streaming";
    const body = {
      model: byId("chat-model").value || undefined,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: Number(byId("chat-max-tokens").value) || undefined,
      temperature: Number(byId("chat-temperature").value),
    };
    this.setBusy(true);
    const started = performance.now();
    let first = null;
    let usage = null;
    try {
      const response = await request("POST", "/v1/chat/completions", { json: body, signal: this.controller.signal });
      for await (const chunk of sseEvents(response)) {
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta : null;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          answer.textContent += delta.content;
          byId("chat-log").scrollTop = byId("chat-log").scrollHeight;
        }
      }
      answer.dataset.state = "done";
      this.history.push(user, { role: "assistant", content: answer.textContent });
    } catch (error) {
      const stopped = error.name === "AbortError";
      answer.dataset.state = stopped ? "stopped" : "error";
      if (!answer.textContent) answer.remove();
      if (!stopped) showLine("chat-error", describe(error));
    } finally {
      this.setBusy(false);
    }
    setText("chat-stats", stats(started, first, performance.now(), usage));
  }

  bubble(role, text) {
    const el = h("div", { class: `bubble ${role}`, dataset: { testid: `chat-${role}` } }, text);
    byId("chat-log").append(el);
    return el;
  }

  setBusy(busy) {
    this.controller = busy ? new AbortController() : null;
    byId("chat-send").disabled = busy;
    byId("chat-stop").disabled = !busy;
  }
}

function stats(started, first, ended, usage) {
  if (first === null) return "";
  const parts = [`first token after ${(first - started).toFixed(0)} ms`];
  if (usage) {
    const seconds = (ended - first) / 1000;
    parts.push(`${usage.completion_tokens} tokens`);
    if (usage.completion_tokens > 1 && seconds > 0) parts.push(`${((usage.completion_tokens - 1) / seconds).toFixed(1)} tokens/s`);
  }
  return parts.join(" · ");
}
