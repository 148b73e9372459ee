// The five panels, each rendered from the state app.js keeps. Pure DOM building.

import { lineChart } from "./charts.js";
import { badge, el, fmtAge, fmtMs, fmtPct, fmtRate, timeEl, tracebackEl } from "./util.js";

const SPAN_S = 300; // the charts show the last five minutes

const STATUS = {
  serving: ["✓", "serving", "ok"],
  degraded: ["▲", "degraded", "warn"],
  failed: ["✖", "failed", "bad"],
  disabled: ["○", "disabled", "muted"],
};

function shortVersion(version) {
  if (!version) return "—";
  const at = version.indexOf("@");
  return at < 0 ? version : version.slice(at + 1);
}

function lastErrorEl(name, last, fallback) {
  if (!last) {
    return fallback ? el("span", { class: "error-text bad", text: `✖ ${fallback}` }) : el("span", { class: "muted", text: "none" });
  }
  const full = `✖ ${last.error_type}: ${last.error}`;
  // Long errors keep both ends (the exception is at the end); all of it when opened.
  const head = full.length > 110 ? `${full.slice(0, 40)}…${full.slice(-69)}` : full;
  const details = el(
    "details",
    { "data-key": `tb-${name}` },
    el("summary", { "data-key": `tb-${name}` }, el("span", { class: "error-text bad", text: head }), " ", timeEl(last.at)),
    el("p", { class: "muted", text: `${last.event}${last.version ? ` · ${last.version}` : ""}` }),
    full !== head ? el("p", { class: "error-text", text: full }) : null,
    last.traceback ? tracebackEl(last.traceback) : el("p", { class: "muted", text: "no traceback" }),
  );
  return details;
}

export function renderPlugins(body, functions, stats, rolloutsByName) {
  const names = new Set([...(functions || []).map((f) => f.name), ...Object.keys(stats?.plugins || {})]);
  const byName = Object.fromEntries((functions || []).map((f) => [f.name, f]));
  const rows = [];
  for (const name of [...names].sort()) {
    const info = byName[name] || { name, status: "failed" };
    const s = stats?.plugins?.[name] || {};
    const [icon, word, kind] = STATUS[info.status] || ["?", info.status || "unknown", "muted"];
    const series = s.series || { t: [], calls_per_s: [], p99_ms: [] };
    const rollout = rolloutsByName[name];
    rows.push(
      el(
        "tr",
        { "data-plugin": name },
        el("th", { scope: "row", class: "mono", text: name }),
        el(
          "td",
          { "data-label": "Version" },
          el("span", { class: "mono version", title: info.version || "", text: shortVersion(info.version) }),
          info.loaded_at ? el("span", { class: "muted" }, " · ", timeEl(info.loaded_at)) : null,
          rollout ? el("div", { class: "warn" }, `⇄ ${rollout.mode} ${shortVersion(rollout.version)} ${rollout.weight} %`) : null,
        ),
        el("td", { class: "status", "data-label": "Status" }, badge(icon, word, kind, info.last_error || undefined)),
        el("td", { class: "num", "data-label": "Calls/s", text: fmtRate(s.calls_per_s) }),
        el("td", { class: "num", "data-label": "Errors", text: fmtPct(s.error_rate) }),
        el("td", { class: "num", "data-label": "p50", text: fmtMs(s.p50_ms) }),
        el("td", { class: "num", "data-label": "p99", text: fmtMs(s.p99_ms) }),
        el(
          "td",
          { "data-label": "Last 5 min" },
          el(
            "div",
            { class: "charts" },
            lineChart([{ t: series.t, v: series.calls_per_s, name: "calls/s" }], { label: `${name} calls/s`, unit: "/s", span: SPAN_S, now: Date.now() / 1000 }),
            lineChart([{ t: series.t, v: series.p99_ms, name: "p99" }], { label: `${name} p99`, unit: " ms", span: SPAN_S, now: Date.now() / 1000 }),
          ),
        ),
        el("td", { class: "last-error", "data-label": "Last error" }, lastErrorEl(name, s.last_error, info.last_error)),
      ),
    );
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 9, class: "muted", text: "No plugin yet: push one." })));
  return rows;
}

function heartbeatEl(host) {
  if (!host.alive) return badge("✖", `dead: no heartbeat for ${fmtAge(host.age_s)}`, "bad");
  if (host.late) return badge("⚠", `late: ${fmtAge(host.age_s)} ago`, "warn", `heartbeat every ${host.heartbeat_s} s`);
  return badge("♥", `${fmtAge(host.age_s)} ago`, "ok", `heartbeat every ${host.heartbeat_s} s`);
}

