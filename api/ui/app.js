// Prune Service web page: plain JavaScript, no dependencies. The API key lives in sessionStorage
// only and is sent as a Bearer header; every piece of data is rendered with textContent.
"use strict";

const KEY = "prune.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const $ = (sel) => document.querySelector(sel);
const streams = new Map(); // job id -> AbortController of its SSE reader
const jobs = new Map(); // job id -> last known job record
let current = null; // id of the job shown in the detail panel

function apiKey() { return sessionStorage.getItem(KEY); }

async function api(path, opts = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${apiKey()}` }, opts.headers || {});
  const resp = await fetch(path, Object.assign({}, opts, { headers }));
  if (resp.status === 401) { signOut("the API key was refused"); throw new Error("unauthorized"); }
  return resp;
}

async function apiJson(path, opts) {
  const resp = await api(path, opts);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) { const e = new Error(body.detail || resp.statusText); e.problem = body; e.status = resp.status; throw e; }
  return body;
}

function el(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function fmtEta(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  return s >= 60 ? `ETA ${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `ETA ${s}s`;
}

function progressText(job) {
  const p = job.progress || {};
  const parts = [`${Math.round((p.fraction || 0) * 100)}%`];
  if (p.stage) parts.push(p.stage);
  if (p.variant) parts.push(p.variant);
  if (p.block && p.nblocks) parts.push(`block ${p.block}/${p.nblocks}`);
  const eta = job.status === "running" ? fmtEta(p.eta_s) : "";
  if (eta) parts.push(eta);
  return parts.join(" · ");
}

// -- sign in -----------------------------------------------------------------------------------

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    await apiJson("/v1/jobs?limit=1");
  } catch (e) {
    if (e.message !== "unauthorized") $("#signin-error").textContent = e.message;
    return;
  }
  $("#signin").hidden = true; $("#app").hidden = false; $("#signout").hidden = false;
  $("#signin-error").textContent = "";
  await loadJobs();
}

function signOut(why) {
  sessionStorage.removeItem(KEY);
  for (const c of streams.values()) c.abort();
  streams.clear(); jobs.clear(); current = null;
  $("#jobs tbody").replaceChildren();
  $("#job").hidden = true; $("#app").hidden = true; $("#signin").hidden = false; $("#signout").hidden = true;
  $("#signin-error").textContent = why || "";
}

// -- job list ----------------------------------------------------------------------------------

async function loadJobs() {
  const page = await apiJson("/v1/jobs?limit=50");
  const body = $("#jobs tbody");
  body.replaceChildren();
  for (const job of page.items) { jobs.set(job.id, job); body.append(row(job)); follow(job); }
  for (const info of page.unreadable || []) body.append(unreadableRow(info));
}

function unreadableRow(info) {
  // a job whose stored record cannot be read: what is known of it, and a way to cancel it
  const tr = el("tr", null, { "data-job": info.id, class: "unreadable" });
  tr.append(el("td", info.id), el("td", "—"), el("td", info.error.message, { class: "err" }));
  tr.append(el("td", info.status || "unknown", { class: `status status-${info.status}` }), el("td", ""));
  const act = el("td");
  if (info.status && !TERMINAL.has(info.status)) {
    const b = el("button", "Cancel", { type: "button", class: "cancel" });
    b.addEventListener("click", () => cancel(info.id));
    act.append(b);
  }
  tr.append(act);
  return tr;
}

function row(job) {
  const tr = el("tr", null, { "data-job": job.id });
  const open = el("a", job.id, { href: `#${job.id}`, class: "open" });
  open.addEventListener("click", (ev) => { ev.preventDefault(); showJob(job.id); });
  const td = el("td"); td.append(open); tr.append(td);
  tr.append(el("td", job.request.model.source));
  tr.append(el("td", `${job.request.prune.method} ${job.request.prune.pattern}`));
  tr.append(el("td", job.status, { class: `status status-${job.status}` }));
  tr.append(el("td", progressText(job), { class: "progress" }));
  const act = el("td");
  if (!TERMINAL.has(job.status)) {
    const b = el("button", "Cancel", { type: "button", class: "cancel" });
    b.addEventListener("click", () => cancel(job.id));
    act.append(b);
  }
  tr.append(act);
  return tr;
}

function update(job) {
  jobs.set(job.id, job);
  const old = document.querySelector(`tr[data-job="${job.id}"]`);
  if (old) old.replaceWith(row(job)); else $("#jobs tbody").prepend(row(job));
  if (current === job.id) renderJob(job);
}

