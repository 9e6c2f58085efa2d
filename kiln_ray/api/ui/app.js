// Boot the page: the API key form, the panels, and the polling loops.
//
//   GET /health                    every 2 s   server panel
//   GET /metrics                   every 2 s   throughput / latency charts
//   GET /v1/train/status, /queue   every 2 s   jobs, queue, loss curve
//   GET /v1/adapters, /v1/models   every 10 s  and after anything that changes adapters

import { AdaptersPanel } from "./adapters.js";
import { apiKey, describe, onAuthFailure, request, saveApiKey } from "./api.js";
import { LineChart } from "./charts.js";
import { ChatPanel } from "./chat.js";
import { byId, every, h, showLine } from "./dom.js";
import { MetricsHistory, parsePrometheus } from "./metrics.js";
import { refreshStatus } from "./status.js";
import { TrainingPanel } from "./training.js";

const WINDOW_S = 300;

function notify(kind, text) {
  const box = byId("notices");
  const note = h("div", { class: `notice ${kind}`, dataset: { testid: "notice", kind } }, text,
    h("button", { type: "button", class: "close", "aria-label": "dismiss", onclick: () => note.remove() }, "×"));
  box.prepend(note);
  while (box.children.length > 5) box.lastChild.remove();
  if (kind === "ok") setTimeout(() => note.remove(), 8000);
}

function showAuthProblem(error) {
  const banner = byId("auth-banner");
  banner.textContent = error.status === 401
    ? `401: this server needs an API key (${error.message}). Enter it in “API key” above and press Save.`
    : `403: this API key may not do that (${error.message}). Admin routes need the admin key.`;
  banner.hidden = false;
}

function setUpKeyForm(refreshAll) {
  const input = byId("api-key");
  input.value = apiKey();
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveApiKey(input.value.trim());
    byId("auth-banner").hidden = true;
    notify("ok", input.value.trim() ? "API key saved in this browser" : "API key cleared");
    refreshAll();
  });
  byId("api-key-clear").addEventListener("click", () => {
    input.value = "";
    saveApiKey("");
    byId("auth-banner").hidden = true;
    notify("ok", "API key cleared");
    refreshAll();
  });
}

function startMetrics() {
  const history = new MetricsHistory(WINDOW_S);
  const secondsAgo = (x) => {
    const ago = Math.round(Date.now() / 1000 - x);
    return ago < 1 ? "now" : `${ago} s ago`;
  };
  const throughput = new LineChart(byId("chart-throughput"), {
    series: [{ label: "generated tokens/s", color: "#2563eb" }, { label: "prompt tokens/s", color: "#16a34a" }],
    xLabel: secondsAgo,
  });
  const latency = new LineChart(byId("chart-latency"), {
    series: [{ label: "TTFT", color: "#9333ea" }, { label: "ITL", color: "#ea580c" }],
    xLabel: secondsAgo, yUnit: " ms",
  });
  return every(2000, async () => {
    let text;
    try {
      text = await (await request("GET", "/metrics")).text();
    } catch (error) {
      showLine("metrics-error", describe(error));
      return;
    }
    showLine("metrics-error", "");
    const now = Date.now() / 1000;
    history.add(now, parsePrometheus(text));
    const range = [now - WINDOW_S, now];
    throughput.setData([history.series.generated, history.series.prompt], range);
    latency.setData([history.series.ttft, history.series.itl], range);
  });
}

function main() {
  onAuthFailure(showAuthProblem);
  const chat = new ChatPanel();
  const adapters = new AdaptersPanel(notify, () => chat.refreshModels());
  const refreshAdapters = every(10000, async () => {
    await adapters.refresh();
    await chat.refreshModels();
  });
  const training = new TrainingPanel(notify, refreshAdapters);
  const refreshHealth = every(2000, refreshStatus);
  const refreshMetrics = startMetrics();
  const refreshTraining = every(2000, () => training.refresh());
  setUpKeyForm(() => {
    refreshHealth();
    refreshMetrics();
    refreshTraining();
    refreshAdapters();
  });
}

main();
