// meshserve dashboard: polls /v2/dashboard/state (one request per refresh) and draws it.
// No framework, no build step; every value goes into the page as text, never as HTML.
"use strict";

const FEED = "/v2/dashboard/state";
const REFRESH_MS = 2000;
const HISTORY = 150; // points kept for the plots (5 minutes at one refresh per 2 s)
const PAGE = 100;

const view = { q: "", state: "", sort: "name", order: "asc", offset: 0 };
const history = { used: [], capacity: [], loads: [], evictions: [] };
let last = null; // the previous feed, for per-refresh differences (loads, tokens/s)
let timer = null;
let seq = 0; // only the latest request draws and schedules the next

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("meshserve-token") || ""; }

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function ago(t, now) {
  if (!t) return "never";
  const s = Math.max(0, now - t);
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
  return (s / 86400).toFixed(1) + " d ago";
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function figures(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) { dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v)); }
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

// A line (or bar) plot on a canvas, sized for the device's pixel ratio.
function plot(canvas, lines, bars, label, fixedTop) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const all = [...lines, ...bars].flatMap((s) => s.values);
  const top = fixedTop || Math.max(1, ...all);
  // The plot fills its width from the first points on (at least 30 slots), then scrolls.
  const slots = Math.max(30, ...[...lines, ...bars].map((s) => s.values.length));
  const x = (i) => (i / (slots - 1)) * (w - 2) + 1;
  const y = (v) => h - 2 - (v / top) * (h - 12);
  g.strokeStyle = "#e3e6ec"; g.lineWidth = 1;
  g.beginPath(); g.moveTo(0, h - 1.5); g.lineTo(w, h - 1.5); g.stroke();
  bars.forEach((s, k) => {
    g.fillStyle = s.color;
    const bw = Math.max(1, (w / slots) / bars.length - 0.5);
    s.values.forEach((v, i) => { if (v > 0) g.fillRect(x(i) + k * bw, y(v), bw, h - 2 - y(v)); });
  });
  for (const s of lines) {
    g.strokeStyle = s.color; g.lineWidth = 1.5; g.beginPath();
    s.values.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
    g.stroke();
  }
  g.fillStyle = "#6b7280"; g.font = "10px system-ui, sans-serif";
  g.fillText(label ? label(top) : String(top), 4, 10);
}

function status(text, ok) {
  const s = $("status");
  s.textContent = text;
  s.className = "pill " + (ok ? "ok" : "bad");
}

function drawSummary(doc) {
  const c = doc.cache;
  $("server").textContent = `${doc.server.name} ${doc.server.version}` +
    (doc.server.workers > 1 ? ` · ${doc.server.workers} workers` : "") + (doc.fleet ? ` · pod ${doc.fleet.pod}` : "");
  $("updated").textContent = "updated " + new Date(doc.time * 1000).toLocaleTimeString();
  status(doc.ready ? "ready" : "not ready", doc.ready);
  const pct = c.capacity_bytes ? Math.min(100, (100 * c.used_bytes) / c.capacity_bytes) : 0;
  $("mem-bar").style.width = pct.toFixed(1) + "%";
  $("mem-text").textContent = c.capacity_bytes
    ? `${bytes(c.used_bytes)} of ${bytes(c.capacity_bytes)} (${pct.toFixed(0)}%)` : `${bytes(c.used_bytes)} (no limit)`;
  const lookups = c.hits + c.misses;
  figures($("cache-figures"), [
    ["hits", c.hits], ["misses", c.misses],
    ["hit ratio", lookups ? ((100 * c.hits) / lookups).toFixed(1) + "%" : "–"],
    ["loads", c.loads], ["load failures", c.load_failures], ["evictions", c.evictions],
  ]);
  const states = Object.entries(doc.states).sort().map(([k, v]) => ["· " + k, v]);
  figures($("model-figures"), [["registered", c.registered], ["resident", c.resident], ["by state", ""], ...states]);
  push(history.used, c.used_bytes);
  push(history.capacity, c.capacity_bytes);
  push(history.loads, last ? Math.max(0, c.loads - last.cache.loads) : 0);
  push(history.evictions, last ? Math.max(0, c.evictions - last.cache.evictions) : 0);
  // Scaled to what is used; the capacity line shows once it is within reach of the scale.
  const peak = Math.max(1, ...history.used) * 1.25;
  const capacity = c.capacity_bytes && c.capacity_bytes <= peak * 4 ? c.capacity_bytes : 0;
  $("cap-key").hidden = !capacity;
  plot($("mem-plot"), [
    ...(capacity ? [{ values: history.capacity, color: "#9ca3af" }] : []),
    { values: history.used, color: "#2563eb" },
  ], [], bytes, Math.max(peak, capacity * 1.05));
  plot($("churn-plot"), [], [
    { values: history.loads, color: "#16a34a" }, { values: history.evictions, color: "#dc2626" },
  ], (top) => top + " per refresh");
}

