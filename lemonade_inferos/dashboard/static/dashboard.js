// The Infer-OS dashboard: polls the control API's JSON endpoints and draws what they report.
// Every number on the page is read from /v1/metrics, /v1/policy or /v1/history; nothing is computed here
// but unit conversions. `window.inferosDashboard` exposes the last documents and the chart data (the
// browser test compares them with the endpoints).
"use strict";

const POLL_MS = 2000;
const MAX_POINTS = 1800;          // one hour at the poll period
const HISTORY_SNAPSHOTS = 360;    // snapshots read back on load (the controller keeps one per history_period_s)
const MiB = 1024 * 1024;

const path = (obj, keys) => keys.split(".").reduce((v, k) => (v == null ? undefined : v[k]), obj);
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

// -- what the tiles show ------------------------------------------------------------------------------------
const KPIS = [
  {id: "tps", label: "Decode speed", unit: "tok/s", get: (d) => num(path(d, "throughput.decode_tokens_per_second")), digits: 1,
   note: (d) => `${fmt(num(path(d, "throughput.tokens_per_second")), 1)} tok/s over the window, idle included`},
  {id: "ttft_mean", label: "TTFT mean", unit: "ms", get: (d) => num(path(d, "first_token_latency.mean_ms")), digits: 0},
  {id: "ttft_p95", label: "TTFT p95", unit: "ms", get: (d) => num(path(d, "first_token_latency.p95_ms")), digits: 0},
  {id: "latency_mean", label: "Latency mean", unit: "ms", get: (d) => num(path(d, "latency.mean_ms")), digits: 0},
  {id: "latency_p95", label: "Latency p95", unit: "ms", get: (d) => num(path(d, "latency.p95_ms")), digits: 0},
  {id: "rss_mb", label: "RSS", unit: "MiB", get: (d) => num(path(d, "memory.rss_mb")), digits: 0},
  {id: "kv_live_mb", label: "KV live", unit: "MiB", get: (d) => num(path(d, "memory.kv_live_mb")), digits: 2},
  {id: "kv_at_rest_mb", label: "KV at rest", unit: "MiB", get: (d) => num(path(d, "memory.kv_at_rest_mb")), digits: 2},
  {id: "prefix_hit_rate", label: "Prefix hit rate", unit: "%", get: (d) => pct(path(d, "prefix_cache.hit_rate")), digits: 1},
  {id: "delta_ppl", label: "ΔPPL estimate", unit: "", get: (d) => num(path(d, "quality.delta_ppl_est.delta")), digits: 3,
   note: (d) => `guard limit ${fmt(num(path(d, "quality.max_delta_ppl")), 2)}`},
  {id: "accept_rate", label: "Accept rate", unit: "%", get: (d) => pct(path(d, "quality.accept_rate.current")), digits: 1,
   note: (d) => `${path(d, "totals.drafted_tokens") ?? 0} drafted`},
  {id: "requests", label: "Requests", unit: "", get: (d) => num(path(d, "totals.requests")), digits: 0,
   note: (d) => `${path(d, "totals.errors") ?? 0} errors`},
];

function pct(v) { return num(v) == null ? null : v * 100; }

function fmt(v, digits) {
  if (v == null) return "—";
  return v.toLocaleString("en-US", {minimumFractionDigits: digits, maximumFractionDigits: digits});
}

