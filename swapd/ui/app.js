// swapd's status page. Plain JavaScript, no dependencies: it reads the same routes curl does
// (/status, /v1/models, /api/gpu, /api/activity/stream, /logs/stream) from its own origin.
// Event streams are read with fetch(), not EventSource, so that the admin key can travel as a
// header; it lives in sessionStorage and never in a URL.
"use strict";

const KEY_STORE = "swapd.adminKey";
// The chat's own key: an API key the user gives, for inference only. The admin key never goes
// to /v1 (with forwardClientAuth the engine would receive it).
const CHAT_KEY_STORE = "swapd.apiKey";
const POLL_MS = 1000;
const MAX_LOG_LINES = 800;
const MAX_ACTIVITY_ROWS = 300;
const SESSION_ID = "ui-" + Math.random().toString(36).slice(2, 10);

const $ = (sel) => document.querySelector(sel);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the page's CSP
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// -- the key and every request --------------------------------------------------------------

let keyPrompt = null; // a promise while the dialog is open
let keyDismissed = false; // closed without a key: ask again only from the header button

function storedKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function headers(extra) {
  const out = Object.assign({}, extra || {});
  const key = storedKey();
  if (key) out["Authorization"] = "Bearer " + key;
  return out;
}

function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message || "";
  dialog.returnValue = "";
  $("#key-input").value = "";
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      keyPrompt = null;
      keyDismissed = dialog.returnValue !== "saved";
      resolve(!keyDismissed);
    }, { once: true });
  });
  dialog.showModal();
  $("#key-input").focus();
  return keyPrompt;
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("#key-dialog").close("saved");
  refreshAll();
});
$("#key-forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORE);
  $("#key-dialog").close("forgotten");
});
$("#key-button").addEventListener("click", () => askForKey(""));

// Refused as a client of another machine while swapd has no key set: every panel would fail
// the same way, so the page says once, on one line, what to set, and stops asking.
let refused = false;

async function noteRefusal(resp) {
  if (resp.status !== 403) return;
  const body = await resp.clone().json().catch(() => ({}));
  if (!body.error || body.error.code !== "operations_loopback_only") return;
  refused = true;
  const line = $("#refused");
  line.textContent = body.error.message;
  line.hidden = false;
  document.body.classList.add("refused");
  setConn(false);
}

// fetch() with the key; a 401 asks for the key (once) and tries again.
async function api(path, options) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    const resp = await fetch(path, opts);
    await noteRefusal(resp);
    if (resp.status !== 401 || keyDismissed) return resp;
    const had = storedKey();
    const given = await askForKey(had ? "That key was refused." : "This swapd needs its admin key.");
    if (!given) return resp;
  }
  return fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
}

async function json(path, options) {
  const resp = await api(path, options);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((body.error && body.error.message) || resp.statusText);
  return body;
}

// Hand each line of a streamed response body to onLine, as it arrives.
async function readLines(resp, onLine) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      onLine(line);
    }
  }
}

