// Compare runs: for each chosen metric, one chart with a line per run. x = step, training
// tokens or training FLOPs (so runs of different batch sizes and model families line up by how
// much they trained), or seconds since each run's first point.
import { MetricChart, fetchSeries } from "./charts.js";

const config = JSON.parse(document.getElementById("compare-config").textContent);
const container = document.getElementById("charts");
const xAxis = document.getElementById("x-axis");
const note = document.getElementById("x-axis-note");
const charts = [];
const KEYS = { tokens: "tokens_per_step", flops: "flops_per_step" };

function setMode(mode) {
  charts.forEach((c) => c.setMode(mode));
  const missing = mode in KEYS ? config.runs.filter((r) => !r[KEYS[mode]]) : [];
  note.hidden = missing.length === 0;
  note.textContent = missing.length
    ? "Not drawn on this axis (no " + (mode === "flops" ? "FLOPs per token" : "batch size") + " in their start event): " + missing.map((r) => r.label).join(", ")
    : "";
  document.body.dataset.compareAxis = mode;
}

async function load() {
  const lines = config.runs.map((r) => ({ label: r.label, tokens_per_step: r.tokens_per_step, flops_per_step: r.flops_per_step }));
  config.metrics.forEach((name) => charts.push(new MetricChart(container, name, lines, xAxis.value)));
  charts.forEach((chart) => chart.resize()); // widths once every chart has its grid cell
  await Promise.all(config.runs.map(async (run, i) => {
    const series = await fetchSeries(config.metrics_url.replace("{id}", run.id), config.metrics, config.max_points);
    charts.forEach((chart) => { if (series[chart.title]) chart.set(i, series[chart.title]); });
  }));
  setMode(xAxis.value);
  document.body.dataset.compareLoaded = "1";
}

xAxis.addEventListener("change", () => {
  setMode(xAxis.value);
  // The axis travels with the form and the address, so a comparison can be shared as a link.
  const field = document.querySelector('#compare-pick input[name="x"]');
  if (field) field.value = xAxis.value;
  const url = new URL(window.location.href);
  url.searchParams.set("x", xAxis.value);
  window.history.replaceState(null, "", url);
});
window.addEventListener("resize", () => charts.forEach((c) => c.resize()));
load();
