// The pages' own SVG charts (an ES module shared by the service's page at / and the on-device page of
// clients/web): a radar of the 19 scores grouped by family, a timeline of one dimension, and the dimensions'
// display names. No library: each chart is rebuilt from plain data whenever the results change.

// Display names of the families, by API key prefix (the dimensions themselves come from the model's metadata).
const FAMILIES = [
  [/^timing_/, "Timing"], [/^articulation_/, "Articulation"], [/^pedal_/, "Pedal"], [/^timbre_/, "Timbre"],
  [/^dynamics?_/, "Dynamics"], [/^music_making_/, "Music making"], [/^emotion_mood_/, "Emotion & mood"],
  [/^interpretation_/, "Interpretation"],
];

function familyOf(key) {
  for (const [re, name] of FAMILIES) if (re.test(key)) return { name, prefix: key.match(re)[0] };
  return { name: "Other", prefix: "" };
}

// "Music_Making_Fast_paced_Slow_paced" -> "Fast paced Slow paced": the label less its family's words.
function shortName(label, prefix) {
  const want = prefix.replace(/[^a-z]/g, ""), words = label.split("_");
  let seen = "";
  for (let i = 0; i < words.length && want; i++) {
    seen += words[i].toLowerCase().replace(/[^a-z]/g, "");
    if (seen === want) return words.slice(i + 1).join(" ");
  }
  return words.join(" ");
}

// [{label, key}] in model order -> [{key, label, family, name}]: what radar() and the score tables show.
export function describeDimensions(dimensions) {
  return dimensions.map(({ label, key }) => {
    const fam = familyOf(key);
    return { key, label, family: fam.name, name: shortName(label, fam.prefix) };
  });
}

// An analysis's timeline ({start_seconds, scores}) as one timeline() series, each point at its 3 s window's centre.
export function timelineSeries(id, analysis, key) {
  return { id, duration: analysis.duration_seconds,
    points: analysis.timeline.map((w) => ({ t: w.start_seconds + 1.5, v: w.scores[key] })) };
}

const NS = "http://www.w3.org/2000/svg";

function el(name, attrs, parent) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function text(parent, x, y, content, attrs) {
  const node = el("text", { x: x.toFixed(1), y: y.toFixed(1), ...attrs }, parent);
  node.textContent = content;
  return node;
}

function titled(node, content) {
  el("title", {}, node).textContent = content;
  return node;
}

const clamp01 = (v) => Math.min(1, Math.max(0, v));

