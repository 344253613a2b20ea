// Compare runs: for each chosen metric, one chart with a line per run (x = step, or seconds
// since each run's first point so runs started at different times line up).
import { MetricChart, fetchSeries } from "./charts.js";

const config = JSON.parse(document.getElementById("compare-config").textContent);
const container = document.getElementById("charts");
const xAxis = document.getElementById("x-axis");
const charts = [];

async function load() {
  const lines = config.runs.map((r) => ({ label: r.label }));
  config.metrics.forEach((name) => charts.push(new MetricChart(container, name, lines, "step")));
  charts.forEach((chart) => chart.resize()); // widths once every chart has its grid cell
  await Promise.all(config.runs.map(async (run, i) => {
    const series = await fetchSeries(config.metrics_url.replace("{id}", run.id), config.metrics, config.max_points);
    charts.forEach((chart) => { if (series[chart.title]) chart.set(i, series[chart.title]); });
  }));
  document.body.dataset.compareLoaded = "1";
}

xAxis.addEventListener("change", () => charts.forEach((c) => c.setMode(xAxis.value === "step" ? "step" : "elapsed")));
window.addEventListener("resize", () => charts.forEach((c) => c.resize()));
load();
