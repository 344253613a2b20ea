// Compare page, scaling view: for each (metric, x) pair the server fitted, a log–log scatter
// of the runs, one colour per model family, with that family's fitted power law as a dashed
// line (a straight line on these axes). The numbers come from runs/scaling.py (chart_data).
import uPlot from "../vendor/uplot/uPlot.esm.js";
import { fmtAmount } from "./charts.js";

const COLORS = { gpt: "#3158d4", gpt2: "#d9480f", hybrid: "#16794c" };
const OTHER = ["#9c36b5", "#c92a2a", "#0b7285"];
const charts = JSON.parse(document.getElementById("scaling-data").textContent);
const container = document.getElementById("scaling-charts");
const plots = [];

function colour(family, i) {
  return COLORS[family] || OTHER[i % OTHER.length];
}

// [xs, ys] sorted by x, as uPlot.join wants each table.
function table(xs, ys) {
  const order = xs.map((x, i) => i).sort((a, b) => xs[a] - xs[b]);
  return [order.map((i) => xs[i]), order.map((i) => ys[i])];
}

function width(el) {
  return Math.max(280, Math.floor(el.clientWidth || el.parentElement.clientWidth || 600));
}

function draw(chart) {
  const el = document.createElement("div");
  el.className = "chart";
  el.dataset.scaling = chart.metric + "/" + chart.axis;
  container.appendChild(el);
  const series = [{ label: chart.x_label, value: (u, v) => fmtAmount(v) }];
  const tables = [];
  chart.families.forEach((f, i) => {
    const stroke = colour(f.family, i);
    series.push({ label: f.family, stroke, paths: () => null, points: { show: true, size: 8, fill: stroke } });
    tables.push(table(f.x, f.y));
    if (f.fit) {
      series.push({ label: f.family + " fit", stroke, width: 1.5, dash: [6, 4], spanGaps: true, points: { show: false } });
      tables.push(table(f.fit.x, f.fit.y));
    }
  });
  const opts = {
    title: chart.title,
    width: width(el),
    height: 240,
    scales: { x: { time: false, distr: 3 }, y: { distr: 3 } },
    series,
    axes: [{ values: (u, splits) => splits.map(fmtAmount) }, { size: 60, label: chart.y_label }],
    legend: { live: false },
  };
  const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
  el.dataset.points = String(chart.families.reduce((n, f) => n + f.x.length, 0));
  plots.push({ el, plot: new uPlot(opts, data, el) });
}

charts.forEach(draw);
window.addEventListener("resize", () => plots.forEach(({ el, plot }) => plot.setSize({ width: width(el), height: 240 })));
document.body.dataset.scalingLoaded = "1";