// -- live progress over SSE (fetch + ReadableStream: EventSource cannot send Authorization) --------

function follow(job) {
  if (TERMINAL.has(job.status) || streams.has(job.id)) return;
  const ctl = new AbortController();
  streams.set(job.id, ctl);
  readStream(job.id, ctl).catch(() => {}).finally(async () => {
    streams.delete(job.id);
    if (ctl.signal.aborted) return;
    const fresh = await apiJson(`/v1/jobs/${job.id}`).catch(() => null);
    if (fresh) { update(fresh); if (!TERMINAL.has(fresh.status)) setTimeout(() => follow(fresh), 2000); }
  });
}

async function readStream(id, ctl) {
  let last = null;
  const headers = { Accept: "text/event-stream" };
  const resp = await api(`/v1/jobs/${id}/events`, { headers, signal: ctl.signal });
  if (!resp.ok || !resp.body) return;
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      const ev = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") ev.data += (ev.data ? "\n" : "") + val; else if (field === "event") ev.event = val;
        else if (field === "id") last = val;
      }
      if (ev.data) onEvent(id, ev.event, JSON.parse(ev.data), last);
    }
  }
}

function onEvent(id, type, data, eventId) {
  const job = jobs.get(id);
  if (!job) return;
  if (type === "progress") job.progress = Object.assign({}, job.progress, data);
  if (type === "status" && data.status) job.status = data.status;
  update(job);
  if (current === id) appendEvent({ id: eventId, type, data });
  if (type === "status" && TERMINAL.has(data.status)) {
    apiJson(`/v1/jobs/${id}`).then(update).catch(() => {});
  }
}

// -- job detail --------------------------------------------------------------------------------

async function showJob(id) {
  current = id;
  $("#job").hidden = false;
  shownEvents.clear();
  lastStep = null;
  sweep = { total: 0, labels: [], current: -1, last: {} };
  $("#variants tbody").replaceChildren();
  $("#events").replaceChildren(); $("#artifacts").replaceChildren(); $("#plots").replaceChildren();
  $("#report").srcdoc = "";
  const job = await apiJson(`/v1/jobs/${id}`);
  update(job);
  const page = await apiJson(`/v1/jobs/${id}/events?limit=1000`);
  for (const ev of page.items) appendEvent(ev);
  follow(job);
  location.hash = id;
}

// -- timeline and sweep view -------------------------------------------------------------------

const shownEvents = new Set(); // event ids in the detail panel (the page and the stream overlap)
const VARIANT_TAG = /^\[(\S+) (\d+)\/(\d+)\] /; // "[wanda-0.5 2/4] " before a sweep step's message
let lastStep = null; // {key, tr}: the timeline row of the step (stage, variant, block) in progress
let sweep = { total: 0, labels: [], current: -1, last: {} }; // the shown job's variants, from its progress events

function eventTime(id) {
  const ms = Number(String(id || "").split("-")[0]); // a stream id starts with its Unix time in ms
  return ms ? new Date(ms).toLocaleTimeString([], { hour12: false }) : "";
}

function describe(type, d) {
  // one timeline row: stage, variant, block i/N, fraction done, ETA and message (never raw JSON)
  if (type === "progress") {
    return { stage: d.stage || "", variant: d.variant || "", block: d.block && d.nblocks ? `${d.block}/${d.nblocks}` : "",
      done: `${Math.round((d.fraction || 0) * 100)}%`, eta: fmtEta(d.eta_s).replace(/^ETA /, ""),
      message: (d.message || "").replace(VARIANT_TAG, "") };
  }
  if (type === "status") {
    let message = d.previous ? `${d.previous} → ${d.status}` : String(d.status);
    if (d.attempts) message += ` (attempt ${d.attempts})`;
    if (d.reason) message += ` · ${d.reason}`;
    if (d.error) message += ` · ${d.error.code}: ${d.error.message}`;
    return { stage: d.status, message, cls: `status-${d.status}` };
  }
  if (type === "error") return { stage: "error", message: `${d.code}: ${d.message}` };
  if (type === "log") return { stage: "log", message: d.message || "" };
  const parts = Object.entries(d).map(([k, v]) => Array.isArray(v) ? `${v.length} ${k}`
    : v === null || typeof v !== "object" ? `${k} ${v}` : k); // never raw JSON
  return { stage: type, message: parts.join(" · ") };
}

