// gpugate operators' console (GET /admin/ui). Reads the admin and service API once a
// second with the admin key of this tab's sessionStorage; keeps the last 10 minutes in
// memory for the chart; sets caps through PUT /admin/concurrency. No dependencies.
"use strict";

const KEY_ITEM = "gpugate.adminKey"; // sessionStorage: this tab only, never a URL or cookie
const PERIOD_MS = 1000;
const WINDOW_MS = 10 * 60 * 1000; // the chart's history
const MIN_SPAN_MS = 60 * 1000; // the chart spans what it has seen, from a minute to WINDOW_MS
const CALL_TIMEOUT_MS = 3000;
const GAP_MS = 3500; // samples further apart than this are not joined by a line
const TOP_KEYS = 10;
// Relative to /admin/ (the page is /admin/ui), so the console works behind a path prefix.
const API = { queue: "../v1/queue", status: "status", usage: "usage", concurrency: "concurrency" };
const DASH = "—";

const state = {
  samples: [], // {t, queue, running, rejected} for the chart, oldest first
  counts: null, // {t, counts} of the previous /admin/status read
  timer: 0,
  busy: false,
  again: false,
  lastGood: 0,
};

// ---- small helpers -------------------------------------------------------------------

const $ = (selector) => document.querySelector(selector);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-") || name.startsWith("aria-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  node.append(...children);
  return node;
}

const known = (v) => typeof v === "number" && Number.isFinite(v);
const int = (v) => (known(v) ? Math.round(v).toLocaleString("en-US") : DASH);
const text = (v) => (v === undefined || v === null || v === "" ? DASH : String(v));

function rate(v) {
  if (!known(v)) return DASH;
  return v === 0 || v >= 10 ? Math.round(v).toLocaleString("en-US") : v.toFixed(1);
}