// -- what the charts show (x: unix seconds) -----------------------------------------------------------------
const CHARTS = [
  {id: "chart-tps", title: "Throughput", unit: "tok/s", series: [
    {label: "decoding", get: (d) => num(path(d, "throughput.decode_tokens_per_second")), stroke: "#2563eb"},
    {label: "over the window", get: (d) => num(path(d, "throughput.tokens_per_second")), stroke: "#93c5fd"}]},
  {id: "chart-latency", title: "Latency", unit: "ms", series: [
    {label: "TTFT mean", get: (d) => num(path(d, "first_token_latency.mean_ms")), stroke: "#16a34a"},
    {label: "TTFT p95", get: (d) => num(path(d, "first_token_latency.p95_ms")), stroke: "#86efac"},
    {label: "request mean", get: (d) => num(path(d, "latency.mean_ms")), stroke: "#9333ea"},
    {label: "request p95", get: (d) => num(path(d, "latency.p95_ms")), stroke: "#d8b4fe"}]},
  {id: "chart-memory", title: "Memory: RSS (left) and KV (right)", unit: "MiB", right: "kv", series: [
    {label: "RSS", get: (d) => num(path(d, "memory.rss_mb")), stroke: "#ea580c"},
    {label: "KV live", get: (d) => num(path(d, "memory.kv_live_mb")), stroke: "#0891b2", scale: "kv"},
    {label: "KV at rest", get: (d) => num(path(d, "memory.kv_at_rest_mb")), stroke: "#64748b", scale: "kv"}]},
  {id: "chart-kv-tiers", title: "KV at rest by tier", unit: "MiB", series: [
    {label: "L0 (model dtype)", get: (d) => mib(path(d, "memory.kv_bytes_by_tier.L0")), stroke: "#dc2626"},
    {label: "L1 INT8", get: (d) => mib(path(d, "memory.kv_bytes_by_tier.L1_int8")), stroke: "#2563eb"},
    {label: "L2 INT4", get: (d) => mib(path(d, "memory.kv_bytes_by_tier.L2_int4")), stroke: "#16a34a"},
    {label: "warm caches", get: (d) => mib(path(d, "prefix_cache.warm.bytes")), stroke: "#a16207"}]},
  {id: "chart-rates", title: "Hit and accept rates", unit: "%", series: [
    {label: "prefix hit rate", get: (d) => pct(path(d, "prefix_cache.hit_rate")), stroke: "#0d9488"},
    {label: "accept rate", get: (d) => pct(path(d, "quality.accept_rate.current")), stroke: "#c026d3"}]},
  {id: "chart-quality", title: "ΔPPL estimate and the guard's limit", unit: "ΔPPL", series: [
    {label: "ΔPPL", get: (d) => num(path(d, "quality.delta_ppl_est.delta")), stroke: "#b91c1c"},
    {label: "limit", get: (d) => num(path(d, "quality.max_delta_ppl")), stroke: "#f59e0b", dash: [6, 4]}]},
];

function mib(v) { return num(v) == null ? null : v / MiB; }

function timeOf(entry) {
  const t = entry.timestamp;
  if (typeof t === "number") return t;
  const parsed = Date.parse(t);
  return Number.isNaN(parsed) ? null : parsed / 1000;
}

// -- state ---------------------------------------------------------------------------------------------------
const state = {
  metrics: null, policy: null, events: [], polls: 0, errors: 0,
  points: [],                     // [{t, doc-derived values per chart series}]
  charts: {},                     // id -> uPlot
  token: sessionStorage.getItem("inferos-token") || "",
};
window.inferosDashboard = state;

async function getJSON(url, init) {
  const response = await fetch(url, {cache: "no-store", ...init});
  let body = null;
  try { body = await response.json(); } catch (_) { /* an empty or non-JSON answer */ }
  return {ok: response.ok, status: response.status, body};
}

function pointOf(t, doc) {
  const point = {t};
  for (const chart of CHARTS) chart.series.forEach((s, i) => { point[`${chart.id}:${i}`] = s.get(doc); });
  return point;
}

function addPoint(point) {
  if (point.t == null) return;
  const last = state.points[state.points.length - 1];
  if (last && point.t <= last.t) return;   // a snapshot older than what is drawn already
  state.points.push(point);
  if (state.points.length > MAX_POINTS) state.points.splice(0, state.points.length - MAX_POINTS);
}

function chartData(chart) {
  const xs = state.points.map((p) => p.t);
  return [xs, ...chart.series.map((_, i) => state.points.map((p) => p[`${chart.id}:${i}`]))];
}

// -- drawing -------------------------------------------------------------------------------------------------
function buildTiles() {
  const box = document.getElementById("kpis");
  for (const k of KPIS) {
    const tile = document.createElement("div");
    tile.className = "kpi";
    tile.id = `kpi-${k.id}`;
    tile.dataset.metric = k.id;
    const label = document.createElement("div"); label.className = "label"; label.textContent = k.label;
    const value = document.createElement("div"); value.className = "value";
    const note = document.createElement("div"); note.className = "note";
    tile.append(label, value, note);
    box.append(tile);
  }
}

