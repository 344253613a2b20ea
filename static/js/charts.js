// Metric charts on uPlot: one chart per metric, one line per run, x = step or time.
// The server downsamples long series (min and max per bucket), so a 50k-step run arrives as
// about a thousand points per metric; live points are appended and redrawn once per frame.
import uPlot from "../vendor/uplot/uPlot.esm.js";

const COLORS = ["#3158d4", "#d9480f", "#16794c", "#9c36b5", "#c92a2a", "#0b7285", "#5f3dc4", "#e67700"];

// The chart's own grid cell decides its width (a chart never overflows into its neighbour).
function chartWidth(el) {
  return Math.max(280, Math.floor(el.clientWidth || el.parentElement.clientWidth || 600));
}

export class MetricChart {
  // lines: [{label}], xMode: "step" | "time" | "elapsed"
  constructor(container, title, lines, xMode) {
    this.title = title;
    this.lines = lines;
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
    const opts = {
      title: this.title,
      width: chartWidth(this.el),
      height: 220,
      scales: { x: { time: this.xMode === "time" } },
      series: [
        { label: this.xMode === "step" ? "step" : this.xMode === "time" ? "time" : "seconds" },
        ...this.lines.map((line, i) => ({
          // uPlot's default marks the points only while a series is sparse (e.g. val bpb).
          label: line.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
        })),
      ],
      axes: [{}, { size: 60 }],
      legend: { show: this.lines.length > 1 },
    };
    this.plot = new uPlot(opts, this.data(), this.el);
  }

  setMode(xMode) {
    this.xMode = xMode;
    this.build();
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

  xs(p) {
    if (this.xMode === "step") return p.step;
    if (this.xMode === "time") return p.time;
    const t0 = p.time.length ? p.time[0] : 0;
    return p.time.map((t) => t - t0);
  }

  data() {
    if (this.lines.length === 1) {
      const p = this.points[0];
      return [this.xs(p), p.value];
    }
    return uPlot.join(this.points.map((p) => [this.xs(p), p.value]));
  }

  redraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.plot.setData(this.data());
      this.el.dataset.points = String(this.count);
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
