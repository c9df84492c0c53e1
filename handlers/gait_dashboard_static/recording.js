// The recording page: force signals from the lake, per-window probabilities of its diagnosis.
"use strict";
(function () {
  const { api, el, svg, clear, int } = GF;
  const recording = document.getElementById("recording").dataset.recording;
  const base = "/api/recordings/" + encodeURIComponent(recording);
  const COLORS = { L: "#2563eb", R: "#e11d48" };
  let signals = null, diagnosis = null;
  let zoom = null;            // [start, end] seconds, or null for the whole recording
  let signalsSeq = 0;

  function fact(label, value, sub, kind) {
    return el("div", { class: "card" + (kind ? " " + kind : "") }, el("div", { class: "card-label" }, label),
      el("div", { class: "card-value" }, value), el("div", { class: "card-sub" }, sub || ""));
  }

  // the model's decision threshold, sent with each diagnosis (0.5 for older ones)
  function threshold(d) {
    return d && typeof d.threshold === "number" ? d.threshold : 0.5;
  }

  function drawFacts() {
    const box = clear(document.getElementById("facts"));
    const d = diagnosis;
    const truth = document.getElementById("truth");
    const t = (d && d.truth) || ({ Co: "control", Pt: "parkinson" })[recording.slice(2, 4)];
    truth.textContent = t ? "true label: " + t : "";
    truth.className = "badge outline " + (t || "");
    if (d) {
      const right = d.truth ? d.label === d.truth : null;
      box.append(
        fact("diagnosis", d.label, right === null ? "" : right ? "matches the true label" : "differs from the true label",
          right === null ? "" : right ? "ok" : "bad"),
        fact("P(parkinson)", d.probability.toFixed(3), "decision threshold " + threshold(d).toFixed(3)),
        fact("model", d.model_version || "–", `${int(d.n_windows)} windows`),
        fact("diagnosed at", d.diagnosed_at ? new Date(d.diagnosed_at).toISOString().slice(11, 19) : "–",
          d.diagnosed_at ? new Date(d.diagnosed_at).toISOString().slice(0, 10) + " UTC" : ""));
    }
    if (signals) {
      box.append(fact("samples", int(signals.rows), `seq ${int(signals.seq_first)}–${int(signals.seq_last)}`),
        fact("duration", signals.duration_s.toFixed(1) + " s", `${signals.files} lake file${signals.files > 1 ? "s" : ""}`));
    }
  }

  function drawSignals() {
    if (!signals) return;
    const s = signals;
    Plot.lines(document.getElementById("force"), {
      x: s.time, xTitle: "time (s)", yTitle: "force (N)",
      series: ["L", "R"].map((k) => ({ name: k, color: COLORS[k], y: s[k].mean, lo: s[k].min, hi: s[k].max })),
    });
    document.getElementById("force-hint").textContent =
      `${int(s.rows)} samples shown as ${int(s.time.length)} points (mean, band = min–max)`;
    document.getElementById("zoom-range").textContent = zoom
      ? `showing ${s.time[0].toFixed(1)}–${s.time[s.time.length - 1].toFixed(1)} s of ${s.full_end.toFixed(1)} s` : "";
    const hm = s.heatmap;
    Plot.heatmap(document.getElementById("heatmap"), {
      x: hm.time, rows: hm.sensors, values: hm.values, max: hm.max, xTitle: "time (s)",
      split: hm.sensors.filter((n) => n[0] === "L").length,
    });
    clear(document.getElementById("heat-legend")).append(Plot.scale(hm.max, "N"));
  }

  function drawWindows() {
    const box = clear(document.getElementById("windows"));
    const msg = document.getElementById("windows-msg");
    const probs = (diagnosis && diagnosis.window_probabilities) || [];
    msg.hidden = probs.length > 0;
    if (!probs.length) {
      msg.textContent = diagnosis ? "the diagnosis holds no window probabilities" : "no diagnosis yet";
      return;
    }
    const W = Math.max(300, box.getBoundingClientRect().width), H = 190;
    const m = { l: 58, r: 14, t: 10, b: 34 };
    const pw = W - m.l - m.r, ph = H - m.t - m.b;
    const bw = pw / probs.length;
    const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "windows-svg",
      role: "img", "aria-label": "probability of parkinson per window" });
    const thr = threshold(diagnosis);
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      const y = m.t + ph * (1 - v);
      root.append(svg("line", { x1: m.l, x2: W - m.r, y1: y, y2: y, class: "gridline" }),
        svg("text", { x: m.l - 6, y: y + 4, class: "tick", "text-anchor": "end" }, v.toFixed(2)));
    }
    probs.forEach((p, i) => {
      const y = m.t + ph * (1 - p);
      root.append(svg("rect", { x: m.l + i * bw + Math.min(1, bw * 0.1), y, width: Math.max(1, bw - Math.min(2, bw * 0.2)),
        height: Math.max(0.5, m.t + ph - y), class: "wbar " + (p >= thr ? "parkinson" : "control"),
        dataset: { window: i, p: p.toFixed(4) } }, svg("title", {}, `window ${i}: ${p.toFixed(3)}`)));
    });
    const step = Math.max(1, Math.ceil(probs.length / Math.floor(pw / 40)));
    for (let i = 0; i < probs.length; i += step) {
      root.append(svg("text", { x: m.l + (i + 0.5) * bw, y: H - m.b + 16, class: "tick", "text-anchor": "middle" }, String(i)));
    }
    const ty = m.t + ph * (1 - thr);  // drawn over the bars
    root.append(svg("line", { x1: m.l, x2: W - m.r, y1: ty, y2: ty, class: "threshold", dataset: { threshold: thr } }));
    root.append(svg("text", { x: W - m.r, y: H - 4, class: "tick", "text-anchor": "end" }, "window"));
    box.append(root);
    const above = probs.filter((p) => p >= thr).length;
    document.getElementById("windows-hint").textContent =
      `${probs.length} windows · ${above} at or above the threshold ${thr.toFixed(3)} · ` +
      `recording probability ${diagnosis.probability.toFixed(3)}`;
  }

  function signalsUrl() {
    const q = new URLSearchParams({ points: "1000", heat: "300" });
    if (zoom) { q.set("start", zoom[0].toFixed(3)); q.set("end", zoom[1].toFixed(3)); }
    return base + "/signals?" + q.toString();
  }

  /** Re-read the signals for the current zoom and redraw the plots. */
  async function reloadSignals() {
    const mine = ++signalsSeq;
    document.body.dataset.loaded = "false";
    try {
      const s = await api(signalsUrl());
      if (mine === signalsSeq) { signals = s; drawSignals(); }
    } catch (e) {
      if (mine === signalsSeq) GF.setConn("error: " + e.message, "bad");
    } finally {
      if (mine === signalsSeq) document.body.dataset.loaded = "true";
    }
  }

  function setZoom(range) {
    if (range && signals) {
      const [a, b] = [Math.max(signals.full_start, range[0]), Math.min(signals.full_end, range[1])];
      zoom = b - a >= 0.2 ? [a, b] : null;
    } else {
      zoom = null;
    }
    reloadSignals();
  }

  // drag across a plot to zoom on that time range
  function wireZoom(canvas) {
    const sel = canvas.parentElement.querySelector(".sel");
    let from = null;
    const xOf = (ev) => ev.clientX - canvas.getBoundingClientRect().left;
    const clamp = (x) => Math.min(canvas.plotMap.r, Math.max(canvas.plotMap.l, x));
    canvas.addEventListener("mousedown", (ev) => {
      if (!canvas.plotMap) return;
      from = clamp(xOf(ev));
      sel.hidden = false; sel.style.left = from + "px"; sel.style.width = "0px";
    });
    window.addEventListener("mousemove", (ev) => {
      if (from === null) return;
      const x = clamp(xOf(ev));
      sel.style.left = Math.min(from, x) + "px"; sel.style.width = Math.abs(x - from) + "px";
    });
    window.addEventListener("mouseup", (ev) => {
      if (from === null) return;
      const x = clamp(xOf(ev)), m = canvas.plotMap;
      sel.hidden = true;
      const t = (px) => m.x0 + ((px - m.l) / (m.r - m.l)) * (m.x1 - m.x0);
      if (Math.abs(x - from) >= 5) setZoom([t(Math.min(from, x)), t(Math.max(from, x))]);
      from = null;
    });
    canvas.addEventListener("dblclick", () => setZoom(null));
  }
  ["force", "heatmap"].forEach((id) => wireZoom(document.getElementById(id)));
  document.querySelectorAll("[data-zoom]").forEach((b) => b.addEventListener("click", () => {
    const v = b.dataset.zoom;
    setZoom(v === "all" || !signals ? null : [signals.full_start, signals.full_start + parseFloat(v)]);
  }));

  async function load() {
    const failures = [];
    const [d, s] = await Promise.allSettled([api(base + "/diagnosis"), api(signalsUrl())]);
    diagnosis = d.status === "fulfilled" ? d.value : null;
    signals = s.status === "fulfilled" ? s.value : null;
    const forceMsg = document.getElementById("force-msg");
    forceMsg.hidden = !!signals;
    if (!signals) forceMsg.textContent = "force signals unavailable: " + s.reason.message;
    if (d.status === "rejected" && d.reason.status !== 404) failures.push(d.reason.message);
    if (s.status === "rejected" && s.reason.status !== 404) failures.push(s.reason.message);
    const unauthorized = [d, s].some((r) => r.status === "rejected" && r.reason instanceof GF.Unauthorized);
    GF.setConn(unauthorized ? "sign in" : failures.length ? "error" : "loaded",
      unauthorized || failures.length ? "bad" : "ok");
    drawFacts();
    drawSignals();
    drawWindows();
    document.body.dataset.loaded = "true";
  }

  let resize = null;
  window.addEventListener("resize", () => {
    clearTimeout(resize);
    resize = setTimeout(() => { drawSignals(); drawWindows(); }, 150);
  });
  GF.onAuth(load);
  load();
})();