function renderTiles(doc) {
  for (const k of KPIS) {
    const tile = document.getElementById(`kpi-${k.id}`);
    const v = k.get(doc);
    tile.dataset.value = v == null ? "" : String(v);
    tile.querySelector(".value").textContent = v == null ? "—" : `${fmt(v, k.digits)}${k.unit ? " " + k.unit : ""}`;
    tile.querySelector(".value").title = v == null ? "not measured yet" : "";
    tile.querySelector(".note").textContent = k.note ? k.note(doc) : "";
  }
  document.getElementById("policy-name").textContent =
    `policy ${path(doc, "optimization_status.current_policy") ?? "?"} v${path(doc, "optimization_status.policy_version") ?? "?"}` +
    (path(doc, "optimization_status.baseline_mode") ? " (baseline mode)" : "");
  const guard = path(doc, "quality.guard") || {};
  document.getElementById("guard-level").textContent = `guard ${guard.level ?? "?"}: ${guard.action ?? "?"}`;
  document.getElementById("toggle-baseline").textContent =
    path(doc, "optimization_status.baseline_mode") ? "Leave baseline mode" : "Baseline mode";
}

function drawEvents(u) {
  const ctx = u.ctx;
  const [lo, hi] = [u.scales.x.min, u.scales.x.max];
  ctx.save();
  ctx.strokeStyle = "rgba(220, 38, 38, 0.6)";
  ctx.fillStyle = "rgba(220, 38, 38, 0.9)";
  ctx.setLineDash([3, 3]);
  ctx.font = `${10 * devicePixelRatio}px sans-serif`;
  for (const e of state.events) {
    const t = timeOf(e);
    if (t == null || t < lo || t > hi) continue;
    const x = Math.round(u.valToPos(t, "x", true));
    ctx.beginPath();
    ctx.moveTo(x, u.bbox.top);
    ctx.lineTo(x, u.bbox.top + u.bbox.height);
    ctx.stroke();
    ctx.fillText(e.kind, x + 3 * devicePixelRatio, u.bbox.top + 10 * devicePixelRatio);
  }
  ctx.restore();
}

// Time-axis labels: one short line per tick (24-hour clock; seconds only when ticks are under a minute apart),
// the date under the first tick and where the day changes; TIME_LABEL_SPACE keeps ticks wider apart than the
// widest label ("23:59:59"), so labels never overlap at any span or chart width.
const TIME_LABEL_SPACE = 80;
const two = (n) => String(n).padStart(2, "0");
const dayOf = (d) => d.toLocaleDateString("en-US", {month: "short", day: "numeric"});

function timeLabels(u, splits, axisIdx, space, incr) {
  let lastDay = null;
  return splits.map((t) => {
    const d = new Date(t * 1000);
    const day = dayOf(d);
    const time = incr >= 86400 ? day
      : `${two(d.getHours())}:${two(d.getMinutes())}${incr < 60 ? `:${two(d.getSeconds())}` : ""}`;
    const label = incr < 86400 && day !== lastDay ? `${time}\n${day}` : time;
    lastDay = day;
    return label;
  });
}

function buildCharts() {
  const box = document.getElementById("charts");
  for (const chart of CHARTS) {
    const panel = document.createElement("div");
    panel.className = "chart";
    const title = document.createElement("h3"); title.textContent = `${chart.title} (${chart.unit})`;
    const holder = document.createElement("div"); holder.id = chart.id;
    panel.append(title, holder);
    box.append(panel);
    const opts = {
      width: Math.max(holder.clientWidth, 280), height: 170,
      scales: {x: {time: true}},
      series: [{}, ...chart.series.map((s) => ({label: s.label, stroke: s.stroke, width: 2, spanGaps: true,
                                                  dash: s.dash, scale: s.scale || "y",
                                                  value: (u, v) => fmt(v, 2)}))],
      axes: [{space: TIME_LABEL_SPACE, values: timeLabels}, {size: 56, scale: "y"}, ...(chart.right ? [{scale: chart.right, side: 1, size: 56, grid: {show: false}}] : [])],
      hooks: {draw: [drawEvents]},
    };
    state.charts[chart.id] = new uPlot(opts, chartData(chart), holder);
  }
  window.addEventListener("resize", () => {
    for (const chart of CHARTS) {
      const holder = document.getElementById(chart.id);
      state.charts[chart.id].setSize({width: Math.max(holder.clientWidth, 280), height: 170});
    }
  });
}