function appendEvent(ev) {
  if (ev.id && shownEvents.has(ev.id)) return;
  if (ev.id) shownEvents.add(ev.id);
  const data = ev.data || {};
  const d = describe(ev.type, data);
  const tr = el("tr", null, { class: `kind-${ev.type} ${d.cls || ""}`.trim() });
  const cells = { time: eventTime(ev.id), stage: d.stage, variant: d.variant, block: d.block, done: d.done, eta: d.eta,
    message: d.message };
  for (const [cls, text] of Object.entries(cells)) tr.append(el("td", text || "", { class: cls }));
  const key = ev.type === "progress" ? `${d.stage}|${d.variant}|${d.block}` : null;
  if (key && lastStep && lastStep.key === key) lastStep.tr.replaceWith(tr); // the same step advancing: one row
  else $("#events").append(tr);
  lastStep = key ? { key, tr } : null;
  if (ev.type === "progress") trackVariant(data);
}

function trackVariant(p) {
  const m = VARIANT_TAG.exec(p.message || "");
  if (!m) return;
  const i = Number(m[2]) - 1;
  sweep.total = Number(m[3]);
  sweep.labels[i] = m[1];
  sweep.current = i;
  sweep.last[m[1]] = p.message.replace(VARIANT_TAG, ""); // fanned out: variants advance side by side
  const job = jobs.get(current);
  if (job) renderSweep(job);
}

function variantState(job, i, label, results) {
  if (results.has(label)) return "done";
  if (job.fanout) { // one job per variant, several at once: each variant's own last step decides
    const last = sweep.last[label];
    if (last === undefined) return TERMINAL.has(job.status) ? "not run" : "pending";
    if (last === "exported") return "done";
    return TERMINAL.has(job.status) ? `stopped (${job.status})` : "running";
  }
  if (i < sweep.current) return "done";
  if (i === sweep.current) return TERMINAL.has(job.status) ? `stopped (${job.status})` : "running";
  return TERMINAL.has(job.status) ? "not run" : "pending";
}

function renderSweep(job) {
  $("#sweep").hidden = !(job.request && job.request.sweep);
  if ($("#sweep").hidden) return;
  const results = new Map(((job.summary && job.summary.variants) || []).map((v) => [v.label, v]));
  const total = Math.max(sweep.total, results.size);
  const labels = results.size ? [...results.keys()] : sweep.labels;
  const body = $("#variants tbody");
  body.replaceChildren();
  for (let i = 0; i < total; i++) {
    const label = labels[i] || sweep.labels[i] || `variant ${i + 1}`;
    const r = results.get(label) || {};
    const state = variantState(job, i, label, results);
    const tr = el("tr", null, { "data-variant": label });
    tr.append(el("td", `${i + 1}/${total}`), el("td", label));
    tr.append(el("td", state, { class: `state state-${state.split(" ")[0]}` }));
    tr.append(el("td", r.pruned_ppl === undefined ? "" : fmt(r.pruned_ppl), { class: "ppl" }));
    tr.append(el("td", r.ppl_ratio ? `×${r.ppl_ratio.toFixed(2)}` : ""));
    tr.append(el("td", r.passed === true ? "passed" : r.passed === false ? "failed" : ""));
    body.append(tr);
  }
}

const shown = new Set(); // jobs whose artifacts are on screen