function drawFleet(doc) {
  const f = doc.fleet;
  $("fleet").hidden = !f;
  if (!f) return;
  const alive = f.pods.filter((p) => p.alive).length;
  $("fleet-summary").textContent = `${alive} of ${f.pods.length} pods alive · store ` +
    (f.store_connected ? "connected" : "unreachable");
  $("pods").replaceChildren(...f.pods.map((p) => {
    const state = !p.alive ? "unreachable" : p.shutting_down ? "shutting down" : "serving";
    const cls = !p.alive || p.shutting_down ? "bad" : "state-READY";
    return row([
      el("td", p.id + (p.self ? " (this pod)" : "")), el("td", state, cls), p.http, p.grpc, p.models, p.copies,
      p.capacity ? `${bytes(p.used)} / ${bytes(p.capacity)}` : bytes(p.used),
      p.oldest_lru ? ago(p.oldest_lru, doc.time) : "–", p.loading, p.rate.toFixed(1),
    ]);
  }));
}

function drawEngines(doc) {
  $("llm").hidden = !doc.llm.length;
  const before = new Map((last ? last.llm : []).map((e) => [e.model, e]));
  const dt = last ? Math.max(0.001, doc.time - last.time) : 0;
  $("engines").replaceChildren(...doc.llm.map((e) => {
    const prev = before.get(e.model);
    const rate = prev && dt ? Math.max(0, e.generation_tokens - prev.generation_tokens) / dt : 0;
    return row([e.model, e.running, e.waiting, rate.toFixed(1), e.generation_tokens, e.prompt_tokens,
      e.requests_finished, e.requests_rejected]);
  }));
}

function drawModels(doc) {
  const m = doc.models;
  const at = Object.fromEntries(m.columns.map((c, i) => [c, i]));
  $("models-summary").textContent = m.matched === m.total ? `${m.total}` : `${m.matched} of ${m.total}`;
  const end = Math.min(m.matched, m.offset + m.rows.length);
  $("page").textContent = m.matched ? `${m.offset + 1}–${end} of ${m.matched}` : "none";
  $("prev").disabled = m.offset === 0;
  $("next").disabled = end >= m.matched;
  $("rows").replaceChildren(...m.rows.map((r) => {
    const requests = r[at.requests];
    const ratio = requests ? ((100 * r[at.hits]) / requests).toFixed(0) + "%" : "–";
    return row([
      el("td", r[at.name]), r[at.version], el("td", r[at.state], "state-" + r[at.state]),
      el("td", bytes(r[at.size_bytes]), "num"), ago(r[at.last_used], doc.time), el("td", requests, "num"),
      el("td", ratio, "num"), el("td", r[at.failed_requests], "num"), r[at.copies].join(", "),
      el("td", r[at.reason], r[at.state] === "FAILED" ? "reason bad" : "reason muted"),
    ]);
  }));
  for (const th of document.querySelectorAll("th[data-sort]")) {
    const sorted = th.dataset.sort === view.sort;
    th.classList.toggle("sorted", sorted);
    th.classList.toggle("asc", sorted && view.order === "asc");
    th.classList.toggle("desc", sorted && view.order === "desc");
  }
}

async function refresh() {
  clearTimeout(timer);
  const mine = ++seq;
  const params = new URLSearchParams({ ...view, limit: PAGE });
  const headers = { accept: "application/json" };
  if (token()) headers.authorization = "Bearer " + token();
  try {
    const reply = await fetch(FEED + "?" + params, { headers, cache: "no-store" });
    if (mine !== seq) return;
    if (reply.status === 401) {
      $("login").hidden = false;
      $("main").hidden = true;
      $("login-error").textContent = token() ? "that token was refused" : "";
      status("token needed", false);
      return; // no polling until a token is given
    }
    if (!reply.ok) throw new Error(`${reply.status} ${(await reply.json()).error || ""}`);
    const doc = await reply.json();
    if (mine !== seq) return;
    $("login").hidden = true;
    $("main").hidden = false;
    drawSummary(doc);
    drawFleet(doc);
    drawEngines(doc);
    drawModels(doc);
    last = doc;
  } catch (e) {
    if (mine !== seq) return;
    status("unreachable: " + e.message, false);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function init() {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("meshserve-token", $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  let typing = null;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { view.q = $("search").value; view.offset = 0; refresh(); }, 200);
  });
  $("state").addEventListener("change", () => { view.state = $("state").value; view.offset = 0; refresh(); });
  $("prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - PAGE); refresh(); });
  $("next").addEventListener("click", () => { view.offset += PAGE; refresh(); });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      if (view.sort === key) view.order = view.order === "asc" ? "desc" : "asc";
      else { view.sort = key; view.order = key === "name" || key === "state" ? "asc" : "desc"; }
      view.offset = 0;
      refresh();
    });
  }
  refresh();
}

document.addEventListener("DOMContentLoaded", init);
