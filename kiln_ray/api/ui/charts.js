// A line chart drawn on a <canvas>: several series of [x, y] points sharing one y axis that
// starts at 0 and has four equal, round steps. A y of null breaks the line (no data in that
// interval).

const PAD = { left: 52, right: 12, top: 22, bottom: 22 };

export class LineChart {
  // series: [{label, color}]; xLabel(x) formats an x tick; yUnit is appended to y values.
  constructor(canvas, { series, xLabel = (x) => String(x), yUnit = "" }) {
    this.canvas = canvas;
    this.series = series;
    this.xLabel = xLabel;
    this.yUnit = yUnit;
    this.points = series.map(() => []);
    this.xRange = null;
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  // points: one list of [x, y] per series; xRange: [min, max] or null to fit the data.
  setData(points, xRange = null) {
    this.points = points;
    this.xRange = xRange;
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";

    const [x0, x1] = this.xRange || fitRange(this.points.flat().map((p) => p[0]));
    const yStep = niceCeiling(Math.max(0, ...this.points.flat().map((p) => p[1] ?? 0)) / 4);
    const yMax = 4 * yStep;
    this.digits = Math.max(0, -Math.floor(Math.log10(yStep)));
    const plotW = width - PAD.left - PAD.right;
    const plotH = height - PAD.top - PAD.bottom;
    const px = (x) => PAD.left + ((x - x0) / (x1 - x0 || 1)) * plotW;
    const py = (y) => PAD.top + plotH - (y / yMax) * plotH;

    this.drawAxes(ctx, x0, x1, yMax, px, py, plotW);
    this.points.forEach((points, i) => drawLine(ctx, points, this.series[i].color, px, py));
    this.drawLegend(ctx);
  }

  drawAxes(ctx, x0, x1, yMax, px, py, plotW) {
    ctx.strokeStyle = "#e3e6ea";
    ctx.fillStyle = "#6b7280";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i += 1) {
      const y = (yMax * i) / 4;
      ctx.beginPath();
      ctx.moveTo(PAD.left, py(y));
      ctx.lineTo(PAD.left + plotW, py(y));
      ctx.stroke();
      ctx.fillText(`${y.toFixed(this.digits)}${this.yUnit}`, PAD.left - 6, py(y));
    }
    ctx.textBaseline = "top";
    const bottom = py(0) + 5;
    ctx.textAlign = "left";
    ctx.fillText(this.xLabel(x0), PAD.left, bottom);
    ctx.textAlign = "right";
    ctx.fillText(this.xLabel(x1), PAD.left + plotW, bottom);
  }

  drawLegend(ctx) {
    let x = PAD.left;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    this.series.forEach((s, i) => {
      const last = [...this.points[i]].reverse().find((p) => p[1] !== null);
      const text = last ? `${s.label} ${last[1].toFixed(this.digits + 1)}${this.yUnit}` : `${s.label} —`;
      ctx.fillStyle = s.color;
      ctx.fillRect(x, 7, 10, 10);
      ctx.fillStyle = "#1f2933";
      ctx.fillText(text, x + 14, 12);
      x += ctx.measureText(text).width + 30;
    });
  }
}

function drawLine(ctx, points, color, px, py) {
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.lineWidth = 1.8;
  ctx.beginPath();
  let drawing = false;
  for (const [x, y] of points) {
    if (y === null) {
      drawing = false;
      continue;
    }
    if (drawing) ctx.lineTo(px(x), py(y));
    else ctx.moveTo(px(x), py(y));
    drawing = true;
  }
  ctx.stroke();
  // A lone point between gaps would be invisible as a line: mark every point when they are few.
  if (points.length <= 60) {
    for (const [x, y] of points) {
      if (y === null) continue;
      ctx.beginPath();
      ctx.arc(px(x), py(y), 2, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
}

function fitRange(xs) {
  if (!xs.length) return [0, 1];
  const lo = Math.min(...xs);
  const hi = Math.max(...xs);
  return lo === hi ? [lo, lo + 1] : [lo, hi];
}

// The smallest 1, 2 or 5 x 10^k at or above `value` (0.5 when there is nothing to show).
function niceCeiling(value) {
  if (!(value > 0)) return 0.5;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}