// Read a streamed response line by line; reconnect after an error.
async function follow(path, onLine, { signal, onOpen } = {}) {
  let delay = 500;
  while ((!signal || !signal.aborted) && !refused) {
    try {
      const resp = await api(path, { signal });
      if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
      if (onOpen) onOpen();
      delay = 500;
      await readLines(resp, onLine);
    } catch (err) {
      if (signal && signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 5000);
  }
}

// -- formatting -----------------------------------------------------------------------------

function dur(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + Math.round(s % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}
function ago(wall) {
  return dur(Math.max(0, Date.now() / 1000 - wall)) + " ago";
}
function num(v, digits) {
  if (v === null || v === undefined) return "–";
  return digits ? v.toFixed(digits) : String(v);
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}
function clock(wall) {
  return new Date(wall * 1000).toLocaleTimeString([], { hour12: false });
}

// -- models ---------------------------------------------------------------------------------

let modelInfo = {}; // id -> /v1/models entry
const busy = new Set(); // models with a load/unload under way from this page

async function refreshModels() {
  const [status, models] = await Promise.all([json("/status"), json("/v1/models")]);
  modelInfo = {};
  for (const m of models.data || []) modelInfo[m.id] = m;
  $("#version").textContent = "v" + status.version + " · " + status.listen;
  $("#tenant").textContent = (status.tenant || []).join(", ") || "none";
  $("#queue-total").textContent = status.queue;
  renderModels(status.models);
  fillChatModels(Object.keys(status.models));
  fillLogSources(Object.keys(status.models));
  setConn(true);
}

const cards = new Map(); // model id -> the card's elements, updated in place every poll

function modelCard(id) {
  const ref = {};
  ref.badge = h("span", { class: "badge" });
  ref.desc = h("div", { class: "desc" });
  ref.bar = h("div");
  ref.progress = h("div", { class: "progress" }, ref.bar);
  ref.dl = h("dl");
  ref.load = h("button", { type: "button", class: "load", onclick: () => act(id, "load") }, "Load");
  ref.unload = h("button", { type: "button", class: "unload danger", onclick: () => act(id, "unload") }, "Unload");
  // Warm swaps (docs/sleep.md): only for recipes with sleepMode: enable.
  ref.sleep = h("button", { type: "button", class: "sleep ghost", hidden: true, title: "keep the process, give its memory back", onclick: () => act(id, "sleep") }, "Sleep");
  ref.el = h("div", { class: "model", "data-model": id },
    h("div", { class: "head" }, h("span", { class: "name", title: id }, id), ref.badge),
    ref.desc, ref.progress, ref.dl,
    h("div", { class: "actions" }, ref.load, ref.sleep, ref.unload,
      h("button", { type: "button", class: "ghost", onclick: () => showLogs(id) }, "Logs")));
  return ref;
}

function renderModels(models) {
  const list = $("#model-list");
  if (list.querySelector("p")) list.replaceChildren();
  for (const [id, ref] of cards) {
    if (!(id in models)) { ref.el.remove(); cards.delete(id); }
  }
  for (const [id, m] of Object.entries(models)) {
    let ref = cards.get(id);
    if (!ref) {
      ref = modelCard(id);
      cards.set(id, ref);
      list.append(ref.el);
    }
    const info = modelInfo[id] || {};
    const rows = [];
    if (m.state === "starting") {
      const left = m.eta_seconds;
      rows.push(["loading", left != null ? "about " + Math.round(left) + " s left" : "first start, no estimate yet"]);
    }
    rows.push(["uptime", m.uptime != null ? dur(m.uptime) : "–"]);
    rows.push(["requests", m.inflight + " in flight · " + m.queued + " queued"]);
    if (m.start_seconds != null) rows.push(["usual start", "~" + dur(m.start_seconds)]);
    rows.push(["last exit", lastExit(m)]);
    if (m.pid) rows.push(["pid", m.pid]);
    if (m.sleep && m.sleep.off) rows.push(["sleep", "off: " + m.sleep.off]);
    // Two nodes, one model (docs/two-sparks.md): a head's workers, a worker's holder.
    const cl = m.cluster;
    if (cl && cl.role === "head") {
      for (const n of cl.nodes || []) rows.push(["node " + n.peer, n.worker + ": " + n.state + (n.error ? " (" + n.error + ")" : "")]);
    } else if (cl && cl.role === "worker") {
      rows.push(["held for", cl.hold ? cl.hold.holder + (cl.hold.expires_in != null ? " · expires in " + dur(cl.hold.expires_in) : " · starting") : "nobody (started only by a hold)"]);
    }
    const running = m.state === "ready" || m.state === "starting" || m.state === "waking";
    const alive = running || m.state === "sleeping";
    ref.el.dataset.state = m.state;
    ref.badge.className = "badge " + m.state;
    ref.badge.textContent = m.state;
    const desc = info.name && info.name !== id ? info.name + (info.description ? " — " + info.description : "") : (info.description || "");
    if (ref.desc.textContent !== desc) ref.desc.textContent = desc;
    const showBar = m.state === "starting" && m.eta_seconds != null && m.uptime != null;
    ref.progress.hidden = !showBar;
    if (showBar) ref.bar.style.width = Math.min(98, (100 * m.uptime) / (m.uptime + m.eta_seconds)).toFixed(1) + "%";
    ref.dl.replaceChildren(...rows.map(([k, v]) => [h("dt", {}, k), h("dd", { title: String(v) }, v)]).flat());
    ref.load.disabled = running || busy.has(id) || (cl && cl.role === "worker");
    ref.unload.disabled = !alive || busy.has(id);
    ref.sleep.hidden = !m.sleep;
    ref.sleep.disabled = m.state !== "ready" || !m.sleep || !!m.sleep.off || busy.has(id);
  }
}

function lastExit(m) {
  const e = m.last_exit;
  const stop = m.last_stop;
  if (!e && !stop) return "–";
  const parts = [];
  if (e) parts.push(e.code === null ? "signal" : "code " + e.code);
  if (stop) parts.push(stop.reason + (stop.killed ? " (SIGKILL)" : ""));
  parts.push(ago((e && e.at) || stop.at));
  return parts.join(" · ");
}

async function act(id, what) {
  busy.add(id);
  refreshModels().catch(() => {});
  try {
    const resp = await api("/models/" + encodeURIComponent(id) + "/" + what, { method: "POST" });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      alert(what + " " + id + ": " + ((body.error && body.error.message) || resp.statusText));
    }
  } finally {
    busy.delete(id);
    refreshModels().catch(() => {});
  }
}

// -- GPU ------------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const memHistory = new Map(); // gpu index -> recent used fractions, for the sparkline
const HISTORY = 120;

function sparkline(values) {
  const w = 600, hgt = 60;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  // The newest sample at the right edge; the line grows leftwards as samples come.
  const x = (i) => w - ((values.length - 1 - i) * w) / (HISTORY - 1);
  const pts = values.map((v, i) => `${x(i).toFixed(1)},${(hgt - v * hgt).toFixed(1)}`);
  const area = document.createElementNS(SVG, "polygon");
  area.setAttribute("points", `${x(0).toFixed(1)},${hgt} ${pts.join(" ")} ${w},${hgt}`);
  area.setAttribute("fill", "#2f81f733");
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2f81f7");
  line.setAttribute("stroke-width", "2");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(area, line);
  return svg;
}

async function refreshGpu() {
  const s = await json("/api/gpu");
  const body = $("#gpu-body");
  const parts = [];
  for (const g of s.gpus || []) {
    const pct = g.memory_total_bytes ? (100 * g.memory_used_bytes) / g.memory_total_bytes : 0;
    const hist = memHistory.get(g.index) || [];
    hist.push(pct / 100);
    if (hist.length > HISTORY) hist.shift();
    memHistory.set(g.index, hist);
    parts.push(h("div", { class: "gpu" },
      h("div", {}, h("b", {}, "GPU " + g.index + " · " + g.name), h("span", { class: "muted small" }, "  driver " + g.driver)),
      h("div", { class: "meter", title: pct.toFixed(1) + "%" }, h("div", { style: "width:" + pct.toFixed(1) + "%" })),
      h("div", { class: "kv" },
        h("span", {}, "memory ", h("b", {}, bytes(g.memory_used_bytes) + " / " + bytes(g.memory_total_bytes))),
        h("span", {}, "source ", h("b", {}, g.memory_source)),
        h("span", {}, "temp ", h("b", {}, g.temperature_celsius != null ? g.temperature_celsius + " °C" : "–")),
        h("span", {}, "power ", h("b", {}, g.power_watts != null ? g.power_watts.toFixed(0) + " W" : "–")),
        h("span", {}, "util ", h("b", {}, g.utilization_ratio != null ? Math.round(100 * g.utilization_ratio) + " %" : "–"))),
      h("div", { class: "muted small" }, "memory used, last " + Math.round((HISTORY * 2 * POLL_MS) / 60000) + " minutes"),
      sparkline(hist)));
  }
  if (!parts.length) parts.push(h("p", { class: "muted" }, "No GPU seen (NVML unavailable). Engine memory below."));
  const rss = Object.entries(s.group_rss_bytes || {});
  if (rss.length) {
    parts.push(h("table", { class: "mem" },
      h("thead", {}, h("tr", {}, h("th", {}, "engine"), h("th", { class: "num" }, "resident (process group)"), h("th", { class: "num" }, "GPU (NVML)"))),
      h("tbody", {}, rss.map(([model, v]) =>
      h("tr", {}, h("td", {}, model), h("td", { class: "num" }, bytes(v)),
        h("td", { class: "num" }, s.group_gpu_bytes && s.group_gpu_bytes[model] != null ? bytes(s.group_gpu_bytes[model]) : "–"))))));
  } else {
    parts.push(h("p", { class: "muted small" }, "No engine running."));
  }
  body.replaceChildren(...parts);
}

// -- activity -------------------------------------------------------------------------------

let lastActivity = 0;

function activityRow(r) {
  const est = r.estimated ? "~" : "";
  const cls = "s" + String(r.status)[0];
  return h("tr", { class: "new", "data-id": r.id, "data-model": r.model },
    h("td", { title: new Date(r.time * 1000).toISOString() }, clock(r.time)),
    h("td", {}, r.model),
    h("td", { class: cls, title: r.path }, r.status),
    h("td", { class: "num" }, num(r.prompt_tokens)),
    h("td", { class: "num" + (est ? " est" : ""), title: est ? "estimated from the streamed chunks" : "" }, est + num(r.completion_tokens)),
    h("td", { class: "num" }, num(r.cached_tokens)),
    h("td", { class: "num" }, r.ttft != null ? dur(r.ttft) : "–"),
    h("td", { class: "num" }, num(r.prefill_tps, 1)),
    h("td", { class: "num" }, num(r.decode_tps, 1)),
    h("td", { class: "num" }, dur(r.duration)),
    h("td", {}, r.key || ""),
    h("td", {}, r.session || ""),
    h("td", {}, r.captured ? h("button", { type: "button", class: "ghost", onclick: () => showCapture(r.id) }, "view") : ""));
}

function addActivity(r) {
  if (r.id <= lastActivity) return;
  lastActivity = r.id;
  const rows = $("#activity-rows");
  rows.prepend(activityRow(r));
  while (rows.children.length > MAX_ACTIVITY_ROWS) rows.lastChild.remove();
}

async function startActivity() {
  // The last rows first (not the whole ring), then the live stream from there.
  try {
    const recent = await json("/api/activity?limit=" + MAX_ACTIVITY_ROWS);
    for (const r of recent.data) addActivity(r);
    if (!recent.enabled) $("#activity-note").textContent = "off (activity.size: 0)";
  } catch (err) { /* the stream below retries */ }
  follow("/api/activity/stream?since=" + lastActivity, (line) => {
    if (line.startsWith("data: ")) {
      try { addActivity(JSON.parse(line.slice(6))); } catch (e) { /* a cut line */ }
    }
  });
}

async function showCapture(id) {
  const dialog = $("#capture-dialog");
  $("#capture-id").textContent = "#" + id;
  $("#capture-body").textContent = "loading…";
  dialog.showModal();
  try {
    const c = await json("/api/activity/" + id + "/capture");
    const show = (part) => Object.entries(part.headers).map(([k, v]) => k + ": " + v).join("\n") + "\n\n" + pretty(part.body);
    $("#capture-body").textContent = "── request ──\n" + show(c.request) + "\n\n── response ──\n" + show(c.response) + (c.truncated ? "\n\n(cut at the capture buffer's size)" : "");
  } catch (err) {
    $("#capture-body").textContent = String(err.message || err);
  }
}

function pretty(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; }
}

