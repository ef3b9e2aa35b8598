/* Shared helpers of the chuantou admin pages: number formats, DOM building, the JSON API,
 * tables that update in place, a two-click confirm, polling, and a small canvas chart. */
"use strict";

const UI = (() => {
  // --- numbers and times -------------------------------------------------------------------

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

  function bytes(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "—";
    let i = 0;
    while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    const digits = i === 0 || n >= 100 ? 0 : n >= 10 ? 1 : 2;
    return `${n.toFixed(digits)} ${UNITS[i]}`;
  }

  function rate(n) {
    if (n === null || n === undefined) return "—";
    return n < 1 ? "0 B/s" : `${bytes(n)}/s`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    if (h < 24) return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
    const d = Math.floor(h / 24);
    return h % 24 ? `${d} d ${h % 24} h` : `${d} d`;
  }

  function ago(unixSeconds) {
    if (!unixSeconds) return "—";
    const s = Date.now() / 1000 - unixSeconds;
    if (s < 2) return "just now";
    return `${duration(s)} ago`;
  }

  function clock(unixSeconds) {
    if (!unixSeconds) return "—";
    const d = new Date(unixSeconds * 1000);
    const sameDay = d.toDateString() === new Date().toDateString();
    return sameDay ? d.toLocaleTimeString() : d.toLocaleString();
  }

  // --- DOM -----------------------------------------------------------------------------------

  /** el("td", {class: "num", dataset: {label: "Port"}}, "text", childNode, ...) */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node && node.textContent !== String(text)) node.textContent = text;
  }

  // --- the JSON API --------------------------------------------------------------------------

  /** Resolves to {ok, status, data}; data.error carries the server's message on failure. */
  async function api(method, path, body) {
    const init = { method, headers: {}, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      return { ok: false, status: 0, data: { error: "the page lost its connection to the server" } };
    }
    let data = {};
    try {
      data = await response.json();
    } catch (err) {
      data = { error: `${response.status} ${response.statusText}` };
    }
    return { ok: response.ok, status: response.status, data };
  }

  // --- tables --------------------------------------------------------------------------------

  /**
   * Keep tbody's rows in step with items, keyed, so buttons survive updates.
   * columns: [{label, cls, value(item) -> string | Node | [..]}]; actions(item) -> Node (built once).
   */
  function syncRows(tbody, items, { key, columns, actions, empty }) {
    const width = columns.length + (actions ? 1 : 0);
    if (!items.length) {
      const row = tbody.querySelector("tr.empty");
      if (!row || tbody.rows.length !== 1 || row.textContent !== empty) {
        tbody.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: width }, empty)));
      }
      return;
    }
    const old = new Map();
    for (const row of Array.from(tbody.rows)) {
      if (row.dataset.key) old.set(row.dataset.key, row);
      else row.remove();
    }
    let previous = null;
    for (const item of items) {
      const k = String(key(item));
      let row = old.get(k);
      if (row) {
        old.delete(k);
      } else {
        row = el("tr", { dataset: { key: k } },
          columns.map((c) => el("td", { class: c.cls, dataset: { label: c.label } })));
        if (actions) row.append(el("td", { class: "actions" }, actions(item)));
      }
      columns.forEach((c, i) => fill(row.cells[i], c.value(item)));
      const wanted = previous ? previous.nextSibling : tbody.firstChild;
      if (wanted !== row) tbody.insertBefore(row, wanted);
      previous = row;
    }
    for (const row of old.values()) row.remove();
  }

  function fill(cell, value) {
    if (value instanceof Node || Array.isArray(value)) {
      const nodes = [].concat(value).filter((n) => n !== null && n !== undefined && n !== false);
      const html = nodes.map((n) => (n instanceof Node ? n.outerHTML || n.textContent : String(n))).join("");
      if (cell.dataset.html !== html) {
        cell.replaceChildren(el("span", { class: "v" }, nodes));  // one box, so stacked rows stay aligned
        cell.dataset.html = html;
      }
    } else {
      const text = value === null || value === undefined ? "—" : String(value);
      if (cell.textContent !== text || cell.childElementCount) cell.textContent = text;
    }
  }

  /** A button that asks "sure?" on the first click and acts on the second (within 4 s). */
  function confirmButton(label, armedLabel, action, cls = "small danger") {
    let timer = null;
    const button = el("button", { type: "button", class: cls }, label);
    button.addEventListener("click", async () => {
      if (!button.classList.contains("armed")) {
        button.classList.add("armed");
        button.textContent = armedLabel;
        timer = setTimeout(() => { button.classList.remove("armed"); button.textContent = label; }, 4000);
        return;
      }
      clearTimeout(timer);
      button.disabled = true;
      try {
        await action();
      } finally {
        button.disabled = false;
        button.classList.remove("armed");
        button.textContent = label;
      }
    });
    return button;
  }

  // --- polling -------------------------------------------------------------------------------

  /** Run refresh() now and every intervalMs; the "live" badge shows whether it works. */
  function poll(refresh, intervalMs, badge) {
    let lastOk = 0;
    async function tick() {
      let ok = false;
      try {
        ok = await refresh();
      } catch (err) {
        ok = false;
        if (window.console) console.warn("refresh failed:", err);  // not an error: retried
      }
      if (ok) lastOk = Date.now();
      if (badge) {
        const fresh = Date.now() - lastOk < intervalMs * 3;
        badge.classList.toggle("on", fresh);
        badge.classList.toggle("off", !fresh);
        badge.textContent = fresh ? "live" : "no updates";
      }
      setTimeout(tick, intervalMs);
    }
    tick();
  }

  // --- chart -----------------------------------------------------------------------------------

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  /** Short axis labels: "0", "512 B/s", "2.5 MiB/s". */
  function axisRate(n) {
    if (n <= 0) return "0";
    let i = 0;
    while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return `${parseFloat(n.toPrecision(3))} ${UNITS[i]}/s`;
  }

  function niceMax(value) {
    if (value <= 1024) return 1024;
    const unit = Math.pow(1024, Math.floor(Math.log(value) / Math.log(1024)));
    const scaled = value / unit;
    const step = [1, 2, 4, 5, 8, 10, 20, 40, 50, 80, 100, 200, 400, 500, 800, 1024].find((s) => s >= scaled);
    return step * unit;
  }

  /**
   * A line chart of rates on a canvas. samples: [[unix time, v1, v2, ...]];
   * series: [{label, color: css variable name}]; span: seconds shown, ending now.
   */
  class Chart {
    constructor(container, series, span = 300) {
      this.container = container;
      this.series = series;
      this.span = span;
      this.samples = [];
      this.canvas = el("canvas", { role: "img", "aria-label": "traffic over the last minutes" });
      this.tip = el("div", { class: "chart-tip", hidden: true });
      container.append(this.canvas, this.tip);
      this.canvas.addEventListener("mousemove", (e) => this.hover(e.offsetX));
      this.canvas.addEventListener("mouseleave", () => { this.hoverX = null; this.tip.hidden = true; this.draw(); });
      new ResizeObserver(() => this.draw()).observe(container);
    }

    update(samples) {
      this.samples = samples || [];
      this.draw();
      if (this.hoverX !== null && this.hoverX !== undefined) this.hover(this.hoverX);
    }

    geometry() {
      const width = this.container.clientWidth;
      const height = this.container.clientHeight;
      const pad = { left: this.axisWidth || 62, right: 10, top: 12, bottom: 24 };
      const end = Date.now() / 1000;
      return { width, height, pad, end, start: end - this.span };
    }

    draw() {
      const { width, height, pad, start } = this.geometry();
      if (!width || !height) return;
      const ratio = window.devicePixelRatio || 1;
      if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(height * ratio)) {
        this.canvas.width = Math.round(width * ratio);
        this.canvas.height = Math.round(height * ratio);
      }
      const ctx = this.canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);
      const visible = this.samples.filter((s) => s[0] >= start - 2);
      let peak = 0;
      for (const s of visible) for (let i = 1; i < s.length; i++) peak = Math.max(peak, s[i]);
      const top = niceMax(peak * 1.1);
      this.container.dataset.peak = String(peak);  // what the chart shows, for tests and curious users
      ctx.font = "11px system-ui, sans-serif";
      const widest = Math.max(...[0, 1, 2, 3, 4].map((i) => ctx.measureText(axisRate((top / 4) * i)).width));
      if (Math.abs(widest + 14 - pad.left) > 1) {
        this.axisWidth = Math.ceil(widest + 14);
        pad.left = this.axisWidth;
      }
      const plotW = width - pad.left - pad.right;
      const plotH = height - pad.top - pad.bottom;
      const x = (t) => pad.left + ((t - start) / this.span) * plotW;
      const y = (v) => pad.top + plotH - (v / top) * plotH;
      this.scale = { x, y, top, plotW, start };

      const muted = cssVar("--muted");
      const line = cssVar("--line");
      ctx.font = "11px system-ui, sans-serif";
      ctx.lineWidth = 1;
      ctx.textBaseline = "middle";
      for (let i = 0; i <= 4; i++) {
        const v = (top / 4) * i;
        const yy = Math.round(y(v)) + 0.5;
        ctx.strokeStyle = line;
        ctx.beginPath();
        ctx.moveTo(pad.left, yy);
        ctx.lineTo(width - pad.right, yy);
        ctx.stroke();
        ctx.fillStyle = muted;
        ctx.textAlign = "right";
        ctx.fillText(axisRate(v), pad.left - 8, yy);
      }
      ctx.textBaseline = "alphabetic";
      ctx.textAlign = "center";
      const minutes = Math.round(this.span / 60);
      const narrow = plotW / minutes < 60;
      for (let m = minutes; m >= 0; m--) {
        const xx = x(start + this.span - m * 60);
        const text = m === 0 ? "now" : narrow ? `-${m}m` : `-${m} min`;
        ctx.textAlign = m === minutes ? "left" : m === 0 ? "right" : "center";
        ctx.fillText(text, Math.min(Math.max(xx, pad.left), width - pad.right), height - 6);
      }

      this.series.forEach((serie, index) => {
        const points = visible.map((s) => [Math.max(x(s[0]), pad.left), y(s[index + 1] || 0)]);
        if (!points.length) return;
        const color = cssVar(serie.color);
        ctx.beginPath();
        points.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
        ctx.lineTo(points[points.length - 1][0], y(0));
        ctx.lineTo(points[0][0], y(0));
        ctx.closePath();
        ctx.globalAlpha = 0.12;
        ctx.fillStyle = color;
        ctx.fill();
        ctx.globalAlpha = 1;
        ctx.beginPath();
        points.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
        ctx.strokeStyle = color;
        ctx.lineWidth = 1.8;
        ctx.lineJoin = "round";
        ctx.stroke();
      });

      if (!visible.length) {
        ctx.fillStyle = muted;
        ctx.textAlign = "center";
        ctx.font = "13px system-ui, sans-serif";
        ctx.fillText("collecting samples…", pad.left + plotW / 2, pad.top + plotH / 2);
      }
      if (this.hoverX !== null && this.hoverX !== undefined && this.hoverSample) {
        const hx = Math.round(x(this.hoverSample[0])) + 0.5;
        ctx.strokeStyle = muted;
        ctx.lineWidth = 1;
        ctx.beginPath();
        ctx.moveTo(hx, pad.top);
        ctx.lineTo(hx, pad.top + plotH);
        ctx.stroke();
      }
    }

    hover(offsetX) {
      this.hoverX = offsetX;
      const { start, end } = this.geometry();
      if (!this.scale || !this.samples.length) return;
      const t = start + ((offsetX - (this.axisWidth || 62)) / this.scale.plotW) * (end - start);
      let best = null;
      for (const s of this.samples) if (!best || Math.abs(s[0] - t) < Math.abs(best[0] - t)) best = s;
      if (!best || Math.abs(best[0] - t) > 5) { this.hoverSample = null; this.tip.hidden = true; this.draw(); return; }
      this.hoverSample = best;
      const parts = this.series.map((serie, i) => `${serie.label} ${rate(best[i + 1] || 0)}`);
      this.tip.textContent = `${new Date(best[0] * 1000).toLocaleTimeString()} · ${parts.join(" · ")}`;
      this.tip.hidden = false;
      const x = this.scale.x(best[0]);
      const w = this.tip.offsetWidth;
      this.tip.style.left = `${Math.min(Math.max(x - w / 2, 0), this.container.clientWidth - w)}px`;
      this.draw();
    }
  }

  /** Per-key rates computed from successive totals, for lists whose API gives only bytes. */
  class RateTracker {
    constructor() { this.last = new Map(); }
    rate(key, total) {
      const now = performance.now() / 1000;
      const prev = this.last.get(key);
      this.last.set(key, { now, total });
      if (!prev || now <= prev.now || total < prev.total) return null;
      return (total - prev.total) / (now - prev.now);
    }
    forget(keep) {
      for (const key of Array.from(this.last.keys())) if (!keep.has(key)) this.last.delete(key);
    }
  }

  return { bytes, rate, duration, ago, clock, el, setText, api, syncRows, confirmButton, poll, Chart, RateTracker };
})();
