// Metric charts on uPlot: one chart per metric (or group of metrics), one line per run (or
// member), x = step, time, seconds since the first point, or training tokens / FLOPs (step x
// the line's tokens_per_step / flops_per_step, which the server works out).
// The server downsamples long series (min and max per bucket), so a 50k-step run arrives as
// about a thousand points per metric; live points are appended and redrawn once per frame.
import uPlot from "../vendor/uplot/uPlot.esm.js";

const COLORS = ["#3158d4", "#d9480f", "#16794c", "#9c36b5", "#c92a2a", "#0b7285", "#5f3dc4", "#e67700"];

const X_LABELS = { step: "step", time: "time", elapsed: "seconds", tokens: "tokens", flops: "FLOPs" };
// Per-step multipliers of the lines for the x modes that scale steps.
const X_SCALES = { tokens: "tokens_per_step", flops: "flops_per_step" };

// 1.5M, 3.2G, 4.9e18: short tick labels for token and FLOP counts.
export function fmtAmount(value) {
  if (value == null) return "";
  const abs = Math.abs(value);
  if (abs >= 1e15) return value.toExponential(1).replace("+", "");
  for (const [div, unit] of [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (abs >= div) return +(value / div).toFixed(2) + unit;
  }
  return String(+value.toFixed(2));
}

// The chart's own grid cell decides its width (a chart never overflows into its neighbour).
function chartWidth(el) {
  return Math.max(280, Math.floor(el.clientWidth || el.parentElement.clientWidth || 600));
}

export class MetricChart {
  // lines: [{label, tokens_per_step?, flops_per_step?}],
  // xMode: "step" | "time" | "elapsed" | "tokens" | "flops"
  constructor(container, title, lines, xMode) {
    this.title = title;
    this.lines = lines.map((line) => ({ ...line }));
    this.xMode = xMode;
    this.points = lines.map(() => ({ step: [], time: [], value: [] }));
    this.el = document.createElement("div");
    this.el.className = "chart";
    this.el.dataset.metric = title;
    container.appendChild(this.el);
    this.pending = false;
    this.plot = null;
    this.build();
  }

  build() {
    if (this.plot) this.plot.destroy();
    const amounts = this.xMode in X_SCALES;
    const opts = {
      title: this.title,
      width: chartWidth(this.el),
      height: 220,
      scales: { x: { time: this.xMode === "time" } },
      series: [
        amounts ? { label: X_LABELS[this.xMode], value: (u, v) => fmtAmount(v) } : { label: X_LABELS[this.xMode] },
        ...this.lines.map((line, i) => ({
          // uPlot's default marks the points only while a series is sparse (e.g. val bpb).
          label: line.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
        })),
      ],
      axes: [amounts ? { values: (u, splits) => splits.map(fmtAmount) } : {}, { size: 60 }],
      legend: { show: this.lines.length > 1 },
    };
    const data = this.data();
    this.plot = new uPlot(opts, data, this.el);
    this.mark(data);
  }

  // What the chart shows, for tests and curious readers: points drawn, the largest x.
  mark(data) {
    this.el.dataset.points = String(this.count);
    const xs = data[0];
    this.el.dataset.xMax = xs.length ? String(xs[xs.length - 1]) : "";
  }

  setMode(xMode) {
    this.xMode = xMode;
    this.build();
  }

  // A new line (e.g. a layer that reported for the first time): its index.
  addLine(line) {
    this.lines.push(line);
    this.points.push({ step: [], time: [], value: [] });
    this.build();
    return this.lines.length - 1;
  }

  // line i gets points {step: [...], value: [...], time: [...]} (replacing or appending)
  set(i, series) { this.points[i] = { step: [...series.step], time: [...series.time], value: [...series.value] }; this.redraw(); }

  append(i, rows) {
    const p = this.points[i];
    const last = p.step.length ? p.step[p.step.length - 1] : -Infinity;
    for (const [step, value, time] of rows) {
      if (step <= last) continue; // already drawn (e.g. by the initial fetch)
      p.step.push(step); p.value.push(value); p.time.push(time);
    }
    this.redraw();
  }

  get count() { return this.points.reduce((n, p) => n + p.step.length, 0); }

  // Line i's x values; null when its run cannot be placed on this axis (no batch size known).
  xs(p, i) {
    if (this.xMode === "step") return p.step;
    if (this.xMode === "time") return p.time;
    if (this.xMode in X_SCALES) {
      const k = this.lines[i][X_SCALES[this.xMode]];
      return k ? p.step.map((s) => s * k) : null;
    }
    const t0 = p.time.length ? p.time[0] : 0;
    return p.time.map((t) => t - t0);
  }

  table(i) {
    const p = this.points[i];
    const x = this.xs(p, i);
    return x ? [x, p.value] : [[], []];
  }

  data() {
    if (this.lines.length === 1) return this.table(0);
    return uPlot.join(this.lines.map((line, i) => this.table(i)));
  }

  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      const data = this.data();
      this.plot.setData(data);
      this.mark(data);
    });
  }

  resize() { this.plot.setSize({ width: chartWidth(this.el), height: 220 }); }

  destroy() { this.plot.destroy(); this.el.remove(); }
}

export async function fetchSeries(url, names, maxPoints) {
  const query = new URLSearchParams({ names: names.join(","), max_points: String(maxPoints) });
  const response = await fetch(url + "?" + query, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error("metrics: HTTP " + response.status);
  return (await response.json()).series;
}