// -- logs -----------------------------------------------------------------------------------

let logAbort = null;
const knownSources = new Set(["", "swapd"]);

function fillLogSources(ids) {
  const select = $("#log-source");
  for (const id of ids) {
    if (knownSources.has(id)) continue;
    knownSources.add(id);
    select.append(h("option", { value: id }, id));
  }
}

function showLogs(id) {
  $("#log-source").value = id;
  startLogs();
  $("#logs").scrollIntoView({ behavior: "smooth" });
}

function startLogs() {
  if (logAbort) logAbort.abort();
  logAbort = new AbortController();
  const pre = $("#log-lines");
  pre.textContent = "";
  const source = $("#log-source").value;
  const path = source ? "/logs/stream/" + encodeURIComponent(source) : "/logs/stream";
  let pending = [];
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    pre.append(...pending.map(logLine));
    pending = [];
    while (pre.childNodes.length > MAX_LOG_LINES) pre.firstChild.remove();
    if ($("#log-follow").checked) pre.scrollTop = pre.scrollHeight;
  };
  follow(path, (line) => {
    pending.push(line);
    if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
  }, { signal: logAbort.signal, onOpen: () => { pre.textContent = ""; } });
}
// "[source] text": the source gets a colour of its own, warnings and errors stand out.
function logLine(text) {
  const m = /^\[([^\]]+)\] ?(.*)$/.exec(text);
  const rest = m ? m[2] : text;
  const level = /\b(error|fatal|critical)\b/i.test(rest) ? " err" : /\bwarn(ing)?\b/i.test(rest) ? " warn" : "";
  return h("span", { class: "line" + level },
    m ? h("span", { class: "src " + (m[1] === "swapd" ? "src-swapd" : "src-engine") }, "[" + m[1] + "] ") : null,
    rest + "\n");
}
$("#log-source").addEventListener("change", startLogs);