function duration(seconds) {
  if (!known(seconds)) return DASH;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  return m < 60 ? `${m}m ${Math.floor(seconds % 60)}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}

function setField(name, value, raw) {
  for (const node of document.querySelectorAll(`[data-field="${name}"]`)) {
    node.textContent = value;
    node.dataset.value = known(raw) ? String(raw) : "";
  }
}

// The first of `sources` that has `name`: /v1/queue first, then /admin/status.
function pick(name, ...sources) {
  for (const s of sources) if (s && s[name] !== undefined && s[name] !== null) return s[name];
  return undefined;
}

// ---- calls ---------------------------------------------------------------------------

async function call(method, path, body) {
  const headers = { "X-Admin-Key": sessionStorage.getItem(KEY_ITEM) || "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
    });
  } catch (err) {
    return { ok: false, status: 0, data: null, error: err.name };
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  return { ok: response.ok, status: response.status, data };
}

// "Reading the status failed: 503 unavailable — Redis is unavailable; try again shortly."
function problem(what, r) {
  if (r.status === 0) return `${what}: the gateway did not answer (${r.error}).`;
  const code = (r.data && r.data.error) || "error";
  const message = r.data && r.data.message ? ` — ${r.data.message}` : "";
  const hint = r.status === 403 ? " Is this the right admin key?" : "";
  return `${what}: ${r.status} ${code}${message}${hint}`;
}

// ---- the refresh loop ----------------------------------------------------------------

function schedule(delayMs) {
  clearTimeout(state.timer);
  state.timer = setTimeout(tick, delayMs);
}

function refreshNow() {
  if (state.busy) state.again = true;
  else schedule(0);
}

async function tick() {
  if (state.busy) return;
  state.busy = true;
  const started = performance.now();
  try {
    await refresh();
  } finally {
    state.busy = false;
  }
  if (!sessionStorage.getItem(KEY_ITEM)) return;
  const wait = state.again ? 0 : PERIOD_MS - (performance.now() - started);
  state.again = false;
  schedule(Math.max(0, wait));
}

async function refresh() {
  const [queue, status, usage] = await Promise.all([
    call("GET", API.queue),
    call("GET", API.status),
    call("GET", API.usage),
  ]);
  if (!sessionStorage.getItem(KEY_ITEM)) return; // forgotten meanwhile
  const reads = { queue, status, usage };
  const refused = Object.keys(reads).find((name) => reads[name].status === 403);
  if (refused) {
    signOut(problem(`Reading the ${refused} failed`, reads[refused]));
    return;
  }
  showConsole();
  const now = Date.now();
  const q = queue.ok ? queue.data : null;
  const s = status.ok ? status.data : null;
  const problems = [];
  if (!q) problems.push(problem("Reading the queue (GET /v1/queue) failed", queue));
  if (!s) problems.push(problem("Reading the status (GET /admin/status) failed", status));
  const banner = $("#banner");
  banner.hidden = problems.length === 0;
  banner.textContent = problems.join("\n");
  document.body.classList.toggle("stale", !q && !s);
  if (q || s) state.lastGood = now;
  showUpdated(now);
  if (!q && !s) return;

  const rates = s ? rejectionRates(s.rejections, now) : null;
  const total = rates ? Object.values(rates).reduce((a, b) => a + b, 0) : undefined;
  renderTotals(q, s, total);
  renderBackends(pick("backends", q, s), q || s);
  if (s) {
    renderRejections(s.rejections, rates);
    renderWorkers(s.workers, now);
  }
  renderUsage(usage);
  addSample(now, pick("queue_depth", q, s), pick("running", q, s), total);
  drawChart();
}

function showUpdated(now) {
  const when = state.lastGood ? new Date(state.lastGood).toLocaleTimeString() : "never";
  const stale = now - state.lastGood > 3 * PERIOD_MS;
  $("#updated").textContent = stale ? `Last good read ${when} (stale)` : `Updated ${when}`;
}

// Rejections per second by reason, from the cumulative counters of two consecutive reads.
function rejectionRates(counts, now) {
  if (!counts || typeof counts !== "object") return null;
  const previous = state.counts;
  state.counts = { t: now, counts };
  if (!previous || now <= previous.t) return null;
  const seconds = (now - previous.t) / 1000;
  const rates = {};
  for (const [reason, count] of Object.entries(counts)) {
    const before = previous.counts[reason] ?? count;
    rates[reason] = count >= before ? (count - before) / seconds : 0; // a reset counts 0
  }
  return rates;
}

// ---- rendering -----------------------------------------------------------------------

function renderTotals(q, s, rejectedPerSecond) {
  const depth = pick("queue_depth", q, s);
  const max = pick("max_queue_depth", q, s);
  setField("running", int(pick("running", q, s)), pick("running", q, s));
  setField("gpu_concurrency", int(pick("gpu_concurrency", q, s)), pick("gpu_concurrency", q, s));
  setField("queue_depth", int(depth), depth);
  setField("max_queue_depth", int(max), max);
  for (const name of ["batch_running", "batch_queued"]) setField(name, int(pick(name, q, s)), pick(name, q, s));
  const wait = pick("estimated_wait_seconds", q, s);
  setField("estimated_wait_seconds", duration(wait), wait);
  setField("rejections_per_second", rate(rejectedPerSecond), rejectedPerSecond);
  const workers = s && Array.isArray(s.workers) ? s.workers.length : undefined;
  setField("workers", int(workers), workers);
  const fill = $("#queue-fill");
  fill.value = known(depth) && known(max) && max > 0 ? Math.min(1, depth / max) : 0;
  fill.classList.toggle("full", known(depth) && known(max) && depth >= max);
}

// One row per backend, kept across refreshes so that a cap being typed is not lost.
// Without `backends` (a gateway of one backend) one row stands for the whole fleet.
function renderBackends(backends, totals) {
  const list = Array.isArray(backends) && backends.length ? backends : [{ ...totals, name: null }];
  const body = $("#backends");
  const wanted = new Set(list.map((b) => b.name ?? ""));
  for (const row of [...body.rows]) if (!wanted.has(row.dataset.backend)) row.remove();
  for (const b of list) {
    const id = b.name ?? "";
    let row = [...body.rows].find((r) => r.dataset.backend === id);
    if (!row) body.append((row = backendRow(b.name)));
    // the kind, when not Ollama: an OpenAI-compatible server (llama.cpp, vLLM, ...)
    const kind = b.kind && b.kind !== "ollama" ? ` (${b.kind})` : "";
    // adaptive concurrency: the cap dispatch fills now, below the ceiling of the Cap column
    const adaptive = b.adaptive ? ` · adaptive: ${int(b.effective_concurrency)} running at most` : "";
    row.querySelector(".url").textContent =
      b.name === null ? "all workers" : text(b.url) + kind + adaptive;
    const health = row.querySelector(".health");
    health.textContent = b.healthy === true ? "healthy" : b.healthy === false ? "down" : DASH;
    health.className = `health ${b.healthy === true ? "ok" : b.healthy === false ? "down" : ""}`;
    row.querySelector("[data-cell=running]").textContent = int(b.running);
    row.querySelector("[data-cell=gpu_concurrency]").textContent = int(b.gpu_concurrency);
    const models = Array.isArray(b.loaded_models) ? b.loaded_models.join(", ") : "";
    row.querySelector("[data-cell=models]").textContent = models || DASH;
  }
}

function backendRow(name) {
  const label = name ?? "fleet";
  const input = el("input", {
    type: "number", min: 1, max: 1024, step: 1, required: true, placeholder: "new cap",
    "aria-label": `New cap for ${label}`,
  });
  const form = el("form", { class: "cap-form" }, input, el("button", { type: "submit" }, "Set"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setCap(name, Number(input.value), input);
  });
  return el("tr", { "data-backend": name ?? "" },
    el("td", {}, el("strong", {}, label), el("br"), el("span", { class: "url muted" })),
    el("td", {}, el("span", { class: "health" })),
    el("td", { class: "num strong", "data-cell": "running" }),
    el("td", { class: "num strong", "data-cell": "gpu_concurrency" }),
    el("td", { class: "models", "data-cell": "models" }),
    el("td", {}, form));
}

async function setCap(name, cap, input) {
  const who = name === null ? "the fleet" : `backend ${name}`;
  const body = name === null ? { gpu_concurrency: cap } : { gpu_concurrency: cap, backend: name };
  const r = await call("PUT", API.concurrency, body);
  if (r.status === 403) {
    signOut(problem(`Setting the cap of ${who} failed`, r));
    return;
  }
  const result = $("#cap-result");
  result.hidden = false;
  result.className = r.ok ? "ok" : "error";
  const set = r.data && known(r.data.gpu_concurrency) ? r.data.gpu_concurrency : cap;
  result.textContent = r.ok
    ? `Cap of ${who} set to ${set}.`
    : problem(`Setting the cap of ${who} failed`, r);
  if (r.ok) input.value = "";
  refreshNow();
}

function renderRejections(counts, rates) {
  const body = $("#rejections");
  const reasons = counts && typeof counts === "object" ? Object.keys(counts).sort() : [];
  body.replaceChildren(...reasons.map((reason) =>
    el("tr", { "data-reason": reason },
      el("td", {}, reason.replaceAll("_", " ")),
      el("td", { class: "num strong", "data-cell": "rate" }, rate(rates ? rates[reason] : null)),
      el("td", { class: "num", "data-cell": "total" }, int(counts[reason])))));
  if (!reasons.length) body.append(el("tr", {}, el("td", { colSpan: 3, class: "muted" }, DASH)));
}

function renderWorkers(workers, now) {
  const list = Array.isArray(workers) ? [...workers] : [];
  list.sort((a, b) => String(a.id).localeCompare(String(b.id)));
  $("#workers").replaceChildren(...list.map((w) => {
    const age = known(w.last_heartbeat) ? Math.max(0, now / 1000 - w.last_heartbeat) : undefined;
    const seen = known(age) ? `${age.toFixed(1)} s ago` : DASH;
    const at = known(age) ? new Date(w.last_heartbeat * 1000).toLocaleString() : "";
    return el("tr", { class: known(age) && age > 5 ? "late" : "" },
      el("td", { class: "mono" }, text(w.id)),
      el("td", {}, text(w.host)),
      el("td", { class: "num" }, text(w.pid)),
      el("td", { class: "num", title: at }, seen));
  }));
  if (!list.length) {
    const none = el("td", { colSpan: 4, class: "error" }, "No live worker: nothing will run.");
    $("#workers").append(el("tr", {}, none));
  }
}

function renderUsage(r) {
  const note = $("#usage-note");
  const body = $("#usage");
  const keys = r.ok && r.data && typeof r.data.keys === "object" ? r.data.keys : null;
  note.hidden = keys !== null;
  body.closest("table").hidden = keys === null;
  if (keys === null) {
    note.textContent = r.status === 404
      ? "This gateway has no usage counters (GET /admin/usage answered 404)."
      : problem("Reading the usage (GET /admin/usage) failed", r);
    body.replaceChildren();
    return;
  }
  const count = (v) => (known(v) ? v : 0);
  const tokens = (u) => count(u.input_tokens) + count(u.output_tokens);
  const top = Object.entries(keys).sort(([, a], [, b]) => tokens(b) - tokens(a)).slice(0, TOP_KEYS);
  body.replaceChildren(...top.map(([name, u]) =>
    el("tr", { "data-key": name },
      el("td", { class: "mono" }, name),
      el("td", { class: "num strong", "data-cell": "tokens" }, int(tokens(u))),
      el("td", { class: "num" }, int(u.input_tokens)),
      el("td", { class: "num" }, int(u.output_tokens)),
      el("td", { class: "num" }, int(u.requests)),
      el("td", { class: "num" }, known(u.gpu_seconds) ? u.gpu_seconds.toFixed(1) : DASH))));
  if (!top.length) {
    body.append(el("tr", {}, el("td", { colSpan: 6, class: "muted" }, "No usage yet.")));
  }
}

// ---- the chart -----------------------------------------------------------------------

function addSample(t, queue, running, rejected) {
  state.samples.push({ t, queue, running, rejected });
  while (state.samples.length && state.samples[0].t < t - WINDOW_MS) state.samples.shift();
}

// The smallest "nice" top of an axis with four steps (1, 2, 5 × 10^k each) above `max`.
function axisTop(max, minStep) {
  const raw = Math.max(max / 4, minStep);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw - 1e-9);
  return step * 4;
}

function drawChart() {
  const canvas = $("#chart");
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const css = getComputedStyle(canvas);
  const color = (name) => css.getPropertyValue(name).trim();
  const pad = { left: 44, right: 48, top: 12, bottom: 26 };
  const now = Date.now();
  const samples = state.samples;
  const values = (name) => samples.map((s) => s[name]).filter(known);
  const jobsTop = axisTop(Math.max(0, ...values("queue"), ...values("running")), 1);
  const rejectedTop = axisTop(Math.max(0, ...values("rejected")), 0.25);
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, samples.length ? now - samples[0].t : 0));
  const x = (t) => pad.left + ((t - (now - span)) / span) * (w - pad.left - pad.right);
  const y = (v, top) => h - pad.bottom - (v / top) * (h - pad.top - pad.bottom);
  const label = (v) => String(Math.round(v * 100) / 100);

  ctx.clearRect(0, 0, w, h);
  ctx.font = `12px ${css.fontFamily}`;
  ctx.lineWidth = 1;
  ctx.strokeStyle = color("--grid");
  ctx.fillStyle = color("--muted");
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const yy = Math.round(y(i, 4)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(pad.left, yy);
    ctx.lineTo(w - pad.right, yy);
    ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(label((jobsTop * i) / 4), pad.left - 8, yy);
    ctx.textAlign = "left";
    ctx.fillText(label((rejectedTop * i) / 4), w - pad.right + 8, yy);
  }
  ctx.textBaseline = "top";
  ctx.textAlign = "center";
  const inSeconds = span <= 3 * MIN_SPAN_MS;
  const step = [10e3, 30e3, 60e3, 120e3].find((ms) => span / ms <= 6);
  for (let ago = 0; ago <= span + 1; ago += step) {
    const when = inSeconds ? `−${ago / 1000} s` : `−${ago / 60e3} min`;
    ctx.fillText(ago === 0 ? "now" : when, x(now - ago), h - pad.bottom + 8);
  }

  ctx.save();
  ctx.beginPath();
  ctx.rect(pad.left, 0, w - pad.left - pad.right, h);
  ctx.clip();
  line(ctx, samples, "queue", x, (v) => y(v, jobsTop), color("--c-queue"));
  line(ctx, samples, "running", x, (v) => y(v, jobsTop), color("--c-running"));
  line(ctx, samples, "rejected", x, (v) => y(v, rejectedTop), color("--c-rejected"));
  ctx.restore();
  canvas.dataset.samples = String(samples.length);
}

function line(ctx, samples, name, x, y, stroke) {
  ctx.strokeStyle = stroke;
  ctx.lineWidth = 2.5;
  ctx.lineJoin = "round";
  ctx.beginPath();
  let previous = null;
  for (const s of samples) {
    if (!known(s[name])) {
      previous = null;
      continue;
    }
    if (previous && s.t - previous.t <= GAP_MS) ctx.lineTo(x(s.t), y(s[name]));
    else ctx.moveTo(x(s.t), y(s[name]));
    previous = s;
  }
  ctx.stroke();
}

// ---- signing in and out --------------------------------------------------------------

function showConsole() {
  $("#login").hidden = true;
  $("#console").hidden = false;
  $("#forget").hidden = false;
}

function signOut(message) {
  sessionStorage.removeItem(KEY_ITEM);
  clearTimeout(state.timer);
  $("#console").hidden = true;
  $("#forget").hidden = true;
  $("#login").hidden = false;
  $("#updated").textContent = "";
  const error = $("#login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("#admin-key").focus();
}

function start() {
  $("#login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("#admin-key");
    sessionStorage.setItem(KEY_ITEM, input.value);
    input.value = "";
    $("#login-error").hidden = true;
    refreshNow();
  });
  $("#forget").addEventListener("click", () => signOut(""));
  window.addEventListener("resize", drawChart);
  if (sessionStorage.getItem(KEY_ITEM)) refreshNow();
  else signOut("");
}

start();

// ---- API keys (/admin/keys): list, create (the key shown once), rotate, disable, revoke

const KEYS = "keys";
const keyView = { busy: false, confirmRevoke: "" };

async function refreshKeys() {
  if (keyView.busy || !sessionStorage.getItem(KEY_ITEM) || $("#console").hidden) return;
  keyView.busy = true;
  try {
    const r = await call("GET", KEYS);
    if (r.ok && r.data) renderKeys(r.data.keys || []);
  } finally {
    keyView.busy = false;
  }
}

function budgetUsed(k) {
  if (!k.budget) return DASH;
  const used = k.usage ? k.usage.budget_used : null;
  return `${int(used)} / ${int(k.budget.tokens)} per ${k.budget.period}`;
}

function keyState(k) {
  if (k.disabled) return "disabled";
  if (k.expires_at && Date.parse(k.expires_at) <= Date.now()) return "expired";
  return "active";
}

function keyButton(label, action, k) {
  const button = el("button", { type: "button", class: "quiet", "data-action": action }, label);
  button.addEventListener("click", () => keyAction(action, k));
  return button;
}

function renderKeys(keys) {
  const rows = keys.map((k) => {
    const actions = el("td", { class: "actions" });
    if (k.source === "api") {
      const revoke = keyView.confirmRevoke === k.name ? "Confirm revoke" : "Revoke";
      actions.append(
        keyButton("Rotate", "rotate", k),
        keyButton(k.disabled ? "Enable" : "Disable", k.disabled ? "enable" : "disable", k),
        keyButton(revoke, "revoke", k),
      );
    } else {
      actions.append(el("span", { class: "muted" }, "keys file"));
    }
    const usage = k.usage || {};
    const state = keyState(k);
    return el("tr", { "data-key": k.name, class: state === "active" ? "" : "disabled" },
      el("td", {}, el("strong", {}, k.name), el("br"), el("span", { class: "url muted" }, k.fingerprint)),
      el("td", {}, k.source),
      el("td", {}, text(k.tier)),
      el("td", { class: "models" }, k.models ? k.models.join(", ") : "all"),
      el("td", { class: "num strong", "data-cell": "running" }, int(usage.running)),
      el("td", { class: "num", "data-cell": "max_running" }, text(k.max_running)),
      el("td", { "data-cell": "budget" }, budgetUsed(k)),
      el("td", { "data-cell": "state" }, state),
      actions);
  });
  $("#keys").replaceChildren(...rows);
}

function keysResult(ok, message) {
  const result = $("#keys-result");
  result.hidden = false;
  result.className = ok ? "ok" : "error";
  result.textContent = message;
}

function showNewKey(name, key) {
  $("#new-key-name").textContent = name;
  $("#new-key-value").textContent = key;
  $("#new-key").hidden = false;
}

async function keyAction(action, k) {
  const path = `${KEYS}/${encodeURIComponent(k.name)}`;
  if (action === "revoke" && keyView.confirmRevoke !== k.name) {
    keyView.confirmRevoke = k.name; // a second click revokes
    refreshKeys();
    return;
  }
  keyView.confirmRevoke = "";
  let r;
  if (action === "rotate") r = await call("POST", `${path}/rotate`, { grace_seconds: 0 });
  else if (action === "revoke") r = await call("DELETE", path);
  else r = await call("PATCH", path, { disabled: action === "disable" });
  if (r.status === 403) {
    signOut(problem(`Changing key ${k.name} failed`, r));
    return;
  }
  const done = { rotate: "rotated", revoke: "revoked", disable: "disabled", enable: "enabled" };
  keysResult(r.ok, r.ok ? `Key ${k.name} ${done[action]}.` : problem(`Changing key ${k.name} failed`, r));
  if (r.ok && action === "rotate") showNewKey(k.name, r.data.key);
  refreshKeys();
}

function newKeyBody() {
  const body = { name: $("#key-name").value.trim() };
  const tier = $("#key-tier").value.trim();
  if (tier) body.tier = tier;
  const models = $("#key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models;
  const maxRunning = $("#key-max-running").value;
  if (maxRunning) body.max_running = Number(maxRunning);
  const budget = $("#key-budget").value.trim();
  if (budget) {
    const m = /^(\d+)\s*\/\s*(day|week|month)$/.exec(budget);
    if (!m) throw new Error("Budget: tokens per period, like 1000000/day (day, week or month).");
    body.budget = { tokens: Number(m[1]), period: m[2] };
  }
  return body;
}

async function createKey(event) {
  event.preventDefault();
  let body;
  try {
    body = newKeyBody();
  } catch (err) {
    keysResult(false, err.message);
    return;
  }
  const r = await call("POST", KEYS, body);
  if (r.status === 403) {
    signOut(problem("Creating a key failed", r));
    return;
  }
  keysResult(r.ok, r.ok ? `Key ${body.name} created.` : problem("Creating a key failed", r));
  if (r.ok) {
    showNewKey(body.name, r.data.key);
    $("#key-form").reset();
  }
  refreshKeys();
}

function startKeys() {
  $("#key-form").addEventListener("submit", createKey);
  $("#new-key-done").addEventListener("click", () => {
    $("#new-key").hidden = true;
    $("#new-key-value").textContent = ""; // not kept in the page once copied
  });
  setInterval(refreshKeys, PERIOD_MS);
}

startKeys();
