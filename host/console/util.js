// Small DOM and formatting helpers. Text always goes in through textContent (never
// innerHTML): plugin errors and names are untrusted.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A <time> in the viewer's zone, with the UTC time on hover.
export function timeEl(value, { date = false } = {}) {
  if (!value) return el("span", { class: "muted", text: "—" });
  const at = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(at.getTime())) return el("span", { text: String(value) });
  const shown = date ? at.toLocaleString() : at.toLocaleTimeString();
  const utc = at.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  return el("time", { datetime: at.toISOString(), title: utc, text: shown });
}

export function fmtRate(value) {
  if (value === null || value === undefined) return "—";
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

export function fmtMs(value) {
  if (value === null || value === undefined) return "—";
  if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
  if (value >= 10) return `${value.toFixed(0)} ms`;
  return `${value.toFixed(2)} ms`;
}

export function fmtPct(value) {
  if (value === null || value === undefined) return "—";
  return `${(value * 100).toFixed(value < 0.01 && value > 0 ? 2 : 1)} %`;
}

export function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// A status as icon + word (never colour alone); `kind` picks the colour class.
export function badge(icon, word, kind, title) {
  return el("span", { class: `badge ${kind}`, title }, el("span", { "aria-hidden": "true", text: `${icon} ` }), word);
}

// A traceback with the plugin's own lines (its `File "<plugin ...>"` frames and the source
// line under each) marked.
export function tracebackEl(text) {
  const pre = el("pre", { class: "tb" });
  let own = false;
  for (const line of String(text).replace(/\n$/, "").split("\n")) {
    const frame = /^\s*File "/.test(line);
    if (frame) own = line.includes('File "<plugin ');
    const mark = own && (frame || /^\s{4,}\S/.test(line));
    pre.append(el("span", { class: mark ? "own" : null, text: line }), "\n");
    if (!frame && !/^\s{4,}/.test(line)) own = false;
  }
  return pre;
}

export function replaceChildren(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}