// -- chat -----------------------------------------------------------------------------------

let chatHistory = [];

function fillChatModels(ids) {
  const select = $("#chat-model");
  const have = new Set([...select.options].map((o) => o.value));
  for (const id of ids) if (!have.has(id)) select.append(h("option", { value: id }, id));
}

function chatMessage(role, text) {
  const el = h("div", { class: "msg " + role }, text);
  $("#chat-log").append(el);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return el;
}

async function sendChat(ev) {
  ev.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  const model = $("#chat-model").value;
  if (!text || !model) return;
  input.value = "";
  chatHistory.push({ role: "user", content: text });
  chatMessage("user", text);
  const out = chatMessage("assistant", "");
  const thinking = h("span", { class: "thinking" });
  const answer = document.createTextNode("");
  out.append(thinking, answer);
  $("#chat-send").disabled = true;
  try {
    const chatHeaders = { "Content-Type": "application/json", "X-Session-ID": SESSION_ID };
    const chatKey = sessionStorage.getItem(CHAT_KEY_STORE) || "";
    if (chatKey) chatHeaders["Authorization"] = "Bearer " + chatKey;
    // fetch(), not api(): api() adds the admin key.
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: chatHeaders,
      body: JSON.stringify({ model, messages: chatHistory, stream: true, max_tokens: 256 }),
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      if (resp.status === 401) throw new Error("this swapd needs an API key for chat: enter one above");
      throw new Error((body.error && body.error.message) || resp.statusText);
    }
    await readLines(resp, (raw) => {
      const line = raw.trim();
      if (!line.startsWith("data:")) return;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      let chunk;
      try { chunk = JSON.parse(data); } catch (e) { return; }
      if (chunk.error) throw new Error(chunk.error.message || "engine error");
      const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
      if (delta.reasoning_content) thinking.textContent = delta.reasoning_content.trim();
      if (delta.content) {
        if (thinking.textContent && !answer.data) thinking.remove();
        answer.data += delta.content;
      }
      $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
    });
    chatHistory.push({ role: "assistant", content: answer.data });
  } catch (err) {
    chatMessage("note", "error: " + (err.message || err));
    chatHistory.pop();
  } finally {
    $("#chat-send").disabled = false;
  }
}
$("#chat-form").addEventListener("submit", sendChat);
$("#chat-key").value = sessionStorage.getItem(CHAT_KEY_STORE) || "";
$("#chat-key").addEventListener("change", () => {
  const key = $("#chat-key").value.trim();
  if (key) sessionStorage.setItem(CHAT_KEY_STORE, key);
  else sessionStorage.removeItem(CHAT_KEY_STORE);
});
$("#chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#chat-clear").addEventListener("click", () => { chatHistory = []; $("#chat-log").replaceChildren(); });

