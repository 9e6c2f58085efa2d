// The server panel, from GET /health: model, dtype, device, the engine / trainer memory split,
// KV blocks, running / waiting requests.

import { byId, formatBytes, formatDuration, setText, showLine } from "./dom.js";
import { authHeaders, describe, errorFromBody } from "./api.js";

// /health answers 503 with the same body when the engine is down: show it rather than fail.
export async function refreshStatus() {
  let health;
  try {
    const response = await fetch("/health", { headers: authHeaders() });
    health = await response.json().catch(() => null);
    if (!health || !health.status) throw errorFromBody(response.status, health, `${response.status} ${response.statusText}`);
  } catch (error) {
    setPill("unreachable", "bad");
    showLine("status-error", describe(error));
    return null;
  }
  showLine("status-error", health.status === "ok" ? "" : `engine: ${health.error || health.status}`);
  renderStatus(health);
  return health;
}

function renderStatus(health) {
  setPill(health.status === "ok" ? "healthy" : health.status, health.status === "ok" ? "good" : "bad");
  setText("status-model", health.model ?? "—");
  setText("status-architecture", health.architecture ?? "—");
  setText("status-dtype", health.dtype ?? "—");
  setText("status-device", health.device ?? "—");
  setText("status-context", health.max_model_len ? `${health.max_model_len} tokens` : "—");
  const memory = health.memory || {};
  setText("status-memory-engine", memoryText(memory.engine));
  const trainer = memory.trainer;
  const shared = trainer && trainer.shared_weight_bytes ? ` · base weights shared: ${formatBytes(trainer.shared_weight_bytes)}` : "";
  setText("status-memory-trainer", trainer ? memoryText(trainer.now) + shared : health.training ? "in the engine's process" : "no trainer");
  const used = health.kv_blocks_used ?? 0;
  const all = health.kv_blocks_total ?? 0;
  setText("status-kv", all ? `${used} / ${all} (${((100 * used) / all).toFixed(1)} %)` : "—");
  byId("status-kv-bar").style.width = all ? `${(100 * used) / all}%` : "0";
  setText("status-requests", `${health.running ?? 0} running / ${health.waiting ?? 0} waiting`);
  const resident = (health.adapters_resident || []).map((a) => `${a.name}@${a.version}${a.current ? "" : " (draining)"}`);
  const adapters = [resident.length ? resident.join(", ") : "none"];
  if (health.default_adapter) adapters.push(`default: ${health.default_adapter}`);
  setText("status-adapters", adapters.join(" · "));
  setText("status-uptime", formatDuration(health.uptime_s));
}

// rss (resident) · uss (private) · pss (proportional: shared pages split between processes)
function memoryText(m) {
  if (!m || m.rss === undefined) return "—";
  return `rss ${formatBytes(m.rss)} · private ${formatBytes(m.uss)} · pss ${formatBytes(m.pss)}`;
}

function setPill(text, kind) {
  const pill = byId("health-state");
  pill.textContent = text;
  pill.className = `pill ${kind}`;
}
