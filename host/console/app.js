// The console: polls the JSON routes, follows GET /events, renders the panels.

import { follow, getToken, HttpError, request, setToken } from "./api.js";
import { eventItem, renderFleet, renderPlugins, renderRollouts, renderTriggers, rolloutsOf } from "./panels.js";

const $ = (id) => document.getElementById(id);
const MAX_EVENTS = 200;
const QUIET = new Set(["fleet.reported"]); // every heartbeat: not worth a line

const state = {
  functions: null,
  stats: null,
  fleet: null,
  fleetError: null,
  triggers: null,
  triggersError: null,
  results: {}, // per plugin: the last rollout action's outcome, shown under its buttons
  asked: false,
  needsToken: false, // the daemon requires a token (GET /console/config.json)
};

// No data request while the daemon wants a token and the tab has none: it would only 401.
function blocked() {
  return state.needsToken && !getToken();
}

function banner(text) {
  const node = $("banner");
  node.hidden = !text;
  node.textContent = text || "";
}

function unauthorized(err) {
  if (!(err instanceof HttpError) || err.status !== 401) return false;
  banner("✖ The daemon refused the request (401): it needs its auth token. Use “Set token”.");
  if (!state.asked && !getToken()) {
    state.asked = true;
    askToken();
  }
  return true;
}

// Re-rendering must not steal keyboard focus or close an open traceback.
function preserving(render) {
  const active = document.activeElement?.dataset?.key;
  const open = new Set([...document.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  const typed = document.activeElement?.tagName === "INPUT" ? document.activeElement.value : null;
  render();
  for (const d of document.querySelectorAll("details")) if (open.has(d.dataset.key)) d.open = true;
  if (active) {
    const again = document.querySelector(`[data-key="${CSS.escape(active)}"]`);
    if (again) {
      if (typed !== null && again.tagName === "INPUT") again.value = typed;
      again.focus();
    }
  }
}

function render() {
  updateTokenButton();
  preserving(() => {
    const rollouts = rolloutsOf(state.fleet);
    $("plugins-body").replaceChildren(...renderPlugins($("plugins-body"), state.functions, state.stats, rollouts));
    renderFleet($("fleet-table"), $("fleet-summary"), state.fleet, state.fleetError);
    renderRollouts($("rollouts-body"), state.fleet, state.stats, state.functions, action, state.results);
    renderTriggers($("triggers-body"), state.triggers, state.triggersError);
    if (state.fleet?.namespace) $("namespace").textContent = state.fleet.namespace;
  });
}

async function refreshPlugins() {
  if (blocked()) return;
  try {
    const [functions, stats] = await Promise.all([request("/functions"), request("/stats")]);
    state.functions = functions.functions;
    state.stats = stats;
    banner("");
  } catch (err) {
    if (!unauthorized(err)) banner(`✖ ${err.message}`);
  }
}

async function refreshFleet() {
  if (blocked()) return;
  try {
    state.fleet = await request("/fleet");
    state.fleetError = null;
  } catch (err) {
    if (!unauthorized(err)) state.fleetError = err.message;
  }
}

async function refreshTriggers() {
  if (blocked()) return;
  try {
    state.triggers = (await request("/triggers")).triggers;
    state.triggersError = null;
  } catch (err) {
    if (!unauthorized(err)) state.triggersError = err;
  }
}

let pending = null;
function soon(...jobs) {
  // Several events in a burst (a push reaching every host): one refresh.
  pending = pending || new Set();
  for (const job of jobs) pending.add(job);
  setTimeout(async () => {
    const todo = pending;
    pending = null;
    if (!todo) return;
    await Promise.all([...todo].map((job) => job()));
    render();
  }, 100);
}

function onEvent(name, data) {
  if (name.startsWith("plugin.") || name.startsWith("call.")) soon(refreshPlugins, refreshFleet);
  else if (name.startsWith("rollout.")) soon(refreshFleet, refreshPlugins);
  else if (name.startsWith("trigger.")) soon(refreshTriggers);
  else if (name === "fleet.reported") soon(refreshFleet);
  if (QUIET.has(name)) return;
  if (name.startsWith("call.") && !$("show-calls").checked) return;
  const list = $("events-list");
  list.prepend(eventItem(name, data));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
}

function confirmAction(text) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    $("confirm-ok").focus();
  });
}

async function action(name, kind, rollout, weight) {
  const candidate = rollout.version || `r${rollout.revision}`;
  const texts = {
    promote: `Promote ${candidate} of ${name}: it becomes the stable version on every host.`,
    abort: `Abort the rollout of ${candidate} of ${name}: every host goes back to the stable version.`,
    weight: `Send ${weight} % of ${name}'s calls to ${candidate}?`,
  };
  if (kind === "weight" && !(weight >= 0 && weight <= 100)) {
    state.results[name] = { ok: false, text: "✖ the weight must be a number from 0 to 100" };
    render();
    return;
  }
  if (!(await confirmAction(texts[kind]))) return;
  const body = kind === "weight" ? { action: kind, weight } : { action: kind };
  try {
    await request(`/functions/${encodeURIComponent(name)}/rollout`, { method: "POST", body });
    state.results[name] = { ok: true, text: `✓ ${kind === "weight" ? `weight set to ${weight} %` : `${kind} done`}` };
  } catch (err) {
    const why = err.status === 401 ? "the daemon wants its token: use “Set token”" : err.message;
    state.results[name] = { ok: false, text: `✖ refused (${err.status} ${err.type}): ${why}` };
  }
  await refreshFleet();
  render();
}

function askToken() {
  const dialog = $("token-dialog");
  $("token-input").value = "";
  dialog.returnValue = "";
  dialog.showModal();
  $("token-input").focus();
}

function setLive(up) {
  $("live").textContent = up ? "● live" : "○ reconnecting…";
  $("live").className = `live ${up ? "ok" : "warn"}`;
}

let stream = null;
function restartStream() {
  if (stream) stream.stop();
  stream = null;
  if (blocked()) return;
  stream = follow(onEvent, (up, err) => {
    setLive(up);
    if (err) unauthorized(err);
  });
}

function updateTokenButton() {
  $("token-button").textContent = getToken() ? "Change token" : "Set token";
}

async function refreshAll() {
  await Promise.all([refreshPlugins(), refreshFleet(), refreshTriggers()]);
  render();
}

function start() {
  $("token-button").addEventListener("click", askToken);
  $("token-dialog").addEventListener("close", () => {
    if ($("token-dialog").returnValue !== "save") return;
    setToken($("token-input").value.trim());
    updateTokenButton();
    restartStream();
    refreshAll();
  });
  // Enter submits a dialog's form with its one submit button; Cancel (and Escape) close it.
  for (const button of document.querySelectorAll("dialog button.cancel")) {
    button.addEventListener("click", () => button.closest("dialog").close("cancel"));
  }
  $("clear-events").addEventListener("click", () => $("events-list").replaceChildren());
  updateTokenButton();
  // Ask for the token before the first data request (no 401 to recover from).
  request("/console/config.json")
    .then((config) => {
      state.needsToken = Boolean(config.auth_required);
      if (blocked()) {
        state.asked = true;
        askToken(); // its close handler starts the refreshes and the stream
      }
    })
    .catch((err) => banner(`✖ ${err.message}`))
    .finally(() => {
      if (blocked()) return;
      refreshAll();
      restartStream();
    });
  setInterval(async () => {
    await refreshPlugins();
    render();
  }, 2000);
  setInterval(async () => {
    await Promise.all([refreshFleet(), refreshTriggers()]);
    render();
  }, 4000);
}

start();
