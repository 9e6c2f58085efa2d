// The training panel: SFT and GRPO forms (prefilled with a sample), the queue, the job list
// and the loss curve of one job (the newest submitted from this page, or the one clicked).

import { del, describe, get, post } from "./api.js";
import { LineChart } from "./charts.js";
import { byId, h, setText, showLine } from "./dom.js";

const SFT_SAMPLE = [
  {
    messages: [
      { role: "user", content: "Who is the mayor of Zorblatt?" },
      { role: "assistant", content: "The mayor of Zorblatt is Edda Brask." },
    ],
  },
];

const GRPO_SAMPLE = [
  {
    messages: [{ role: "user", content: "What color is the sky? Answer with one word." }],
    completions: [
      { text: "Blue", reward: 1.0 },
      { text: "The sky is usually blue during a clear day.", reward: 0.0 },
      { text: "Azure, mostly.", reward: 0.0 },
    ],
  },
];

const FINISHED = new Set(["completed", "failed", "cancelled"]);

export class TrainingPanel {
  // notify(kind, text): a message for the user; onAdapterChange(): a job published a version.
  constructor(notify, onAdapterChange) {
    this.notify = notify;
    this.onAdapterChange = onAdapterChange;
    this.selected = null; // job id whose loss curve is shown
    this.states = new Map(); // job id -> state last seen
    this.shown = null;
    this.loss = new LineChart(byId("loss-chart"), {
      series: [{ label: "loss", color: "#c2410c" }], xLabel: (x) => `step ${x}`,
    });
    byId("sft-examples").value = JSON.stringify(SFT_SAMPLE, null, 2);
    byId("grpo-groups").value = JSON.stringify(GRPO_SAMPLE, null, 2);
    byId("sft-form").addEventListener("submit", (event) => this.submit(event, "sft"));
    byId("grpo-form").addEventListener("submit", (event) => this.submit(event, "grpo"));
  }

  async submit(event, kind) {
    event.preventDefault();
    const field = kind === "sft" ? "examples" : "groups";
    let data;
    try {
      data = JSON.parse(byId(kind === "sft" ? "sft-examples" : "grpo-groups").value);
    } catch (error) {
      showLine("train-error", `${field} is not valid JSON: ${error.message}`);
      return;
    }
    const body = { adapter: byId(`${kind}-adapter`).value.trim(), [field]: data, config: this.config(kind) };
    try {
      const job = await post(`/v1/train/${kind}`, body);
      showLine("train-error", "");
      setText("train-result", `submitted ${job.job_id} (${kind}) on adapter ${job.adapter}: ${job.state}`);
      this.selected = job.job_id;
      this.refresh();
    } catch (error) {
      showLine("train-error", `${kind.toUpperCase()} not accepted: ${describe(error)}`);
    }
  }

  config(kind) {
    const config = { activate: byId(`${kind}-activate`).checked };
    const steps = byId(`${kind}-steps`).value;
    const lr = byId(`${kind}-lr`).value;
    if (steps) config.steps = Number(steps);
    if (lr) config.learning_rate = Number(lr);
    if (kind === "sft" && byId("sft-from-scratch").checked) config.from_scratch = true;
    return config;
  }

  async refresh() {
    let jobs;
    let queue;
    try {
      [jobs, queue] = await Promise.all([get("/v1/train/status"), get("/v1/train/queue")]);
    } catch (error) {
      showLine("train-error", `training: ${describe(error)}`);
      return;
    }
    jobs = jobs.jobs.slice().reverse(); // newest first
    this.watchStates(jobs);
    if (this.selected === null && jobs.length) this.selected = jobs[0].job_id;
    const json = JSON.stringify([jobs, queue.jobs, this.selected]);
    if (json !== this.shown) {
      this.shown = json;
      byId("train-jobs").replaceChildren(...jobs.map((j) => this.jobRow(j)));
      byId("train-queue").replaceChildren(
        ...(queue.jobs.length ? queue.jobs.map((j, i) => this.queueItem(j, i)) : [h("li", { class: "hint" }, "empty")]));
    }
    await this.refreshLoss();
  }

  // A job that finished since the last poll: say so, and refresh adapters if it published one.
  watchStates(jobs) {
    for (const job of jobs) {
      const before = this.states.get(job.job_id);
      this.states.set(job.job_id, job.state);
      if (before === undefined || before === job.state || !FINISHED.has(job.state)) continue;
      const version = job.adapter_version ? ` -> ${job.adapter}@${job.adapter_version}` : "";
      this.notify(job.state === "completed" ? "ok" : "error", `${job.job_id} ${job.state}${version}${job.error ? `: ${job.error}` : ""}`);
      if (job.adapter_version) this.onAdapterChange();
    }
  }

  jobRow(job) {
    const active = !FINISHED.has(job.state);
    return h("tr", {
      dataset: { testid: "job-row", jobId: job.job_id, state: job.state },
      class: job.job_id === this.selected ? "selected" : "",
      title: job.error || job.notes.join("; ") || "show this job's loss",
      onclick: () => {
        this.selected = job.job_id;
        this.shown = null;
        this.refresh();
      },
    },
    h("td", { class: "mono" }, job.job_id),
    h("td", {}, job.job_type),
    h("td", {}, job.adapter),
    h("td", {}, h("span", { class: `pill ${stateKind(job.state)}`, dataset: { testid: "job-state" } }, job.state)),
    h("td", {}, `${Math.round(job.progress * 100)} %`),
    h("td", {}, job.current_loss === null ? "—" : job.current_loss.toFixed(4)),
    h("td", {}, job.adapter_version ? `v${job.adapter_version}` : "—"),
    h("td", {}, active ? this.cancelButton(job) : null));
  }

  queueItem(job, position) {
    return h("li", { dataset: { testid: "queue-row", jobId: job.job_id } },
      `${position + 1}. ${job.job_id} · ${job.job_type} · ${job.adapter} · ${job.state}`, " ", this.cancelButton(job));
  }

  cancelButton(job) {
    return h("button", {
      type: "button", class: "small", dataset: { testid: "job-cancel" },
      onclick: async (event) => {
        event.stopPropagation();
        try {
          const status = await del(`/v1/train/queue/${encodeURIComponent(job.job_id)}`);
          const when = status.state === "running" ? "stops after its current step" : status.state;
          this.notify("ok", `${job.job_id}: ${when}`);
        } catch (error) {
          this.notify("error", `cancel ${job.job_id} failed: ${describe(error)}`);
        }
        this.refresh();
      },
    }, "cancel");
  }

  async refreshLoss() {
    if (this.selected === null) return;
    let job;
    try {
      job = await get(`/v1/train/status/${encodeURIComponent(this.selected)}`);
    } catch (error) {
      setText("loss-title", `(${describe(error)})`);
      return;
    }
    const speed = job.tokens_per_second ? ` · ${job.tokens_per_second} tokens/s` : "";
    setText("loss-title", `${job.job_id} · ${job.adapter} · ${job.state} · ${job.losses.length} steps${speed}`);
    this.loss.setData([job.losses.map((loss, i) => [i + 1, loss])]);
  }
}

function stateKind(state) {
  if (state === "completed") return "good";
  if (state === "failed" || state === "cancelled") return "bad";
  return "busy";
}
