// The adapters panel: GET /v1/adapters as a table (versions, what is served), and load /
// unload / roll back / download / delete per adapter, upload and merge forms.

import { api, apiKey, del, describe, get, post, request } from "./api.js";
import { byId, formatTime, h, showLine } from "./dom.js";

export class AdaptersPanel {
  // notify(kind, text): a message for the user; onChange(): something about adapters changed.
  constructor(notify, onChange) {
    this.notify = notify;
    this.onChange = onChange;
    this.shown = null; // the listing last rendered, as JSON: re-render only on change
    byId("adapters-refresh").addEventListener("click", () => this.refresh());
    byId("upload-form").addEventListener("submit", (event) => this.upload(event));
    byId("merge-form").addEventListener("submit", (event) => this.merge(event));
  }

  async refresh() {
    let listing;
    try {
      listing = await get("/v1/adapters");
    } catch (error) {
      showLine("adapters-error", describe(error));
      return;
    }
    showLine("adapters-error", "");
    const json = JSON.stringify(listing);
    if (json === this.shown) return;
    this.shown = json;
    byId("adapter-list").replaceChildren(...listing.adapters.map((a) => this.row(a)));
    byId("adapters-empty").hidden = listing.adapters.length > 0;
  }

  row(a) {
    const versions = a.versions.map((v) => v.version);
    const picker = h("select", { dataset: { testid: "adapter-version" }, "aria-label": `version of ${a.name}` },
      versions.map((v) => h("option", { value: v, selected: v === a.current_version }, `v${v}`)));
    const action = (label, testid, run, done) =>
      h("button", { type: "button", class: "small", dataset: { testid }, onclick: () => this.act(`${label} ${a.name}`, run, done) }, label);
    const version = () => Number(picker.value);
    return h("tr", { dataset: { testid: "adapter-row", name: a.name } },
      h("td", {}, h("strong", {}, a.name), a.default ? h("span", { class: "pill good", dataset: { testid: "adapter-default" } }, "default") : null),
      h("td", { dataset: { testid: "adapter-serving" } },
        a.serving_version ? `v${a.serving_version}` : "not loaded",
        a.resident_versions.length > 1 ? h("div", { class: "hint" }, `resident: ${a.resident_versions.map((v) => `v${v}`).join(", ")}`) : null),
      h("td", { dataset: { testid: "adapter-versions" } }, a.versions.map((v) => downloadLink(a.name, v, v.version === a.current_version))),
      h("td", {}, picker,
        action("load", "adapter-load", () => post("/v1/adapters/load", { name: a.name, version: version() }),
          (r) => `${r.name} v${r.serving_version} is loaded`),
        action("roll back", "adapter-rollback", () => post(`/v1/adapters/${encodeURIComponent(a.name)}/rollback`, { version: version() }),
          (r) => `${r.name} serves v${r.current_version} again`)),
      h("td", { class: "actions" },
        action("unload", "adapter-unload", () => post("/v1/adapters/unload", { name: a.name }),
          (r) => `${r.name} unloaded (${r.unloaded_versions.map((v) => `v${v}`).join(", ") || "nothing was loaded"})`),
        action("delete", "adapter-delete", () => {
          if (!window.confirm(`Delete adapter ${a.name} and all its versions?`)) return null;
          return del(`/v1/adapters/${encodeURIComponent(a.name)}`);
        }, (r) => `${r.name} deleted`)));
  }

  // Run an adapter action (null: the user called it off), say what it did (`done(answer)`),
  // and refresh everything that shows adapters.
  async act(label, run, done) {
    try {
      const answer = await run();
      if (answer === null) return;
      this.notify("ok", done(answer));
    } catch (error) {
      this.notify("error", `${label} failed: ${describe(error)}`);
    }
    this.shown = null;
    await this.refresh();
    this.onChange();
  }

  async upload(event) {
    event.preventDefault();
    const file = byId("upload-file").files[0];
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("name", byId("upload-name").value.trim());
    form.append("activate", byId("upload-activate").checked ? "true" : "false");
    await this.act("upload", () => api("POST", "/v1/adapters/upload", { form }), (r) => `uploaded ${r.name} as v${r.version}`);
  }

  async merge(event) {
    event.preventDefault();
    let adapters;
    try {
      adapters = parseSources(byId("merge-sources").value);
    } catch (error) {
      this.notify("error", `merge: ${error.message}`);
      return;
    }
    const body = {
      name: byId("merge-name").value.trim(),
      method: byId("merge-method").value,
      density: Number(byId("merge-density").value),
      adapters,
    };
    await this.act("merge", () => post("/v1/adapters/merge", body), (r) => `merged into ${r.name} v${r.version} (${r.method})`);
  }
}

// "a:0.5, b@2:0.5" -> [{name: "a", version: null, weight: 0.5}, {name: "b", version: 2, weight: 0.5}]
export function parseSources(text) {
  const sources = text.split(",").map((s) => s.trim()).filter(Boolean).map((item) => {
    const match = /^([A-Za-z0-9._-]{1,64})(?:@([1-9][0-9]*))?(?::(-?[0-9.]+(?:e-?[0-9]+)?))?$/.exec(item);
    if (!match) throw new Error(`cannot read ${JSON.stringify(item)}: write name[@version][:weight]`);
    return { name: match[1], version: match[2] ? Number(match[2]) : null, weight: match[3] ? Number(match[3]) : 1.0 };
  });
  if (sources.length < 2) throw new Error("name at least two adapters to merge");
  return sources;
}

// A link to GET /v1/adapters/{name}/download?version=N. With an API key the browser cannot
// add the header to a plain link, so the click fetches the archive and saves the blob.
function downloadLink(name, v, current) {
  const path = `/v1/adapters/${encodeURIComponent(name)}/download?version=${v.version}`;
  const file = `${name}-v${v.version}.tar.gz`;
  const link = h("a", {
    href: path, download: file, class: current ? "version current" : "version",
    title: `v${v.version}, created ${formatTime(v.created_at)}${v.job_id ? ` by ${v.job_id}` : ""} — download (PEFT tar.gz)`,
    dataset: { testid: "adapter-download", version: v.version },
  }, `v${v.version}`);
  link.addEventListener("click", async (event) => {
    if (!apiKey()) return;
    event.preventDefault();
    try {
      const blob = await (await request("GET", path)).blob();
      const url = URL.createObjectURL(blob);
      h("a", { href: url, download: file }).click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (error) {
      showLine("adapters-error", `download failed: ${describe(error)}`);
    }
  });
  return link;
}
