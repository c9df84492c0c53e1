// The pipeline page: polls /dashboard/api/state, draws the graph (SVG, laid out here),
// the summary cards, the handler table and the handler-specific status.
"use strict";
(function () {
  const { api, el, svg, clear, int, si, rate, duration } = GF;
  const params = new URLSearchParams(location.search);
  const INTERVAL = Math.max(0.5, parseFloat(params.get("interval")) || 1.5) * 1000;
  const TREND = 40;           // polls kept for the sparklines
  const NODE = { w: 200, h: 80, gx: 70, gy: 22, m: 14 };

  let prev = null;            // previous state, for rates
  let rates = {};             // last computed rates
  let layout = null;          // computed once: the set of handlers is frozen at start
  let selected = null;        // handler whose settings are shown
  let last = null;            // latest state
  const trend = {};           // name -> recent rows/s
  let openDetails = new Set(); // folded status values the user opened
  let timer = null;

  // -- graph layout: columns by longest path from the sources, barycenter ordering --
  function computeLayout(handlers) {
    const names = Object.keys(handlers);
    const pred = Object.fromEntries(names.map((n) => [n, []]));
    const edges = [];
    for (const n of names) {
      for (const [output, targets] of Object.entries(handlers[n].outputs || {})) {
        for (const t of targets) {
          if (!(t in pred)) continue;
          edges.push({ from: n, to: t, output, dl: false });
          pred[t].push(n);
        }
      }
    }
    for (const n of names) {
      const t = handlers[n].dead_letter;
      if (t && t in pred) edges.push({ from: n, to: t, output: "dead letters", dl: true });
    }
    const layer = {};
    const depth = (n, seen) => {
      if (n in layer) return layer[n];
      if (seen.has(n)) return 0;
      seen.add(n);
      const l = pred[n].length ? Math.max(...pred[n].map((p) => depth(p, seen) + 1)) : 0;
      seen.delete(n);
      return (layer[n] = l);
    };
    names.forEach((n) => depth(n, new Set()));
    // a sink fed only dead letters goes to the last column
    const dlOnly = new Set(edges.filter((e) => e.dl).map((e) => e.to)
      .filter((n) => !pred[n].length && handlers[n].kind !== "source"));
    let last = Math.max(0, ...names.filter((n) => !dlOnly.has(n)).map((n) => layer[n]));
    dlOnly.forEach((n) => { layer[n] = Math.max(last, 1); });
    last = Math.max(0, ...names.map((n) => layer[n]));
    const columns = Array.from({ length: last + 1 }, () => []);
    names.filter((n) => !dlOnly.has(n)).forEach((n) => columns[layer[n]].push(n));
    dlOnly.forEach((n) => columns[layer[n]].push(n));
    const index = {};
    const reindex = () => columns.forEach((c) => c.forEach((n, i) => { index[n] = i; }));
    reindex();
    for (let pass = 0; pass < 3; pass++) {
      for (let l = 1; l <= last; l++) {
        const bary = (n) => dlOnly.has(n) ? Infinity
          : pred[n].reduce((s, p) => s + index[p], 0) / Math.max(1, pred[n].length);
        columns[l].sort((a, b) => bary(a) - bary(b));
        reindex();
      }
    }
    const { w, h, gx, gy, m } = NODE;
    const rows = Math.max(...columns.map((c) => c.length));
    const height = 2 * m + rows * h + (rows - 1) * gy + 16;
    // room on the right for dead-letter loops into the last column
    const width = 2 * m + columns.length * w + (columns.length - 1) * gx + 50;
    const pos = {};
    columns.forEach((col, l) => {
      const y0 = m + (height - 2 * m - (col.length * h + (col.length - 1) * gy)) / 2;
      col.forEach((n, i) => { pos[n] = { x: m + l * (w + gx), y: y0 + i * (h + gy), layer: l }; });
    });
    // parallel edges (two outputs into one target) side by side, not on top of each other
    const pairs = {};
    edges.forEach((e) => { (pairs[e.from + "\u0000" + e.to] ||= []).push(e); });
    Object.values(pairs).forEach((list) => list.forEach((e, k) => { e.offset = (k - (list.length - 1) / 2) * 10; }));
    const order = columns.flat();  // sources first, as data flows
    return { names: order, edges, pos, width, height };
  }

  function edgePath(a, b, offset = 0) {
    const { w, h } = NODE;
    if (b.layer > a.layer) {
      const x1 = a.x + w, y1 = a.y + h / 2 + offset, x2 = b.x, y2 = b.y + h / 2 + offset;
      const dx = Math.max(30, (x2 - x1) / 2);
      return [`M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2 - 2},${y2}`,
        (x1 + x2) / 2, (y1 + y2) / 2];
    }
    // same column or backwards (dead letters into the last column): loop on the right
    const x1 = a.x + w, y1 = a.y + h * 0.75, x2 = b.x + w, y2 = b.y + h * 0.25;
    return [`M${x1},${y1} C${x1 + 46},${y1} ${x2 + 46},${y2} ${x2 + 2},${y2}`, x1 + 34,
      (y1 + y2) / 2];
  }

  function stateOf(h) {
    if (h.phase === "failed" || (h.phase === "running" && !h.connected)) return "bad";
    if (h.phase === "running") return "ok";
    if (h.phase === "closed" || h.phase === "drained") return "idle";
    return "warn";
  }

  function stateText(h) {
    if (h.phase === "running" && !h.connected) return "disconnected" + (h.detail ? ": " + h.detail : "");
    return h.phase + (h.detail && h.connected ? " · " + h.detail : "");
  }

  function drawGraph(state, rates) {
    const box = clear(document.getElementById("graph"));
    const { w, h } = NODE;
    const root = svg("svg", {
      viewBox: `0 0 ${layout.width} ${layout.height}`, width: layout.width,
      class: "graph-svg", role: "img", "aria-label": "pipeline graph" });
    root.append(svg("defs", {},
      svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
        markerHeight: 7, orient: "auto-start-reverse" }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" })),
      svg("marker", { id: "arrow-dl", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
        markerHeight: 7, orient: "auto-start-reverse" }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead dl" }))));
    for (const e of layout.edges) {
      const [d, lx, ly] = edgePath(layout.pos[e.from], layout.pos[e.to], e.offset);
      const flowing = !e.dl && (rates[e.from] || {}).out > 0 && (rates[e.to] || {}).in > 0;
      root.append(svg("path", { d, class: "edge" + (e.dl ? " dl" : "") + (flowing ? " flowing" : ""),
        "marker-end": e.dl ? "url(#arrow-dl)" : "url(#arrow)", dataset: { from: e.from, to: e.to } }));
      if (e.output !== "default" && !e.dl) {
        root.append(svg("text", { x: lx, y: ly - 5, class: "edge-label", "text-anchor": "middle" }, e.output));
      }
    }
    for (const name of layout.names) {
      const hd = state.handlers[name], p = layout.pos[name], r = rates[name] || {};
      const g = svg("g", { class: `node kind-${hd.kind}` + (name === selected ? " selected" : ""),
        transform: `translate(${p.x},${p.y})`, dataset: { handler: name },
        onclick: () => select(name) });
      g.append(svg("title", {}, `${name} (${hd.type}) — ${stateText(hd)}`));
      g.append(svg("rect", { width: w, height: h, rx: 8, class: "node-box" }));
      g.append(svg("rect", { width: 4, height: h - 16, x: 0, y: 8, rx: 2, class: "node-kind" }));
      g.append(svg("circle", { cx: w - 14, cy: 15, r: 5, class: "dot " + stateOf(hd) }));
      const bad = hd.errors + hd.dead_letters;
      g.append(svg("text", { x: 14, y: 21, class: "node-name" }, clip(name, bad ? 12 : 22)));
      if (bad) {  // failures at a glance, left of the state dot
        const parts = [hd.errors ? `${si(hd.errors)} err` : "", hd.dead_letters ? `${si(hd.dead_letters)} DL` : ""];
        g.append(svg("text", { x: w - 26, y: 20, class: "node-bad", "text-anchor": "end" },
          parts.filter(Boolean).join(" · ")));
      }
      g.append(svg("text", { x: 14, y: 37, class: "node-type" }, clip(`${hd.kind} · ${hd.type}`, 30)));
      const parts = [];
      if (hd.kind !== "source") parts.push("in " + rate(r.in));
      if (hd.kind !== "sink" || hd.rows_out) parts.push("out " + rate(r.out));
      g.append(svg("text", { x: 14, y: 54, class: "node-rate" }, parts.join("  ·  ")));
      if (hd.input) {
        const frac = Math.min(1, hd.input.depth / hd.input.capacity);
        const bw = w - 84;
        g.append(svg("rect", { x: 14, y: 63, width: bw, height: 6, rx: 3, class: "bar-bg" }));
        g.append(svg("rect", { x: 14, y: 63, width: Math.max(frac ? 3 : 0, bw * frac), height: 6,
          rx: 3, class: "bar-fill " + level(frac) }));
        g.append(svg("text", { x: w - 12, y: 70, class: "node-depth", "text-anchor": "end" },
          `${hd.input.depth}/${hd.input.capacity}`));
      } else if (hd.ack) {
        g.append(svg("text", { x: 14, y: 70, class: "node-depth" },
          `unacked ${int(hd.ack.pending)} · lag ${hd.ack.lag_seconds.toFixed(1)} s`));
      }
      root.append(g);
    }
    box.append(root);
    document.getElementById("graph-hint").textContent =
      `${layout.names.length} handlers · ${layout.edges.filter((e) => !e.dl).length} channels` +
      " · bars: input channel depth / capacity";
  }

  const clip = (s, n) => (s.length > n ? s.slice(0, n - 1) + "…" : s);
  const level = (f) => (f >= 0.9 ? "bad" : f >= 0.6 ? "warn" : "ok");

  // -- rates ----------------------------------------------------------------------------
  function computeRates(state) {
    const rates = {};
    const dt = prev ? state.time - prev.time : 0;
    for (const [name, h] of Object.entries(state.handlers)) {
      const p = prev && prev.handlers[name];
      const r = { in: null, out: null, latency: null };
      if (p && dt > 0) {
        r.in = Math.max(0, (h.rows_in - p.rows_in) / dt);
        r.out = Math.max(0, (h.rows_out - p.rows_out) / dt);
        const dc = h.latency_count - p.latency_count;
        if (dc > 0) r.latency = (h.latency_sum - p.latency_sum) / dc;
      }
      if (r.latency === null && h.latency_count > 0) r.latency = h.latency_sum / h.latency_count;
      rates[name] = r;
      const series = (trend[name] = trend[name] || []);
      if (r.in !== null) series.push(h.kind === "source" ? r.out : r.in);
      if (series.length > TREND) series.shift();
    }
    return rates;
  }

  // -- cards, table, extras ---------------------------------------------------------------
  function card(label, value, sub, kind) {
    return el("div", { class: "card" + (kind ? " " + kind : "") },
      el("div", { class: "card-label" }, label), el("div", { class: "card-value" }, value),
      el("div", { class: "card-sub" }, sub || ""));
  }

  function drawCards(state, rates) {
    const hs = Object.values(state.handlers);
    const sum = (f) => hs.reduce((s, h) => s + (f(h) || 0), 0);
    const sources = Object.entries(state.handlers).filter(([, h]) => h.kind === "source");
    const ingest = sources.reduce((s, [n]) => s + (rates[n].out || 0), 0);
    const known = sources.some(([n]) => rates[n].out !== null);
    const errs = sum((h) => h.errors), dls = sum((h) => h.dead_letters);
    const notReady = Object.keys(state.not_ready || {});
    clear(document.getElementById("cards")).append(
      card("state", state.ready ? "ready" : state.state,
        notReady.length ? "waiting: " + notReady.join(", ") : "all connected",
        state.ready ? "ok" : "warn"),
      card("uptime", duration(state.uptime_seconds), state.settings_file),
      card("ingest", known ? rate(ingest) : "–", "rows/s from sources"),
      card("rows ingested", int(sum((h) => h.kind === "source" ? h.rows_out : 0)),
        `${int(sum((h) => h.ack ? h.ack.committed : 0))} messages acked`),
      card("errors · retries", `${int(errs)} · ${int(sum((h) => h.retries))}`, "failed attempts",
        errs ? "warn" : ""),
      card("dead letters", int(dls), `${int(sum((h) => h.dead_letter_rows))} rows`, dls ? "bad" : ""),
      card("unacked", int(sum((h) => h.ack ? h.ack.pending : 0)), "messages in flight"));
  }

  function sparkline(values) {
    const w = 64, h = 22;
    const s = svg("svg", { width: w, height: h, class: "spark", viewBox: `0 0 ${w} ${h}` });
    if (values.length < 2) return s;
    const max = Math.max(...values, 1e-9);
    const pts = values.map((v, i) => `${(i * (w - 2)) / (values.length - 1) + 1},${h - 2 - (v / max) * (h - 4)}`);
    s.append(svg("polyline", { points: pts.join(" "), class: "spark-line" }));
    return s;
  }

  function channelCell(h) {
    if (!h.input) return el("td", { class: "muted" }, "source");
    const f = Math.min(1, h.input.depth / h.input.capacity);
    const fill = el("span", { class: "meter-fill " + level(f) });
    fill.style.width = (100 * f).toFixed(1) + "%";
    return el("td", { class: "channel", title: `max depth ${h.input.max_depth}, producers blocked ` +
        `${h.input.blocked_seconds.toFixed(2)} s in total` },
      el("span", { class: "meter" }, fill),
      el("span", { class: "depth" }, `${h.input.depth} / ${h.input.capacity}`));
  }

  function drawTable(state, rates) {
    const body = clear(document.querySelector("#handlers tbody"));
    for (const name of layout.names) {
      const h = state.handlers[name], r = rates[name];
      // data-col names each cell for tests and user styles
      const num = (col, v, cls) => el("td", { class: "num" + (cls ? " " + cls : ""), dataset: { col } }, v);
      const channel = channelCell(h);
      channel.dataset.col = "channel";
      body.append(el("tr", { dataset: { handler: name }, class: name === selected ? "selected" : "",
        onclick: () => select(name) },
        el("td", { dataset: { col: "handler" } }, el("div", { class: "hname" }, name),
          el("div", { class: "htype" }, `${h.kind} · ${h.type}`)),
        el("td", { title: stateText(h), dataset: { col: "state" } },
          el("span", { class: "dot-inline " + stateOf(h) }), clip(stateText(h), 22)),
        num("rate-in", h.kind === "source" ? "–" : rate(r.in)),
        num("rate-out", h.kind === "sink" && !h.rows_out ? "–" : rate(r.out)),
        el("td", { dataset: { col: "trend" } }, sparkline(trend[name] || [])),
        num("rows-in", int(h.rows_in)), num("rows-out", int(h.rows_out)), channel,
        num("latency", r.latency === null ? "–" : (1000 * r.latency).toFixed(r.latency < 0.01 ? 2 : 1) + " ms"),
        num("errors", `${int(h.errors)} · ${int(h.retries)}`, h.errors ? "warn" : ""),
        num("dead-letters", int(h.dead_letters) + (h.dead_letter_rows !== h.dead_letters
          ? ` (${int(h.dead_letter_rows)} rows)` : ""), h.dead_letters ? "bad" : ""),
        num("unacked", h.ack ? `${int(h.ack.pending)} · ${h.ack.lag_seconds.toFixed(1)} s` : "–")));
    }
  }

  function drawExtras(state) {
    const box = document.getElementById("extras");
    openDetails = new Set([...box.querySelectorAll("details[open]")].map((d) => d.dataset.key));
    clear(box);
    for (const name of layout.names) {
      const h = state.handlers[name];
      const info = Object.entries(h.info || {}).filter(([k]) => k !== "progress");
      const shown = new Set(h.progress.flatMap((p) => p.metrics || []));  // drawn as bars
      const metrics = Object.entries(h.metrics || {}).filter(([k]) => !shown.has(k));
      if (!h.progress.length && !info.length && !metrics.length) continue;
      const c = el("div", { class: "extra", dataset: { handler: name } }, el("h3", {}, name));
      for (const p of h.progress) {
        const f = p.total > 0 ? Math.min(1, p.done / p.total) : 0;
        const fill = el("span", { class: "meter-fill ok" });
        fill.style.width = (100 * f).toFixed(1) + "%";
        c.append(el("div", { class: "progress" }, el("span", { class: "plabel" }, p.label),
          el("span", { class: "meter wide" }, fill),
          el("span", { class: "pvalue" }, `${int(p.done)} / ${int(p.total)} (${(100 * f).toFixed(0)} %)`)));
      }
      const kv = el("dl", { class: "kv" });
      for (const [k, v] of info) kv.append(el("dt", {}, k.replace(/_/g, " ")), el("dd", {}, infoValue(v, `${name}:${k}`)));
      for (const [k, v] of metrics) kv.append(el("dt", {}, k.replace(/_/g, " ")), el("dd", { class: "num" }, si(v)));
      if (kv.firstChild) c.append(kv);
      box.append(c);
    }
    document.getElementById("extras-panel").hidden = !box.firstChild;
  }

  function infoValue(v, key) {
    if (v === null || typeof v !== "object") return String(v);
    const n = Array.isArray(v) ? v.length : Object.keys(v).length;
    if (!n) return Array.isArray(v) ? "none" : "{}";
    return el("details", { dataset: { key }, open: openDetails.has(key) }, el("summary", {}, Array.isArray(v) ? `${n} item${n > 1 ? "s" : ""}` : `${n} keys`),
      el("pre", { class: "code" }, JSON.stringify(v, null, 2)));
  }

  function drawErrors(state) {
    const list = clear(document.getElementById("errors"));
    (state.errors || []).forEach((e) => list.append(el("li", {}, e)));
    document.getElementById("errors-panel").hidden = !list.firstChild;
  }

  function select(name) {
    selected = name;
    document.querySelectorAll("[data-handler]").forEach((n) =>
      n.classList.toggle("selected", n.dataset.handler === name));
    if (last) drawDetails(last);
  }

  function drawDetails(state) {
    const panel = document.getElementById("details-panel");
    const h = selected && state.handlers[selected];
    panel.hidden = !h;
    if (!h) return;
    document.getElementById("details-title").textContent = `Settings of ${selected} (${h.type})`;
    document.getElementById("details").textContent = JSON.stringify(
      { ...h.settings, outputs: h.outputs, dead_letter: h.dead_letter }, null, 2);
  }

  // -- polling ------------------------------------------------------------------------------
  async function tick() {
    clearTimeout(timer);
    try {
      const state = await api("/dashboard/api/state");
      if (!layout) layout = computeLayout(state.handlers);
      if (!prev || state.time - prev.time >= 0.5) {
        // rates need a real interval: polls closer than 0.5 s keep the previous ones
        rates = computeRates(state);
        prev = state;
      }
      drawCards(state, rates);
      drawGraph(state, rates);
      drawTable(state, rates);
      drawExtras(state);
      drawErrors(state);
      drawDetails(state);
      last = state;
      GF.setConn(state.ready ? "live · ready" : "live · " + state.state, state.ready ? "ok" : "warn");
      document.body.dataset.loaded = "true";
    } catch (e) {
      GF.setConn(e instanceof GF.Unauthorized ? "sign in" : "offline: " + e.message, "bad");
    } finally {
      timer = setTimeout(tick, INTERVAL);
    }
  }

  document.getElementById("details-close").addEventListener("click", () => select(null));
  GF.onAuth(() => { prev = null; tick(); });
  tick();
})();
