// The run page, live: charts of the chosen metrics (step or time axis), progress and status,
// new checkpoints / samples / evals / report (panels refetched), and the log tail — all from
// the run's websocket (/ws/runs/<id>/), with no page reload.
import { MetricChart, fetchSeries } from "./charts.js";

const config = JSON.parse(document.getElementById("chart-config").textContent);
const container = document.getElementById("charts");
const picker = document.getElementById("metric-picker");
const xAxis = document.getElementById("x-axis");
const charts = new Map();
let names = new Set(config.names);
let active = config.active;

function fmtDuration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return h + "h " + String(m).padStart(2, "0") + "m";
  if (m) return m + "m " + String(s).padStart(2, "0") + "s";
  return s + "s";
}

function shownNames() {
  return [...picker.querySelectorAll("input:checked")].map((i) => i.value);
}

async function addCharts(list) {
  const wanted = list.filter((n) => !charts.has(n));
  if (!wanted.length) return;
  wanted.forEach((name) => charts.set(name, new MetricChart(container, name, [{ label: name }], xAxis.value)));
  charts.forEach((chart) => chart.resize()); // widths once every chart has its grid cell
  document.getElementById("charts-empty").hidden = true;
  const series = await fetchSeries(config.metrics_url, wanted, config.max_points);
  wanted.forEach((name) => { if (series[name] && charts.has(name)) charts.get(name).set(0, series[name]); });
}

function syncCharts() {
  const shown = shownNames();
  for (const [name, chart] of charts) if (!shown.includes(name)) { chart.destroy(); charts.delete(name); }
  addCharts(shown);
}

function addMetricName(name) {
  if (names.has(name)) return;
  names.add(name);
  const label = document.createElement("label");
  label.className = "check";
  const input = document.createElement("input");
  input.type = "checkbox"; input.value = name;
  // A run's first metrics are shown as they appear, up to the usual number of charts.
  input.checked = charts.size < 5;
  label.append(input, " " + name);
  picker.appendChild(label);
  if (input.checked) addCharts([name]);
}

function showRun(run) {
  const status = document.getElementById("run-status");
  if (status.textContent !== run.status) {
    status.textContent = run.status;
    status.className = "status status-" + run.status;
    // Buttons depend on the status (cancel vs resume/retry): reload once it settles.
    if (!["queued", "running"].includes(run.status)) setTimeout(() => location.reload(), 1500);
  }
  document.getElementById("run-progress").style.width = Math.round(100 * Math.min(1, run.progress || 0)) + "%";
  document.getElementById("run-step").textContent = run.step;
  document.getElementById("run-total").textContent = run.total_steps ?? "?";
  document.getElementById("run-eta").textContent = run.status === "running" && run.eta_seconds ? "· ETA " + fmtDuration(run.eta_seconds) : "";
  if (run.best_val_bpb != null) document.getElementById("best-val-bpb").textContent = run.best_val_bpb.toFixed(4);
  active = ["queued", "running"].includes(run.status);
}

let panelsTimer = null;
function refreshPanels() {
  if (panelsTimer) return;
  panelsTimer = setTimeout(async () => {
    panelsTimer = null;
    const response = await fetch(config.panels_url);
    if (!response.ok) return;
    const target = document.getElementById("run-panels");
    target.innerHTML = await response.text();
    target.dispatchEvent(new CustomEvent("panels-updated", { bubbles: true }));
  }, 300);
}

async function refreshLog() {
  const response = await fetch(config.log_url);
  if (!response.ok) return;
  const log = document.getElementById("run-log");
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = await response.text();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

const PANEL_EVENTS = new Set(["checkpoint", "sample", "eval_result", "report", "end", "stage"]);

function onFrame(msg) {
  if (msg.type !== "run") return;
  if (msg.run) showRun(msg.run);
  for (const [name, rows] of Object.entries(msg.metrics || {})) {
    addMetricName(name);
    if (charts.has(name)) charts.get(name).append(0, rows);
  }
  if ((msg.events || []).some((e) => PANEL_EVENTS.has(e.type)) || msg.refetch) refreshPanels();
}

let retry = 1000;
function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const socket = new WebSocket(scheme + location.host + config.socket);
  socket.onopen = () => {
    retry = 1000;
    document.body.dataset.runSocket = "open";
    // Points that arrived while disconnected: refetch what is shown (duplicates are skipped).
    for (const [name, chart] of charts) fetchSeries(config.metrics_url, [name], config.max_points).then((s) => s[name] && chart.set(0, s[name]));
  };
  socket.onmessage = (event) => onFrame(JSON.parse(event.data));
  socket.onclose = () => {
    document.body.dataset.runSocket = "closed";
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 30000);
  };
}

picker.addEventListener("change", syncCharts);
xAxis.addEventListener("change", () => charts.forEach((c) => c.setMode(xAxis.value)));
window.addEventListener("resize", () => charts.forEach((c) => c.resize()));
setInterval(() => { if (active) refreshLog(); }, 3000);
syncCharts();
connect();
