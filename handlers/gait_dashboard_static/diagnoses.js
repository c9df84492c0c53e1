// The diagnoses page: filters (kept in the URL) -> /api/diagnoses -> table, confusion matrix.
"use strict";
(function () {
  const { api, el, clear, int, pct } = GF;
  const form = document.getElementById("filters");
  const FIELDS = ["q", "label", "truth", "study", "model_version", "min_p", "max_p", "sort"];
  const STUDY = { Ga: "Ga · Yogev", Ju: "Ju · Hausdorff", Si: "Si · Frenkel-Toledo" };
  let inflight = null, debounce = null, seq = 0;

  function fromUrl() {
    const params = new URLSearchParams(location.search);
    for (const f of FIELDS) {
      const input = form.elements[f];
      const v = params.get(f);
      if (v === null) continue;
      if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === v)) {
        input.append(el("option", { value: v }, v));  // e.g. a model version not loaded yet
      }
      input.value = v;
    }
  }

  function query() {
    const params = new URLSearchParams();
    for (const f of FIELDS) {
      const v = (form.elements[f].value || "").trim();
      if (v && !(f === "sort" && v === "recording")) params.set(f, v);
    }
    return params;
  }

  async function load() {
    const params = query();
    const qs = params.toString();
    history.replaceState(null, "", location.pathname + (qs ? "?" + qs : ""));
    if (inflight) inflight.abort();
    inflight = new AbortController();
    const mine = ++seq;
    document.body.dataset.loaded = "false";
    try {
      params.set("size", "1000");
      const res = await api("/api/diagnoses?" + params.toString(), { signal: inflight.signal });
      if (mine !== seq) return;
      render(res);
      GF.setConn(`${res.index} · ${res.took_ms ?? 0} ms`, "ok");
      showMessage(res.note || "", "info");
    } catch (e) {
      if (e.name === "AbortError") return;
      GF.setConn(e instanceof GF.Unauthorized ? "sign in" : "error", "bad");
      showMessage(e.message, "");
      clear(document.querySelector("#diagnoses tbody"));
    } finally {
      if (mine === seq) document.body.dataset.loaded = "true";
    }
  }

  function showMessage(text, kind) {
    const box = document.getElementById("message");
    box.hidden = !text;
    box.textContent = text;
    box.className = "banner" + (kind ? " " + kind : "");
  }

  function badge(label, extra) {
    if (!label) return el("span", { class: "muted" }, "–");
    return el("span", { class: `badge ${label}` + (extra ? " " + extra : "") }, label);
  }

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toISOString().replace("T", " ").slice(0, 19);
  }

  // a bar coloured against the model's decision threshold, marked on the bar
  // (0.5 for diagnoses written without one)
  function probCell(p, threshold) {
    const thr = typeof threshold === "number" ? threshold : 0.5;
    const fill = el("span", { class: "pbar-fill " + (p >= thr ? "parkinson" : "control") });
    fill.style.width = (100 * p).toFixed(1) + "%";
    const mark = el("span", { class: "pmark", title: "decision threshold " + thr.toFixed(3) });
    mark.style.left = (100 * thr).toFixed(1) + "%";
    return el("td", {}, el("div", { class: "pcell" },
      el("span", { class: "pbar" }, fill, mark),
      el("span", { class: "num pnum" }, p === null || p === undefined ? "–" : p.toFixed(3))));
  }

  function render(res) {
    const body = clear(document.querySelector("#diagnoses tbody"));
    for (const r of res.rows) {
      const href = "/recordings/" + encodeURIComponent(r.recording);
      body.append(el("tr", { dataset: { recording: r.recording } },
        el("td", {}, el("a", { href, class: "rec" }, r.recording)),
        el("td", {}, STUDY[r.study] || "–"),
        el("td", {}, badge(r.truth, "outline")),
        el("td", {}, badge(r.label)),
        probCell(r.probability, r.threshold),
        el("td", { class: r.correct === false ? "wrong" : "right", title: r.correct === null ? "" :
          r.correct ? "prediction matches the true label" : "prediction differs from the true label" },
          r.correct === null ? "" : r.correct ? "✓" : "✗"),
        el("td", { class: "mono" }, r.model_version || "–"),
        el("td", { class: "num" }, int(r.n_windows)),
        el("td", { class: "num" }, when(r.diagnosed_at))));
    }
    document.getElementById("diagnoses").dataset.total = res.total;
    document.getElementById("count").textContent = res.total > res.rows.length
      ? `showing ${int(res.rows.length)} of ${int(res.total)}` : `${int(res.total)} recordings`;
    const c = res.confusion;
    for (const k of ["tp", "fn", "fp", "tn"]) document.getElementById("cm-" + k).textContent = int(c[k]);
    clear(document.getElementById("scores")).append(
      score("recordings", int(res.total), `${int(c.n)} with a true label`),
      score("accuracy", c.accuracy === null ? "–" : pct(c.accuracy), "(TP + TN) / n"),
      score("sensitivity", c.sensitivity === null ? "–" : pct(c.sensitivity), "TP / (TP + FN)"),
      score("specificity", c.specificity === null ? "–" : pct(c.specificity), "TN / (TN + FP)"),
      score("mean P", res.mean_probability === null ? "–" : res.mean_probability.toFixed(3),
        "of parkinson"));
    const select = form.elements.model_version;
    const chosen = select.value;
    clear(select).append(el("option", { value: "" }, "all"),
      ...res.model_versions.map((v) => el("option", { value: v }, v)));
    if (chosen && !res.model_versions.includes(chosen)) select.append(el("option", { value: chosen }, chosen));
    select.value = chosen;
  }

  function score(label, value, sub) {
    return el("div", { class: "card" }, el("div", { class: "card-label" }, label),
      el("div", { class: "card-value" }, value), el("div", { class: "card-sub" }, sub));
  }

  form.addEventListener("input", (ev) => {
    clearTimeout(debounce);
    debounce = setTimeout(load, ev.target.type === "search" || ev.target.type === "number" ? 250 : 0);
  });
  form.addEventListener("change", () => { clearTimeout(debounce); debounce = setTimeout(load, 0); });
  form.addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
  form.addEventListener("reset", () => setTimeout(load, 0));
  GF.onAuth(load);
  fromUrl();
  load();
})();