function fleetCell(host, name, plugin) {
  const served = host.plugins?.[name];
  const refused = host.refused?.[name];
  const latest = plugin?.revision;
  const servingRev = served?.revision ?? null;
  const parts = [];
  if (refused && (servingRev === null || servingRev < refused.revision) && (latest === null || latest === undefined || refused.revision >= latest)) {
    parts.push(badge("✖", `refused r${refused.revision}`, "bad", refused.error || ""));
    const error = `${refused.stage || "error"}: ${refused.error || ""}`;
    parts.push(el("div", { class: "error-text bad", title: error, text: error.length > 90 ? `${error.slice(0, 89)}…` : error }));
  }
  if (servingRev === null) parts.unshift(el("span", { class: "muted", text: "— none" }));
  else if (latest === null || latest === undefined || servingRev >= latest) parts.unshift(badge("✓", `r${servingRev}`, "ok", served.version));
  else parts.unshift(badge("↓", `behind: r${servingRev} (latest r${latest})`, "warn", served.version));
  const candidate = served?.candidate;
  if (candidate) parts.push(el("div", { class: "warn", text: `⇄ ${candidate.mode} ${shortVersion(candidate.version)} ${candidate.weight} %` }));
  return el("td", { "data-host": host.id, "data-plugin": name }, parts);
}

export function renderFleet(table, summary, fleet, error) {
  if (error) {
    summary.textContent = `✖ ${error}`;
    table.replaceChildren();
    return;
  }
  if (!fleet) return;
  const names = Object.keys(fleet.plugins || {}).sort();
  const hosts = fleet.hosts || [];
  const late = hosts.filter((h) => h.late).length;
  const converged = names.filter((n) => fleet.plugins[n].converged).length;
  summary.textContent = `${hosts.length} host${hosts.length === 1 ? "" : "s"}${late ? `, ⚠ ${late} late` : ""} · ${converged}/${names.length} plugins converged`;
  const head = el("tr", {}, el("th", { scope: "col", text: "Host" }), el("th", { scope: "col", text: "Heartbeat" }), names.map((n) => el("th", { scope: "col", class: "mono", text: n })));
  const rows = hosts.map((host) =>
    el(
      "tr",
      { "data-host": host.id },
      el("th", { scope: "row" }, el("div", { class: "mono", text: host.id }), el("div", { class: "muted", text: `${host.hostname}${host.pid ? ` pid ${host.pid}` : ""}` }), host.draining ? badge("⏻", "draining", "warn") : null),
      el("td", {}, heartbeatEl(host)),
      names.map((n) => fleetCell(host, n, fleet.plugins[n])),
    ),
  );
  if (!hosts.length) rows.push(el("tr", {}, el("td", { colspan: 2 + names.length, class: "muted", text: "No host reports (started with --no-report-status?)" })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

// The rollout view of GET /fleet (issue 16), read tolerantly: `rollout.version` or
// `rollout.candidate.version`.
export function rolloutsOf(fleet) {
  const out = {};
  for (const [name, plugin] of Object.entries(fleet?.plugins || {})) {
    const r = plugin.rollout;
    if (!r) continue;
    const candidate = r.candidate && typeof r.candidate === "object" ? r.candidate : {};
    out[name] = {
      version: r.version ?? candidate.version ?? null,
      revision: r.revision ?? candidate.revision ?? null,
      mode: r.mode ?? candidate.mode ?? "canary",
      weight: r.weight ?? candidate.weight ?? 0,
      policy: r.policy || null,
      stats: r.stats || null,
      stableVersion: r.stable?.version ?? r.stable_version ?? null,
    };
  }
  return out;
}

function statsTable(stats) {
  const columns = [
    ["Calls", (s) => s?.calls ?? "—"],
    ["Failures", (s) => s?.failures ?? "—"],
    ["Timeouts", (s) => s?.timeouts ?? "—"],
    ["Error rate", (s) => fmtPct(s?.error_rate)],
    ["p50", (s) => fmtMs(s?.p50_ms)],
    ["p99", (s) => fmtMs(s?.p99_ms)],
  ];
  const line = (label, s) => el("tr", {}, el("th", { scope: "row", text: label }), columns.map(([, f]) => el("td", { class: "num", text: String(f(s)) })));
  return el(
    "table",
    { class: "side-by-side" },
    el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "version" }), columns.map(([label]) => el("th", { scope: "col", class: "num", text: label })))),
    el("tbody", {}, line("stable", stats?.stable), line("candidate", stats?.candidate)),
  );
}

function weightBar(weight) {
  const fill = el("span");
  fill.style.width = `${Math.max(0, Math.min(100, weight))}%`; // CSSOM: allowed by the CSP
  return el("div", { class: "weightbar", role: "img", "aria-label": `${weight} % of calls to the candidate` }, fill);
}

