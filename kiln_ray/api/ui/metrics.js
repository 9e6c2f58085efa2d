// GET /metrics (Prometheus text) -> rates over each polling interval, kept for a window:
//
//   generated / prompt tokens per second   delta of kiln_*_tokens_total over delta t
//   mean TTFT / ITL in the interval        delta of a histogram's _sum over delta of its _count
//
// A counter that went down (the server restarted) gives no point for that interval.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

// text -> Map(sample name -> [{labels, value}])
export function parsePrometheus(text) {
  const samples = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = LINE.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(LABEL)) labels[key] = value;
    const raw = match[3];
    const value = raw === "+Inf" ? Infinity : raw === "-Inf" ? -Infinity : Number(raw);
    if (!samples.has(match[1])) samples.set(match[1], []);
    samples.get(match[1]).push({ labels, value });
  }
  return samples;
}

// The sum of a sample over all its label sets, or null when the server does not export it.
export function total(samples, name) {
  const found = samples.get(name);
  return found ? found.reduce((sum, s) => sum + s.value, 0) : null;
}

const COUNTERS = {
  generated: "kiln_generation_tokens_total",
  prompt: "kiln_prompt_tokens_total",
};
const HISTOGRAMS = {
  ttft: "kiln_time_to_first_token_seconds",
  itl: "kiln_inter_token_latency_seconds",
};

export class MetricsHistory {
  constructor(windowSeconds = 300) {
    this.windowSeconds = windowSeconds;
    this.previous = null; // {t, values}
    this.series = { generated: [], prompt: [], ttft: [], itl: [] };
  }

  // Add one scrape taken at `t` (seconds); returns this interval's figures.
  add(t, samples) {
    const values = {};
    for (const [key, name] of Object.entries(COUNTERS)) values[key] = total(samples, name);
    for (const [key, name] of Object.entries(HISTOGRAMS)) {
      values[`${key}Sum`] = total(samples, `${name}_sum`);
      values[`${key}Count`] = total(samples, `${name}_count`);
    }
    const previous = this.previous;
    this.previous = { t, values };
    if (!previous) return null;
    const dt = t - previous.t;
    const delta = (key) => {
      const now = values[key];
      const then = previous.values[key];
      return now === null || then === null || now < then ? null : now - then;
    };
    const rate = (key) => (delta(key) === null || dt <= 0 ? null : delta(key) / dt);
    const mean = (key) => {
      const count = delta(`${key}Count`);
      const sum = delta(`${key}Sum`);
      return count && sum !== null ? (sum / count) * 1000 : null; // ms
    };
    const point = { generated: rate("generated"), prompt: rate("prompt"), ttft: mean("ttft"), itl: mean("itl") };
    for (const [key, value] of Object.entries(point)) {
      this.series[key].push([t, value]);
      const cutoff = t - this.windowSeconds;
      while (this.series[key].length && this.series[key][0][0] < cutoff) this.series[key].shift();
    }
    return point;
  }
}
