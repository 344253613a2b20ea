// The run page, live: charts of the chosen metrics (step or time axis) and of metric groups
// (one line per member: expert load per layer), progress and status,
// new checkpoints / samples / evals / report (panels refetched), and the log tail — all from
// the run's websocket (/ws/runs/<id>/), with no page reload.
import { MetricChart, fetchSeries } from "./charts.js";

const config = JSON.parse(document.getElementById("chart-config").textContent);
const container = document.getElementById("charts");
const picker = document.getElementById("metric-picker");
const xAxis = document.getElementById("x-axis");
const charts = new Map(); // picker value (a metric name or a group's title) -> chart
let names = new Set(config.names);
// {title, prefix, names}: metrics charted together, e.g. moe/load_max/l0, l1, … one line each.
const groups = new Map(config.groups.map((g) => [g.title, g]));

function groupOf(name) {
  for (const group of groups.values()) {
    const rest = name.slice(group.prefix.length);
    if (name.startsWith(group.prefix) && /^\d+$/.test(rest)) return group;
  }
  return null;
}

function memberLabel(group, name) { return "layer " + name.slice(group.prefix.length); }

// The metric names a chart draws, in line order.
function membersOf(key) { return charts.get(key).members; }
let active = config.active;

const fmtDuration = window.runClock.fmtDuration; // live.js: one format for every page

function shownNames() {
  return [...picker.querySelectorAll("input:checked")].map((i) => i.value);
}

function newChart(key) {
  const group = groups.get(key);
  const members = group ? [...group.names] : [key];
  const lines = group ? members.map((n) => ({ label: memberLabel(group, n) })) : [{ label: key }];
  const chart = new MetricChart(container, key, lines, xAxis.value);
  chart.members = members;
  charts.set(key, chart);
}

async function addCharts(list) {
  const wanted = list.filter((n) => !charts.has(n));
  if (!wanted.length) return;
  wanted.forEach(newChart);
  charts.forEach((chart) => chart.resize()); // widths once every chart has its grid cell
  document.getElementById("charts-empty").hidden = true;
  const needed = wanted.flatMap((key) => charts.get(key).members);
  const series = await fetchSeries(config.metrics_url, needed, config.max_points);
  wanted.forEach((key) => {
    if (!charts.has(key)) return;
    membersOf(key).forEach((name, i) => { if (series[name]) charts.get(key).set(i, series[name]); });
  });
}

function syncCharts() {
  const shown = shownNames();
  for (const [name, chart] of charts) if (!shown.includes(name)) { chart.destroy(); charts.delete(name); }
  addCharts(shown);
}

function addPickerEntry(value, checked) {
  const label = document.createElement("label");
  label.className = "check";
  const input = document.createElement("input");
  input.type = "checkbox"; input.value = value; input.checked = checked;
  label.append(input, " " + value);
  picker.appendChild(label);
  if (checked) addCharts([value]);
}

function addMetricName(name) {
  if (names.has(name)) return;
  names.add(name);
  const group = groupOf(name);
  if (!group) {
    // A run's first metrics are shown as they appear, up to the usual number of charts.
    addPickerEntry(name, charts.size < 5);
    return;
  }
  const first = group.names.length === 0;
  group.names.push(name);
  if (first) addPickerEntry(group.title, true); // a group is shown from its first member on
  else if (charts.has(group.title)) {
    const chart = charts.get(group.title);
    chart.members.push(name);
    chart.addLine({ label: memberLabel(group, name) });
  }
}

// Where a metric's live points go: [chart, line index], or null when it is not shown.
function lineOf(name) {
  const group = groupOf(name);
  const chart = charts.get(group ? group.title : name);
  if (!chart) return null;
  const i = chart.members.indexOf(name);
  return i < 0 ? null : [chart, i];
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
  window.runClock.setTimes(document.querySelector('#run-duration [data-field="duration"]'), run);
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

// "probe": a checkpoint's probe answers were stored (runs/probes.py).
const PANEL_EVENTS = new Set(["checkpoint", "sample", "eval_result", "report", "end", "stage", "probe"]);

function onFrame(msg) {
  if (msg.type !== "run") return;
  if (msg.run) showRun(msg.run);
  for (const [name, rows] of Object.entries(msg.metrics || {})) {
    addMetricName(name);
    const line = lineOf(name);
    if (line) line[0].append(line[1], rows);
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
    for (const chart of charts.values()) {
      fetchSeries(config.metrics_url, chart.members, config.max_points)
        .then((s) => chart.members.forEach((name, i) => { if (s[name]) chart.set(i, s[name]); }));
    }
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
