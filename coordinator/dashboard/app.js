// The fleet dashboard: polls the coordinator's JSON every two seconds and redraws. No framework, no CDN.
"use strict";

const POLL_MS = 2000;
const PAGE = 100;
const COLORS = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#be185d", "#4b5563"];
const state = { rounds: [], offset: 0, summary: null };

const $ = (id) => document.getElementById(id);
const esc = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const byDensity = (a, b) => parseFloat(b) - parseFloat(a);
const color = (densities, d) => COLORS[densities.indexOf(d) % COLORS.length];

async function get(path) {
  const reply = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (reply.status === 401) { window.location = "/login"; throw new Error("signed out"); }
  if (!reply.ok) throw new Error(`${path}: ${reply.status}`);
  return reply.json();
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

// Lines over rounds: series = {label: [[round, value], ...]}.
function lineChart(series, labels, width = 420, height = 160) {
  const points = Object.values(series).flat();
  if (!points.length) return '<p class="muted">no rounds yet</p>';
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  const [y0, y1] = [Math.min(...ys, 0) , Math.max(...ys, 1)];
  const m = 28, X = (x) => m + (x - x0) / (x1 - x0) * (width - m - 8), Y = (y) => height - 16 - (y - y0) / (y1 - y0) * (height - 24);
  const lines = Object.entries(series).map(([label, pts]) =>
    `<polyline fill="none" stroke="${color(labels, label)}" stroke-width="1.8" points="${pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ")}"/>`);
  return `<svg width="${width}" height="${height}"><line x1="${m}" y1="${height - 16}" x2="${width - 8}" y2="${height - 16}" stroke="#ccc"/>
    <text x="${m}" y="${height - 3}">round ${x0}</text><text x="${width - 60}" y="${height - 3}">round ${x1}</text>
    <text x="0" y="10">${y1.toFixed(0)}</text><text x="0" y="${height - 18}">${y0.toFixed(0)}</text>${lines.join("")}</svg>
    <div class="legend">${labels.filter((l) => l in series).map((l) => `<span><i style="background:${color(labels, l)}"></i>d=${esc(l)}</span>`).join("")}</div>`;
}

function densitiesOf(rounds) {
  const all = new Set();
  rounds.forEach((r) => Object.keys(r.accuracy).forEach((d) => all.add(d)));
  return [...all].sort(byDensity);
}

function renderSummary(s) {
  const devices = Object.entries(s.devices).map(([status, n]) => `<span class="status-${esc(status)}">${n} ${esc(status)}</span>`).join(", ");
  $("summary").innerHTML = `${devices || "no devices yet"} · ${s.rounds} rounds · model ${esc(s.model_version || "none yet")}` +
    (s.candidate ? ` · candidate ${esc(s.candidate)} on ${(100 * s.canary).toFixed(0)} % of the fleet` : "");
  $("models").innerHTML = s.versions.length ? `<table id="models-table"><thead><tr><th>version</th><th>status</th><th class="num">canary</th><th>published</th><th>why</th></tr></thead><tbody>` +
    s.versions.slice().reverse().map((v) => `<tr data-version="${esc(v.version)}"><td>${esc(v.version)}</td><td class="status version-${esc(v.status)}">${esc(v.status)}</td>` +
      `<td class="num">${v.canary ? `${(100 * v.canary).toFixed(0)} %` : "–"}</td><td>${ago(v.published_at)}</td><td>${esc(v.reason || "")}</td></tr>`).join("") + "</tbody></table>"
    : '<p class="muted">none published yet</p>';
  const u = s.round_under_way;
  if (!u) { $("round-under-way").innerHTML = '<p class="muted">none: waiting for the next round</p>'; return; }
  const late = u.timeout_s !== null && u.elapsed_s > u.timeout_s;
  const sent = Object.entries(u.sent).sort();
  $("round-under-way").innerHTML = `<p>Round ${u.round}: ${sent.length} devices training, ${u.elapsed_s.toFixed(0)} s` +
    (u.timeout_s !== null ? ` of a ${u.timeout_s.toFixed(0)} s timeout` : "") + (late ? ' <span class="late">late</span>' : "") + "</p>" +
    `<table><thead><tr><th>device</th><th class="num">density</th></tr></thead><tbody>${sent.slice(0, 50).map(([name, d]) =>
      `<tr><td><a href="#/device/${encodeURIComponent(name)}">${esc(name)}</a></td><td class="num">${d}</td></tr>`).join("")}</tbody></table>` +
    (sent.length > 50 ? `<p class="muted">and ${sent.length - 50} more</p>` : "");
}

function renderRounds(rounds, reference) {
  const densities = densitiesOf(rounds);
  const accuracy = {};
  rounds.forEach((r) => Object.entries(r.accuracy).forEach(([d, a]) => { if (a !== null) (accuracy[d] ||= []).push([r.round, a]); }));
  const last = rounds[rounds.length - 1];
  const table = last ? `<table id="accuracy-table"><thead><tr><th>density</th><th class="num">accuracy % (round ${last.round})</th><th class="num">centralized %</th><th class="num">gap</th></tr></thead><tbody>` +
    densities.map((d) => `<tr><td>${d}</td><td class="num">${last.accuracy[d] ?? "–"}</td><td class="num">${reference?.[d] ?? "–"}</td>` +
      `<td class="num">${last.gap?.[d] ?? "–"}</td></tr>`).join("") + "</tbody></table>" : "";
  $("accuracy").innerHTML = lineChart(accuracy, densities) + table;

  const profiles = new Set();
  rounds.forEach((r) => Object.keys(r.trained).forEach((p) => profiles.add(p)));
  $("densities").innerHTML = `<div class="charts">${[...profiles].sort().map((p) => {
    const series = {};
    rounds.forEach((r) => densities.forEach((d) => (series[d] ||= []).push([r.round, r.trained[p]?.[d] || 0])));
    const now = state.summary?.densities?.[p] || {};
    return `<div class="chart" data-profile="${esc(p)}"><h3>${esc(p)} · assigned now: ${Object.entries(now).sort((a, b) => byDensity(a[0], b[0]))
      .map(([d, n]) => `${n} at ${d}`).join(", ") || "–"}</h3>${lineChart(series, densities, 300, 120)}</div>`;
  }).join("")}</div>`;
}

function refusalsByDevice(rounds) {
  const refused = {};
  rounds.forEach((r) => Object.entries(r.rejected || {}).forEach(([name, why]) => { refused[name] = `round ${r.round}: ${why}`; }));
  return refused;
}

async function renderFleet() {
  const page = await get(`/api/devices?offset=${state.offset}&limit=${PAGE}`);
  const refused = refusalsByDevice(state.rounds);
  $("fleet-count").textContent = `(${page.total})`;
  $("page").textContent = page.total ? `${page.offset + 1}–${page.offset + page.devices.length} of ${page.total}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + PAGE >= page.total;
  document.querySelector("#fleet-table tbody").innerHTML = page.devices.map((d) => {
    const b = d.budget ? `${d.budget.latency_ms.toPrecision(3)} ms, ${d.budget.memory_mb.toFixed(0)} MB` + (d.budget.battery !== null ? `, ${(100 * d.budget.battery).toFixed(0)} %` : "") : "–";
    return `<tr data-device="${esc(d.name)}"><td><a href="#/device/${encodeURIComponent(d.name)}">${esc(d.name)}</a></td><td>${esc(d.profile)}</td>` +
      `<td class="num density">${d.density}</td><td class="status-${esc(d.status)}">${esc(d.status)}</td><td class="version">${model(d)}</td><td>${b}</td><td>${ago(d.last_seen)}</td>` +
      `<td>${esc(refused[d.name] || "")}</td></tr>`;
  }).join("");
}

// the version a device serves; while it fetches and checks the one it was given, an arrow to that one
function model(d) {
  if (!d.given_version) return "–";
  return d.model_version === d.given_version ? esc(d.model_version) : `→ ${esc(d.given_version)}`;
}

async function renderDevice(name) {
  const d = await get(`/api/devices/${encodeURIComponent(name)}`);
  $("device-name").textContent = `${d.name} (${d.profile})`;
  $("device-state").innerHTML = `<p>density <b id="device-density">${d.density}</b> · <span class="status-${esc(d.status)}">${esc(d.status)}</span> · model <span id="device-model">${model(d)}</span> · last heartbeat ${ago(d.last_seen)}</p>`;
  $("device-history").innerHTML = `<table><thead><tr><th>when</th><th class="num">density</th><th>why</th><th>model</th></tr></thead><tbody>` +
    d.history.slice().reverse().slice(0, 200).map((h) => `<tr><td>${new Date(h.at).toLocaleString()}</td><td class="num">${h.density}</td><td>${esc(h.reason)}</td><td>${esc(h.model_version || "")}</td></tr>`).join("") + "</tbody></table>";
  $("device-served").innerHTML = d.served.length ? `<table><thead><tr><th class="num">density</th><th class="num">requests</th><th class="num">mean ms</th></tr></thead><tbody>` +
    d.served.map((s) => `<tr><td class="num">${s.density}</td><td class="num">${s.requests}</td><td class="num">${s.mean_ms ?? "–"}</td></tr>`).join("") + "</tbody></table>"
    : '<p class="muted">no Predict requests reported</p>';
  $("device-checks").innerHTML = d.checks.length ? `<table id="device-checks-table"><thead><tr><th>model</th><th class="num">density</th><th class="num">accuracy %</th><th class="num">images</th></tr></thead><tbody>` +
    d.checks.slice(0, 200).map((c) => `<tr><td>${esc(c.version)}</td><td class="num">${c.density}</td><td class="num">${c.accuracy}</td><td class="num">${c.examples}</td></tr>`).join("") + "</tbody></table>"
    : '<p class="muted">none reported (the agent keeps no labelled images: dress-agent join --check-set)</p>';
  $("device-refused").innerHTML = d.refused.length ? `<ul>${d.refused.map((r) => `<li>round ${r.round}: ${esc(r.reason)}</li>`).join("")}</ul>` : '<p class="muted">none</p>';
}

async function tick() {
  try {
    state.summary = await get("/api/summary");
    const after = state.rounds.length ? state.rounds[state.rounds.length - 1].round : 0;
    const fresh = (await get(`/api/rounds?after=${after}`)).rounds;
    state.rounds = state.rounds.concat(fresh).slice(-2000);
    renderSummary(state.summary);
    const device = decodeURIComponent((location.hash.match(/^#\/device\/(.+)$/) || [])[1] || "");
    $("fleet-view").hidden = !!device;
    $("device-view").hidden = !device;
    if (device) await renderDevice(device);
    else { renderRounds(state.rounds, state.summary.reference); await renderFleet(); }
    document.body.dataset.updated = new Date().toISOString();
  } catch (e) {
    $("summary").textContent = `cannot reach the coordinator: ${e.message}`;
  }
}

$("prev").onclick = () => { state.offset = Math.max(0, state.offset - PAGE); tick(); };
$("next").onclick = () => { state.offset += PAGE; tick(); };
window.addEventListener("hashchange", tick);
tick();
setInterval(tick, POLL_MS);