function versionSeries(stats, name, version) {
  const v = stats?.plugins?.[name]?.versions?.[version];
  return v?.series || { t: [], calls_per_s: [], p99_ms: [] };
}

export function renderRollouts(container, fleet, stats, functions, onAction, lastResult) {
  const rollouts = rolloutsOf(fleet);
  const sections = [];
  const byName = Object.fromEntries((functions || []).map((f) => [f.name, f]));
  for (const [name, r] of Object.entries(rollouts).sort()) {
    const stable = r.stableVersion || byName[name]?.version;
    const now = Date.now() / 1000;
    const sv = versionSeries(stats, name, stable);
    const cv = versionSeries(stats, name, r.version);
    const label = `${name}: ${r.mode} ${shortVersion(r.version)} at ${r.weight} %`;
    const weightInput = el("input", { type: "number", min: 0, max: 100, step: "any", value: r.weight, id: `weight-${name}`, "data-key": `weight-${name}` });
    const result = lastResult[name];
    sections.push(
      el(
        "article",
        { class: "rollout", "data-rollout": name },
        el("h3", { class: "mono", text: label }),
        weightBar(r.weight),
        el("p", { class: "muted", text: `stable ${stable || "?"} · candidate ${r.version || "?"}${r.policy?.max_error_rate != null ? ` · abort above ${fmtPct(r.policy.max_error_rate)} errors` : ""}${r.policy?.max_p99_ms != null ? ` or p99 ${fmtMs(r.policy.max_p99_ms)}` : ""}` }),
        statsTable(r.stats),
        el(
          "div",
          { class: "charts" },
          lineChart([{ t: sv.t, v: sv.p99_ms, cls: "stable", name: "stable p99" }, { t: cv.t, v: cv.p99_ms, cls: "candidate", name: "candidate p99" }], { width: 200, height: 44, label: `${name} p99, stable vs candidate`, unit: " ms", span: SPAN_S, now }),
          lineChart([{ t: sv.t, v: sv.calls_per_s, cls: "stable", name: "stable calls/s" }, { t: cv.t, v: cv.calls_per_s, cls: "candidate", name: "candidate calls/s" }], { width: 200, height: 44, label: `${name} calls/s, stable vs candidate`, unit: "/s", span: SPAN_S, now }),
        ),
        el("p", { class: "legend" }, el("span", { class: "stable-key", text: "── stable" }), "  ", el("span", { class: "candidate-key", text: "- - candidate" }), " (this host, last 5 min)"),
        el(
          "div",
          { class: "actions" },
          el("button", { type: "button", "data-key": `promote-${name}`, onclick: () => onAction(name, "promote", r) }, "Promote"),
          el("button", { type: "button", class: "danger", "data-key": `abort-${name}`, onclick: () => onAction(name, "abort", r) }, "Abort"),
          el("label", { for: `weight-${name}` }, "Weight %"),
          weightInput,
          el("button", { type: "button", "data-key": `weight-btn-${name}`, onclick: () => onAction(name, "weight", r, Number(weightInput.value)) }, "Set weight"),
        ),
        el("p", { class: `result ${result?.ok ? "ok" : "bad"}`, role: "status", text: result?.text || "" }),
      ),
    );
  }
  const ended = [];
  for (const [name, plugin] of Object.entries(fleet?.plugins || {}).sort()) {
    const last = plugin.last_rollout;
    if (!last || rollouts[name]) continue;
    const icon = last.outcome === "promoted" ? "✓" : last.outcome === "aborted" ? "■" : "↷";
    ended.push(el("li", { "data-last-rollout": name }, badge(icon, `${name} ${last.version || `r${last.revision}`} ${last.outcome}`, last.outcome === "promoted" ? "ok" : "warn"), ` by ${last.by || "?"} `, timeEl(last.at), last.reason ? ` — ${last.reason}` : "", lastResult[name]?.text ? el("span", { class: lastResult[name].ok ? "ok" : "bad", text: ` (${lastResult[name].text})` }) : null));
  }
  if (!sections.length) sections.push(el("p", { class: "muted", text: fleet ? "No rollout running." : "Waiting for GET /fleet…" }));
  if (ended.length) sections.push(el("h3", { text: "Ended" }), el("ul", {}, ended));
  container.replaceChildren(...sections);
}

function triggerId(row) {
  return row.id ?? row._id ?? `${row.plugin}/${row.name}`;
}

