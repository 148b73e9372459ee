// Hand-written inline SVG line charts (no library). Every chart has a text alternative.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function path(points, x, y) {
  let d = "";
  let pen = false;
  for (const [t, v] of points) {
    if (v === null || v === undefined || Number.isNaN(v)) {
      pen = false;
      continue;
    }
    d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
    pen = true;
  }
  return d;
}

// lines: [{t: [...seconds], v: [...values], cls: "line"|"stable"|"candidate", name}]
export function lineChart(lines, { width = 140, height = 30, label = "", unit = "", span = 300, now } = {}) {
  const end = now ?? Math.max(0, ...lines.flatMap((l) => l.t));
  const start = end - span;
  let max = 0;
  for (const line of lines) {
    line.t.forEach((t, i) => {
      const v = line.v[i];
      if (t >= start && v !== null && v !== undefined && v > max) max = v;
    });
  }
  max = max || 1;
  const pad = 2;
  const x = (t) => pad + ((t - start) / span) * (width - 2 * pad);
  const y = (v) => height - pad - (v / max) * (height - 2 * pad);
  const last = (line) => {
    for (let i = line.v.length - 1; i >= 0; i -= 1) if (line.v[i] !== null && line.v[i] !== undefined) return line.v[i];
    return null;
  };
  const summary = lines
    .map((l) => `${l.name || label}: ${last(l) === null ? "no data" : `${+last(l).toFixed(3)}${unit}`} now`)
    .join("; ");
  const root = svg("svg", {
    class: "chart",
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${label} over the last ${Math.round(span / 60)} minutes; ${summary}; peak ${+max.toFixed(3)}${unit}`,
  });
  const title = svg("title");
  title.textContent = `${label} (last ${Math.round(span / 60)} min, peak ${+max.toFixed(3)}${unit}): ${summary}`;
  root.append(title);
  root.append(svg("line", { class: "axis", x1: pad, y1: height - pad, x2: width - pad, y2: height - pad }));
  for (const line of lines) {
    const pts = line.t.map((t, i) => [t, line.v[i]]).filter(([t]) => t >= start);
    root.append(svg("path", { class: line.cls || "line", d: path(pts, x, y) }));
  }
  const peak = svg("text", { x: width - pad, y: 9, "text-anchor": "end" });
  peak.textContent = `${+max.toFixed(max >= 10 ? 0 : 2)}${unit}`;
  root.append(peak);
  return root;
}