function renderJob(job) {
  $("#job-id").textContent = job.id;
  $("#job-status").textContent = job.status;
  $("#job-status").className = `status status-${job.status}`;
  $("#job-bar").style.width = `${Math.round((job.progress.fraction || 0) * 100)}%`;
  $("#job-progress").textContent = progressText(job);
  $("#job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("#job-cancel").hidden = TERMINAL.has(job.status) || job.status === "cancelling";
  const sum = $("#job-summary");
  sum.replaceChildren();
  const s = job.summary;
  if (s) {
    const txt = `dense ppl ${fmt(s.dense_ppl)} → pruned ppl ${fmt(s.pruned_ppl)}` +
      (s.ppl_ratio ? ` (×${s.ppl_ratio.toFixed(2)}, ${s.verdict})` : "") + ` · sparsity ${fmt(s.sparsity)}`;
    sum.append(el("p", txt, { id: "summary-line" }));
    if (s.gate) {
      sum.append(el("p", `quality gate ${s.gate.passed ? "passed" : "FAILED"}`,
        { id: "gate", class: s.gate.passed ? "gate-passed" : "gate-failed" }));
    }
  }
  renderSweep(job);
  if (job.status === "succeeded" && !shown.has(job.id)) { shown.add(job.id); loadArtifacts(job.id); }
}

function fmt(v) { return v === null || v === undefined ? "n/a" : Number(v).toPrecision(4); }

async function loadArtifacts(id) {
  const list = await apiJson(`/v1/jobs/${id}/artifacts`);
  if (current !== id) return;
  const ul = $("#artifacts");
  ul.replaceChildren();
  for (const a of list.artifacts) {
    const li = el("li");
    const link = el("a", a.name, { href: a.url, download: a.name.split("/").pop(), "data-sha256": a.sha256,
      "data-name": a.name, class: "artifact", rel: "noreferrer" });
    li.append(link, el("span", ` ${a.size} bytes · sha256 ${a.sha256.slice(0, 12)}…`, { class: "hint" }));
    ul.append(li);
    if (a.name.startsWith("plots/") && a.name.endsWith(".png")) showPlot(a);
    if (a.name === "report.html") showReport(a);
  }
}

async function fetchSigned(url) {
  // signed URLs carry their own credentials: no Authorization header, no cookies
  const resp = await fetch(url, { credentials: "omit", referrerPolicy: "no-referrer" });
  if (!resp.ok) throw new Error(`${resp.status}`);
  return resp;
}

async function showPlot(a) {
  const img = el("img", null, { alt: a.name, "data-name": a.name, class: "plot" });
  $("#plots").append(img);
  try {
    const blob = await (await fetchSigned(a.url)).blob();
    img.src = URL.createObjectURL(new Blob([blob], { type: "image/png" }));
  } catch { img.src = a.url; } // another origin (object store): let the browser load it
}

async function showReport(a) {
  try {
    $("#report").srcdoc = await (await fetchSigned(a.url)).text(); // sandboxed: no scripts
  } catch { $("#report").srcdoc = "<p>report.html could not be loaded here; use its link above.</p>"; }
}

async function cancel(id) {
  try {
    const job = await apiJson(`/v1/jobs/${id}/cancel`, { method: "POST" });
    if (job.request) update(job); else await loadJobs(); // an unreadable job: only its id and status
  } catch (e) { alert(e.message); }
}

// -- submit ------------------------------------------------------------------------------------

function formBody() {
  const body = {};
  for (const input of document.querySelectorAll("#submit-form [data-loc]")) {
    const raw = input.value.trim();
    if (raw === "") continue;
    const path = input.dataset.loc.split(".");
    let value = raw;
    if (input.dataset.type === "number") value = Number.isNaN(Number(raw)) ? raw : Number(raw);
    if (input.dataset.type === "bool") value = raw === "true";
    let obj = body;
    for (const k of path.slice(0, -1)) obj = obj[k] = obj[k] || {};
    obj[path[path.length - 1]] = value;
  }
  return body;
}

function clearErrors() {
  for (const e of document.querySelectorAll("#submit-form .err")) e.textContent = "";
}

function showErrors(problem) {
  const errors = problem.errors || [];
  if (!errors.length) { $("#form-error").textContent = problem.detail || problem.title || "refused"; return; }
  for (const err of errors) {
    let loc = (err.loc || []).filter((p) => p !== "body" && typeof p === "string");
    let slot = null;
    while (loc.length && !slot) {  // the deepest field the error names, else its section
      slot = document.querySelector(`#submit-form [data-err-for="${loc.join(".")}"]`);
      loc = loc.slice(0, -1);
    }
    slot = slot || $("#form-error");
    slot.textContent = (slot.textContent ? slot.textContent + "; " : "") + err.msg;
  }
}

async function submit(ev) {
  ev.preventDefault();
  clearErrors();
  try {
    const job = await apiJson("/v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(formBody()),
    });
    update(job); follow(job); showJob(job.id);
  } catch (e) {
    if (e.problem) showErrors(e.problem); else $("#form-error").textContent = e.message;
  }
}

// -- wiring ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("#key").value); $("#key").value = ""; });
  $("#signout").addEventListener("click", () => signOut());
  $("#refresh").addEventListener("click", () => loadJobs());
  $("#job-cancel").addEventListener("click", () => current && cancel(current));
  $("#submit-form").addEventListener("submit", submit);
  if (apiKey()) signIn(apiKey()).then(() => { if (location.hash.length > 1) showJob(location.hash.slice(1)); });
});