export function renderTriggers(container, triggers, error) {
  if (error) {
    container.replaceChildren(el("p", { class: error.status === 501 ? "muted" : "bad", text: `${error.status === 501 ? "ℹ" : "✖"} ${error.message}` }));
    return;
  }
  if (!triggers) return;
  if (!triggers.length) {
    container.replaceChildren(el("p", { class: "muted", text: "No trigger declared." }));
    return;
  }
  const head = ["Trigger", "Owner", "Status", "Lag", "Events/s", "Processed", "Dead letters", "History lost", "Checkpoint"];
  const rows = triggers.map((t) => {
    const owner = t.owner
      ? t.owner_alive === false
        ? badge("✖", `${t.owner} (dead)`, "bad")
        : el("span", { class: "mono", text: t.owner })
      : badge("○", "none", "warn");
    const status = t.status === "running" ? badge("▶", "running", "ok") : t.status === "failed" ? badge("✖", "failed", "bad", t.error || "") : badge("⏸", t.status || "?", "warn", t.error || "");
    const gaps = t.history_lost || [];
    const lastGap = gaps[gaps.length - 1];
    return el(
      "tr",
      { "data-trigger": triggerId(t) },
      el("th", { scope: "row", class: "mono", text: triggerId(t) }),
      el("td", {}, owner),
      el("td", {}, status, t.error ? el("div", { class: "error-text bad", text: t.error }) : null),
      el("td", { class: "num lag", text: fmtMs(t.lag_ms) }),
      el("td", { class: "num", text: fmtRate(t.events_per_s) }),
      el("td", { class: "num", text: t.processed ?? "—" }),
      el("td", { class: "num" }, t.dead_letters ? badge("✉", String(t.dead_letters), "bad") : "0"),
      el("td", {}, gaps.length ? [badge("⚠", `${gaps.length} gap${gaps.length === 1 ? "" : "s"}`, "warn"), " last ", timeEl(lastGap.at)] : "none"),
      el("td", {}, timeEl(t.checkpoint_time)),
    );
  });
  container.replaceChildren(el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", { scope: "col", text: h })))), el("tbody", {}, rows)));
}

const EVENT_ICONS = [
  ["plugin.reload_failed", "✖", "bad"],
  ["plugin.rejected", "✖", "bad"],
  ["plugin.reloaded", "↻", "ok"],
  ["plugin.loaded", "↻", "ok"],
  ["plugin.unloaded", "○", "muted"],
  ["plugin.retired", "○", "muted"],
  ["rollout.aborted", "■", "bad"],
  ["rollout.auto_abort", "■", "bad"],
  ["rollout.promoted", "✓", "ok"],
  ["rollout.", "⇄", "warn"],
  ["trigger.history_lost", "⚠", "bad"],
  ["trigger.dead_lettered", "✉", "bad"],
  ["trigger.failed", "✖", "bad"],
  ["trigger.", "⚡", "muted"],
  ["call.", "✖", "bad"],
  ["note", "ℹ", "warn"],
];

function describe(name, f) {
  const v = (x) => shortVersion(x);
  switch (name) {
    case "plugin.loaded":
      return `${f.plugin} ${v(f.version)} loaded`;
    case "plugin.reloaded":
      return `${f.plugin} ${v(f.old_version)} → ${v(f.new_version)}${f.change_to_live_ms != null ? ` (${fmtMs(f.change_to_live_ms)} change to live)` : ""}`;
    case "plugin.reload_failed":
      return `${f.plugin} r${f.revision} refused at ${f.stage}: ${f.error}${f.serving ? ` — ${v(f.serving)} still serving` : ""}`;
    case "plugin.rejected":
      return `${f.plugin ?? f._id} rejected (${f.field}): ${f.error ?? f.reason}`;
    case "rollout.aborted":
    case "rollout.auto_abort":
    case "rollout.promoted":
      return `${f.plugin} ${v(f.version ?? f.candidate)} ${name.split(".")[1].replace("_", " ")}${f.by ? ` by ${f.by}` : ""}${f.reason ? `: ${f.reason}` : ""}`;
    case "trigger.history_lost":
      return `${f.trigger ?? f.id} lost history ${f.from ?? "?"} → ${f.to ?? "?"} (policy ${f.policy})`;
    case "note":
      return f.note;
    default: {
      const keys = ["plugin", "trigger", "version", "weight", "error", "reason", "namespace"].filter((k) => f[k] !== undefined && f[k] !== null);
      return keys.map((k) => `${k}=${typeof f[k] === "object" ? JSON.stringify(f[k]) : f[k]}`).join(" ");
    }
  }
}

export function eventItem(name, data) {
  const fields = data.fields || data;
  const [, icon, kind] = EVENT_ICONS.find(([prefix]) => name === prefix || (prefix.endsWith(".") && name.startsWith(prefix))) || [null, "•", "muted"];
  return el(
    "li",
    { "data-event": name },
    timeEl(data.at || new Date().toISOString()),
    " ",
    el("span", { class: `name ${kind}` }, el("span", { "aria-hidden": "true", text: `${icon} ` }), name),
    " ",
    el("span", { text: describe(name, fields) || "" }),
  );
}