// dims: [{key, name, family}] in model order (families contiguous); series: [{id, scores: {key: score}}].
export function radar(container, dims, series) {
  const W = 500, H = 430, cx = W / 2, cy = H / 2, R = 150;
  const n = dims.length;
  const angle = (i) => -Math.PI / 2 + (2 * Math.PI * i) / n;
  const at = (i, r) => [cx + r * Math.cos(angle(i)), cy + r * Math.sin(angle(i))];
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "radar-svg",
    "aria-label": "Radar chart of the 19 scores, grouped by family" });

  // Family sectors, alternately shaded, with the family's name outside.
  const groups = [];
  dims.forEach((d, i) => {
    const last = groups[groups.length - 1];
    if (last && last.family === d.family) last.end = i;
    else groups.push({ family: d.family, start: i, end: i });
  });
  groups.forEach((g, gi) => {
    const a0 = angle(g.start - 0.5), a1 = angle(g.end + 0.5);
    const large = a1 - a0 > Math.PI ? 1 : 0;
    const p0 = [cx + R * Math.cos(a0), cy + R * Math.sin(a0)], p1 = [cx + R * Math.cos(a1), cy + R * Math.sin(a1)];
    el("path", { d: `M${cx},${cy} L${p0[0].toFixed(1)},${p0[1].toFixed(1)} A${R},${R} 0 ${large} 1 `
      + `${p1[0].toFixed(1)},${p1[1].toFixed(1)} Z`, class: `sector s${gi % 2}` }, svg);
    const [lx, ly] = at((g.start + g.end) / 2, R + 34);
    const anchor = lx < cx - 20 ? "end" : lx > cx + 20 ? "start" : "middle";
    // Long names on two lines ("Emotion &" / "mood"), so they fit beside the chart on a phone.
    const words = g.family.split(" ");
    const cut = words.length > 1 && g.family.length > 8 ? words.length - 1 : words.length;
    const lines = [words.slice(0, cut).join(" "), words.slice(cut).join(" ")].filter(Boolean);
    const label = text(svg, lx, ly + 4 - 7 * (lines.length - 1), "",
      { class: "family-label", "text-anchor": anchor });
    lines.forEach((line, li) => {
      el("tspan", { x: lx.toFixed(1), dy: li ? "1.15em" : 0 }, label).textContent = line;
    });
  });

  // Rings: quarters, plus the two colour thresholds (0.5 and 0.7) drawn stronger.
  for (const r of [0.25, 0.5, 0.7, 0.75, 1]) {
    const cls = r === 0.5 || r === 0.7 ? "ring threshold" : "ring";
    el("circle", { cx, cy, r: (R * r).toFixed(1), class: cls }, svg);
  }
  for (const r of [0.5, 1]) {
    const [rx, ry] = at(0.5, R * r);
    text(svg, rx + 2, ry + 3, r.toFixed(1), { class: "ring-label" });
  }
  dims.forEach((d, i) => {
    const [x, y] = at(i, R);
    el("line", { x1: cx, y1: cy, x2: x.toFixed(1), y2: y.toFixed(1), class: "spoke" }, svg);
    const [nx, ny] = at(i, R + 13);
    titled(text(svg, nx, ny + 4, String(i + 1), { class: "axis-number", "text-anchor": "middle" }),
      `${i + 1}. ${d.family}: ${d.name}`);
  });

  for (const s of series) {
    const pts = dims.map((d, i) => at(i, R * clamp01(s.scores[d.key])));
    el("polygon", { points: pts.map((p) => p.map((v) => v.toFixed(1)).join(",")).join(" "),
      class: `series ${s.id}`, "data-series": s.id }, svg);
    pts.forEach((p, i) => titled(el("circle", { cx: p[0].toFixed(1), cy: p[1].toFixed(1), r: 2.5,
      class: `dot ${s.id}` }, svg), `${s.id.toUpperCase()} ${i + 1}. ${dims[i].name}: `
      + s.scores[dims[i].key].toFixed(3)));
  }
  container.replaceChildren(svg);
}

function niceStep(span, target) {
  const raw = span / target, mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

// series: [{id, duration, points: [{t, v}]}] (t in seconds, v in [0, 1]).
export function timeline(container, series, label) {
  // Drawn at the container's own width (not scaled), so the text stays legible from phone to desktop.
  const W = Math.max(280, Math.round(container.clientWidth || 600)), H = 220, L = 34, Rm = 12, T = 10, B = 30;
  const tMax = Math.max(1, ...series.map((s) => Math.max(s.duration, ...s.points.map((p) => p.t))));
  const x = (t) => L + ((W - L - Rm) * t) / tMax, y = (v) => T + (H - T - B) * (1 - clamp01(v));
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "timeline-svg",
    "aria-label": `Timeline of ${label}` });
  for (const v of [0, 0.25, 0.5, 0.7, 0.75, 1]) {
    const cls = v === 0.5 || v === 0.7 ? "grid threshold" : "grid";
    el("line", { x1: L, x2: W - Rm, y1: y(v).toFixed(1), y2: y(v).toFixed(1), class: cls }, svg);
    if (v !== 0.7 && v !== 0.25 && v !== 0.75) text(svg, L - 6, y(v) + 4, v.toFixed(1),
      { class: "tick", "text-anchor": "end" });
  }
  const step = niceStep(tMax, Math.max(3, Math.floor(W / 90)));
  for (let t = 0; t <= tMax + 1e-9; t += step) {
    el("line", { x1: x(t).toFixed(1), x2: x(t).toFixed(1), y1: H - B, y2: H - B + 4, class: "axis" }, svg);
    text(svg, x(t), H - B + 16, `${Math.round(t * 10) / 10} s`, { class: "tick", "text-anchor": "middle" });
  }
  el("line", { x1: L, x2: W - Rm, y1: H - B, y2: H - B, class: "axis" }, svg);
  for (const s of series) {
    const pts = s.points.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
    el("polyline", { points: pts, class: `line ${s.id}`, "data-series": s.id }, svg);
    for (const p of s.points) {
      const dot = el("circle", { cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 3.5, class: `dot ${s.id}`,
        "data-series": s.id, "data-value": p.v.toFixed(3) }, svg);
      titled(dot, `${s.id.toUpperCase()} at ${p.t.toFixed(1)} s: ${p.v.toFixed(3)}`);
    }
  }
  container.replaceChildren(svg);
}