function redrawCharts() {
  for (const chart of CHARTS) state.charts[chart.id].setData(chartData(chart));
}

function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out[key] = v;
  }
  return out;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
}

function renderPolicy(doc) {
  const body = document.querySelector("#policy-table tbody");
  const overrides = Object.fromEntries((doc.overrides || []).map((o) => [o.field, o]));
  const rows = flatten(doc.effective);
  body.replaceChildren();
  for (const [field, value] of Object.entries(rows)) {
    const row = document.createElement("tr");
    const o = overrides[field];
    if (o) { row.className = "override"; row.dataset.field = field; }
    cell(row, field);
    cell(row, JSON.stringify(value));
    cell(row, o ? `${JSON.stringify(o.configured)} — ${o.source}: ${o.reason}` : "");
    body.append(row);
  }
}

function renderEvents() {
  const body = document.querySelector("#events-table tbody");
  body.replaceChildren();
  for (const e of [...state.events].reverse().slice(0, 50)) {
    const row = document.createElement("tr");
    const t = timeOf(e);
    cell(row, t == null ? "?" : new Date(t * 1000).toLocaleString());
    cell(row, e.kind);
    const {timestamp, kind, ...rest} = e;
    cell(row, JSON.stringify(rest), "detail");
    body.append(row);
  }
}

function setStatus(text, bad) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("bad", Boolean(bad));
}

// -- polling -------------------------------------------------------------------------------------------------
async function loadHistory() {
  const snapshots = await getJSON(`/v1/history?kind=snapshot&limit=${HISTORY_SNAPSHOTS}`);
  if (snapshots.ok) for (const s of snapshots.body.history) addPoint(pointOf(timeOf(s), s));
}

async function poll() {
  try {
    const [metrics, policy, events] = await Promise.all([
      getJSON("/v1/metrics"), getJSON("/v1/policy"), getJSON("/v1/history?events=true&limit=200")]);
    if (!metrics.ok) throw new Error(`/v1/metrics answered ${metrics.status}`);
    state.metrics = metrics.body;
    if (policy.ok) { state.policy = policy.body; renderPolicy(policy.body); }
    if (events.ok) { state.events = events.body.history; renderEvents(); }
    addPoint(pointOf(timeOf(metrics.body), metrics.body));
    renderTiles(metrics.body);
    redrawCharts();
    state.polls += 1;
    document.body.dataset.polls = String(state.polls);
    setStatus(`live · updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    state.errors += 1;
    setStatus(`cannot reach the control API (${err.message}); retrying`, true);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// -- changing the policy (needs the token) ---------------------------------------------------------------------
function showResult(text, bad) {
  const out = document.getElementById("policy-result");
  out.textContent = text;
  out.classList.toggle("bad", Boolean(bad));
}

async function post(url, body) {
  const token = document.getElementById("token").value.trim();
  if (!token) { showResult("enter the control token first: changes need it", true); return null; }
  state.token = token;
  sessionStorage.setItem("inferos-token", token);
  const answer = await getJSON(url, {method: "POST", body: JSON.stringify(body),
                                     headers: {"Content-Type": "application/json", "X-Inferos-Token": token}});
  if (!answer.ok) {
    const error = (answer.body && answer.body.error) || {};
    showResult(`${answer.status} ${error.code || ""}: ${error.message || "refused"}`, true);
    return null;
  }
  return answer.body;
}

async function applyPolicy(event) {
  event.preventDefault();
  let update;
  try { update = JSON.parse(document.getElementById("policy-update").value); }
  catch (err) { showResult(`the update is not JSON: ${err.message}`, true); return; }
  const answer = await post("/v1/policy", update);
  if (answer) showResult(`${answer.status}: policy version ${answer.version}`);
}

async function toggleBaseline() {
  const enable = !path(state.metrics, "optimization_status.baseline_mode");
  const answer = await post("/v1/baseline", {enable});
  if (answer) showResult(`baseline mode ${answer.baseline_mode ? "on" : "off"}`);
}

async function main() {
  document.getElementById("token").value = state.token;
  document.getElementById("policy-form").addEventListener("submit", applyPolicy);
  document.getElementById("toggle-baseline").addEventListener("click", toggleBaseline);
  buildTiles();
  await loadHistory();
  buildCharts();
  poll();
}

document.addEventListener("DOMContentLoaded", main);
