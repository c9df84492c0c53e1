// Shared by every dashboard page: admin token, JSON fetch, DOM and number helpers.
// No dependencies, no network beyond this server. Exposed as window.GF.
"use strict";
(function () {
  const KEY = "gaitflow.adminToken";

  // "#token=..." signs in directly (the fragment never reaches a server or a log);
  // drop it from the address bar at once.
  const fromHash = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (fromHash) {
    sessionStorage.setItem(KEY, decodeURIComponent(fromHash[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }

  const authListeners = [];
  const token = () => sessionStorage.getItem(KEY) || "";

  class Unauthorized extends Error {}

  /** GET a JSON API of this server with the bearer token; throws on HTTP errors. */
  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    const resp = await fetch(path, { headers, cache: "no-store", signal: options.signal });
    if (resp.status === 401) {
      showLogin(true, token() ? "wrong token" : "");
      throw new Unauthorized("sign in with the admin token");
    }
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const err = new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
      err.status = resp.status;
      throw err;
    }
    showLogin(false);
    return body;
  }

  function showLogin(needed, why) {
    const form = document.getElementById("login");
    const out = document.getElementById("logout");
    if (form) form.hidden = !needed;
    if (out) out.hidden = needed || !token();
    const msg = document.getElementById("login-msg");
    if (msg) msg.textContent = why || "";
  }

  function onAuth(fn) { authListeners.push(fn); }

  function wireLogin() {
    const form = document.getElementById("login");
    const out = document.getElementById("logout");
    if (form) {
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const input = form.querySelector("input");
        sessionStorage.setItem(KEY, input.value.trim());
        input.value = "";
        showLogin(false);
        authListeners.forEach((fn) => fn());
      });
    }
    if (out) {
      out.addEventListener("click", () => {
        sessionStorage.removeItem(KEY);
        out.hidden = true;
        authListeners.forEach((fn) => fn());
      });
    }
  }

  /** Connection pill in the top bar: kind is "ok", "warn" or "bad". */
  function setConn(text, kind) {
    const pill = document.getElementById("conn");
    if (!pill) return;
    pill.textContent = text;
    pill.className = "pill " + (kind || "");
  }

  // -- DOM ------------------------------------------------------------------------
  /** el("td", {class: "num", title: "x"}, "text", childNode, ...): text is never parsed as HTML. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function append(node, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  // -- numbers ----------------------------------------------------------------------
  const grouped = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  /** 1234567 -> "1,234,567" */
  function int(n) { return n === null || n === undefined ? "–" : grouped.format(n); }

  /** 1234.5 -> "1.23 k" (3 significant digits) */
  function si(n) {
    if (n === null || n === undefined || !isFinite(n)) return "–";
    const a = Math.abs(n);
    if (a < 1000) return a >= 100 || a === 0 || Number.isInteger(n) ? n.toFixed(0) : n.toPrecision(3);
    const units = ["k", "M", "G", "T"];
    let i = -1, v = a;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (n < 0 ? "-" : "") + v.toPrecision(3) + " " + units[i];
  }

  function rate(n) { return n === null || n === undefined ? "–" : si(n) + "/s"; }

  function duration(s) {
    if (!isFinite(s)) return "–";
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function pct(x) { return isFinite(x) ? (100 * x).toFixed(x < 0.1 ? 1 : 0) + " %" : "–"; }

  document.addEventListener("DOMContentLoaded", wireLogin);
  window.GF = { api, token, onAuth, showLogin, setConn, Unauthorized, el, svg, clear,
    int, si, rate, duration, pct };
})();