// -- usage per key and model (today, UTC) ---------------------------------------------------

function usageRows(rows, label) {
  if (!rows.length) return [h("tr", {}, h("td", { class: "muted", colspan: 6 }, "no " + label + " yet"))];
  return rows.map((r) => h("tr", {},
    h("td", {}, r.name == null ? "(no key)" : r.name),
    h("td", { class: "num" }, num(r.requests)),
    h("td", { class: "num" + (r.errors ? " s4" : "") }, num(r.errors)),
    h("td", { class: "num" }, num(r.prompt_tokens)),
    h("td", { class: "num" }, num(r.completion_tokens)),
    h("td", { class: "num" }, num(r.tokens))));
}

async function refreshUsage() {
  const [byKey, byModel] = await Promise.all([json("/api/usage?by=key"), json("/api/usage?by=model")]);
  $("#usage-keys tbody").replaceChildren(...usageRows(byKey.data, "keys"));
  $("#usage-models tbody").replaceChildren(...usageRows(byModel.data, "requests"));
  $("#usage-note").textContent = byKey.store === "sqlite"
    ? "since 00:00 UTC"
    : "since 00:00 UTC, of the records in memory (activity.store: sqlite keeps them all)";
}

// -- main loop ------------------------------------------------------------------------------

function setConn(ok) {
  const el = $("#conn");
  el.className = "conn " + (ok ? "ok" : "bad");
  el.title = ok ? "connected" : "swapd does not answer";
}

async function refreshAll() {
  await Promise.all([
    refreshModels().catch(() => setConn(false)),
    refreshGpu().catch(() => {}),
    refreshUsage().catch(() => {}),
  ]);
}

let started = false;
async function start() {
  await refreshAll();
  if (started || refused) return;
  started = true;
  startActivity();
  startLogs();
  const every = (fn, ms) => {
    const id = setInterval(() => (refused ? clearInterval(id) : fn()), ms);
  };
  every(() => refreshModels().catch(() => setConn(false)), POLL_MS);
  every(() => refreshGpu().catch(() => {}), 2 * POLL_MS);
  every(() => refreshUsage().catch(() => {}), 5 * POLL_MS);
}
start();
