// A small canvas plotter, no dependencies: line charts with min-max bands, heatmaps, axes.
// Exposed as window.Plot.
"use strict";
(function () {
  const FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
  const AXIS = "#667085", GRID = "#e9edf2";
  // perceptually ordered stops (viridis-like), low -> high
  const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  /** Size the canvas backing store to its CSS box and the device pixel ratio. */
  function prepare(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(200, canvas.getBoundingClientRect().width);
    const h = parseFloat(canvas.getAttribute("height")) || 240;
    canvas.style.height = h + "px";
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = FONT;
    return { ctx, w, h };
  }

  /** About `count` round tick values covering [min, max]. */
  function ticks(min, max, count = 6) {
    if (!(max > min)) return [min];
    const raw = (max - min) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  function label(v) {
    const a = Math.abs(v);
    if (a >= 1000) return (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k";
    return String(+v.toFixed(a >= 100 ? 0 : 2));  // 3.25 stays 3.25, 3.0 becomes 3
  }

  function axes(ctx, box, xs, ys, xTitle, yTitle) {
    const { l, t, r, b } = box;
    ctx.lineWidth = 1;
    ctx.strokeStyle = GRID;
    ctx.fillStyle = AXIS;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const [v, y] of ys) {
      ctx.beginPath(); ctx.moveTo(l, y + 0.5); ctx.lineTo(r, y + 0.5); ctx.stroke();
      ctx.fillText(label(v), l - 6, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const [v, x] of xs) {
      ctx.beginPath(); ctx.moveTo(x + 0.5, b); ctx.lineTo(x + 0.5, b + 4); ctx.strokeStyle = AXIS; ctx.stroke();
      ctx.fillText(label(v), x, b + 6);
    }
    ctx.strokeStyle = AXIS;
    ctx.beginPath(); ctx.moveTo(l, b + 0.5); ctx.lineTo(r, b + 0.5); ctx.stroke();
    if (xTitle) { ctx.textAlign = "right"; ctx.fillText(xTitle, r, b + 20); }
    if (yTitle) {
      ctx.save(); ctx.translate(12, (t + b) / 2); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center"; ctx.textBaseline = "middle"; ctx.fillText(yTitle, 0, 0); ctx.restore();
    }
  }

  /**
   * lines(canvas, {x: [...], series: [{name, color, y, lo, hi}], xTitle, yTitle})
   * Draws each series' min-max band (lo..hi) under its mean line y.
   */
  function lines(canvas, opts) {
    const { ctx, w, h } = prepare(canvas);
    const box = { l: 58, t: 10, r: w - 14, b: h - 38 };
    const x = opts.x;
    const x0 = x[0], x1 = x[x.length - 1];
    let ymax = 0;
    for (const s of opts.series) for (const v of (s.hi || s.y)) if (v > ymax) ymax = v;
    ymax = ymax > 0 ? ymax * 1.05 : 1;
    const px = (v) => box.l + ((v - x0) / (x1 - x0 || 1)) * (box.r - box.l);
    const py = (v) => box.b - (v / ymax) * (box.b - box.t);
    axes(ctx, box, ticks(x0, x1, Math.max(4, Math.floor(w / 90))).map((v) => [v, px(v)]),
      ticks(0, ymax, 5).filter((v) => v <= ymax).map((v) => [v, py(v)]), opts.xTitle, opts.yTitle);
    ctx.save();
    ctx.beginPath(); ctx.rect(box.l, box.t, box.r - box.l, box.b - box.t); ctx.clip();
    for (const s of opts.series) {
      if (s.lo && s.hi) {
        ctx.beginPath();
        s.hi.forEach((v, i) => (i ? ctx.lineTo(px(x[i]), py(v)) : ctx.moveTo(px(x[i]), py(v))));
        for (let i = s.lo.length - 1; i >= 0; i--) ctx.lineTo(px(x[i]), py(s.lo[i]));
        ctx.closePath();
        ctx.globalAlpha = 0.16; ctx.fillStyle = s.color; ctx.fill(); ctx.globalAlpha = 1;
      }
      ctx.beginPath();
      s.y.forEach((v, i) => (i ? ctx.lineTo(px(x[i]), py(v)) : ctx.moveTo(px(x[i]), py(v))));
      ctx.lineWidth = 1.4; ctx.strokeStyle = s.color; ctx.lineJoin = "round"; ctx.stroke();
    }
    ctx.restore();
    canvas.plotMap = { l: box.l, r: box.r, x0, x1 };
    canvas.dataset.points = String(x.length);
    canvas.dataset.series = opts.series.map((s) => s.name).join(",");
  }

  function color(t) {
    t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
    return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
  }

  /** heatmap(canvas, {x: [...], rows: ["L1", ...], values: [[row values]], max, split}) */
  function heatmap(canvas, opts) {
    const { ctx, w, h } = prepare(canvas);
    const box = { l: 58, t: 6, r: w - 14, b: h - 38 };
    const rows = opts.rows.length, cols = opts.x.length;
    const img = document.createElement("canvas");
    img.width = cols; img.height = rows;
    const ictx = img.getContext("2d");
    const data = ictx.createImageData(cols, rows);
    const max = opts.max > 0 ? opts.max : 1;
    opts.values.forEach((row, r) => row.forEach((v, c) => {
      const [R, G, B] = color(v / max);
      const o = 4 * (r * cols + c);
      data.data[o] = R; data.data[o + 1] = G; data.data[o + 2] = B; data.data[o + 3] = 255;
    }));
    ictx.putImageData(data, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, box.l, box.t, box.r - box.l, box.b - box.t);
    const x0 = opts.x[0], x1 = opts.x[cols - 1];
    const px = (v) => box.l + ((v - x0) / (x1 - x0 || 1)) * (box.r - box.l);
    const rh = (box.b - box.t) / rows;
    ctx.fillStyle = AXIS; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    opts.rows.forEach((name, r) => ctx.fillText(name, box.l - 6, box.t + (r + 0.5) * rh));
    if (opts.split) {
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(box.l, box.t + opts.split * rh); ctx.lineTo(box.r, box.t + opts.split * rh); ctx.stroke();
    }
    axes(ctx, box, ticks(x0, x1, Math.max(4, Math.floor(w / 90))).map((v) => [v, px(v)]), [],
      opts.xTitle, "");
    canvas.plotMap = { l: box.l, r: box.r, x0, x1 };
    canvas.dataset.rows = String(rows);
    canvas.dataset.cols = String(cols);
  }

  /** A small horizontal colour scale (a canvas) for a heatmap's legend. */
  function scale(max, unit) {
    const c = document.createElement("canvas");
    c.width = 120; c.height = 10; c.className = "scale";
    const ctx = c.getContext("2d");
    for (let i = 0; i < 120; i++) { const [r, g, b] = color(i / 119); ctx.fillStyle = `rgb(${r},${g},${b})`; ctx.fillRect(i, 0, 1, 10); }
    const wrap = document.createElement("span");
    wrap.className = "scale-wrap";
    wrap.append("0 ", c, ` ${label(max)} ${unit}`);
    return wrap;
  }

  window.Plot = { lines, heatmap, scale, ticks, color };
})();
