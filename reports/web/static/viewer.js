// ICH triage series viewer: raw HU slices windowed in the browser on a canvas, SEG overlay per
// subtype, heatmap on key slices, presets, drag to window, zoom and pan. No external code.
(function () {
  "use strict";
  const PREFETCH = 4; // slices fetched at once

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function hexRgb(hex) {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  function Viewer(root) {
    const studyId = root.dataset.studyId;
    const canvas = root.querySelector("#viewer-canvas");
    const g = canvas.getContext("2d");
    const slider = root.querySelector("#viewer-slider");
    const caption = root.querySelector("#viewer-slice");
    const wlInfo = root.querySelector("#viewer-wl");
    const legend = root.querySelector("#viewer-legend");
    const keys = root.querySelector("#viewer-keys");
    const seriesSel = document.getElementById("viewer-series");
    const off = document.createElement("canvas");
    const og = off.getContext("2d");
    const st = {
      m: null, index: 0, ww: 80, wl: 40, zoom: 1, panX: 0, panY: 0,
      tool: window.matchMedia("(pointer: coarse)").matches ? "scroll" : "window",
      hu: new Map(), masks: new Map(), heat: new Map(), pending: new Map(),
      segOn: new Set(), heatOn: true, rendered: 0, generation: 0,
    };

    function url(path) { return `/studies/${studyId}/viewer${path}`; }

    async function fetchOk(path, kind) {
      const resp = await fetch(path, { credentials: "same-origin", headers: { Accept: kind } });
      if (resp.redirected || resp.status === 401) { window.location = "/login"; throw new Error("login"); }
      if (!resp.ok) throw new Error(String(resp.status));
      return resp;
    }

    function load(i) {
      // The slice's HU (and its segment bitmask when it has one), fetched once.
      if (st.hu.has(i)) return Promise.resolve();
      if (st.pending.has(i)) return st.pending.get(i);
      const gen = st.generation;
      const sl = st.m.slices[i];
      const fr = sl.frame ? `?frame=${sl.frame}` : "";
      const p = (async () => {
        const buf = await (await fetchOk(url(`/slice/${sl.id}${fr}`), "application/octet-stream")).arrayBuffer();
        let mask = null;
        if (sl.overlay) {
          const r = await fetchOk(url(`/overlay/${sl.id}${fr}`), "application/octet-stream");
          if (r.status === 200) mask = new Uint8Array(await r.arrayBuffer());
        }
        if (gen !== st.generation) return;
        st.hu.set(i, new Int16Array(buf));
        st.masks.set(i, mask);
      })();
      st.pending.set(i, p);
      p.finally(() => st.pending.delete(i));
      return p;
    }

    function loadHeat(i) {
      const n = st.m.slices[i].heat;
      if (n === null || n === undefined || st.heat.has(i)) return;
      const img = new Image();
      img.onload = () => { st.heat.set(i, img); if (i === st.index) draw(); };
      img.src = url(`/heat/${n}`);
      st.heat.set(i, null);
    }

    async function prefetch() {
      const gen = st.generation;
      const order = st.m.slices.map((_, i) => i).sort((a, b) => Math.abs(a - st.index) - Math.abs(b - st.index));
      let next = 0;
      async function worker() {
        while (next < order.length && gen === st.generation) {
          const i = order[next++];
          try { await load(i); } catch (e) { /* shown when the slice is opened */ }
        }
      }
      await Promise.all(Array.from({ length: PREFETCH }, worker));
    }

    function render() {
      // Window the HU into the off-screen canvas (native matrix), segments blended on top.
      const m = st.m, hu = st.hu.get(st.index), mask = st.masks.get(st.index);
      const rows = m.rows, cols = m.cols;
      if (off.width !== cols || off.height !== rows) { off.width = cols; off.height = rows; }
      const img = og.createImageData(cols, rows);
      const px = img.data;
      const lo = st.wl - st.ww / 2, scale = 255 / Math.max(1, st.ww);
      let enabled = 0;
      const colors = [];
      m.segments.forEach((s) => { if (st.segOn.has(s.number)) enabled |= 1 << ((s.number - 1) % 8); colors[s.number - 1] = hexRgb(s.color); });
      for (let p = 0, q = 0; p < hu.length; p++, q += 4) {
        let v = (hu[p] - lo) * scale;
        v = v < 0 ? 0 : v > 255 ? 255 : v;
        px[q] = px[q + 1] = px[q + 2] = v; px[q + 3] = 255;
      }
      if (mask && enabled) {
        for (let p = 0; p < mask.length; p++) {
          const bits = mask[p] & enabled;
          if (!bits) continue;
          const seg = 31 - Math.clz32(bits & -bits);
          const c = colors[seg] || [255, 0, 0];
          const x = p % cols, y = (p - x) / cols;
          const edge = x === 0 || y === 0 || x === cols - 1 || y === rows - 1 ||
            !(mask[p - 1] & bits) || !(mask[p + 1] & bits) || !(mask[p - cols] & bits) || !(mask[p + cols] & bits);
          const a = edge ? 1 : 0.35, q = p * 4;
          px[q] = px[q] * (1 - a) + c[0] * a; px[q + 1] = px[q + 1] * (1 - a) + c[1] * a; px[q + 2] = px[q + 2] * (1 - a) + c[2] * a;
        }
      }
      og.putImageData(img, 0, 0);
    }

    function fit() {
      const w = canvas.clientWidth, h = canvas.clientHeight, dpr = window.devicePixelRatio || 1;
      if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
        canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
      }
      const sp = st.m.pixel_spacing || [1, 1];
      const aspect = (st.m.rows * sp[0]) / (st.m.cols * sp[1]); // height / width in mm
      const base = Math.min(canvas.width / st.m.cols, canvas.height / (st.m.cols * aspect));
      const dw = st.m.cols * base * st.zoom, dh = st.m.cols * aspect * base * st.zoom;
      return { x: (canvas.width - dw) / 2 + st.panX * dpr, y: (canvas.height - dh) / 2 + st.panY * dpr, w: dw, h: dh };
    }

    function draw() {
      if (!st.m || !st.m.slices.length) return;
      const i = st.index, sl = st.m.slices[i];
      caption.textContent = sl.caption;
      root.dataset.index = String(i);
      root.dataset.instanceNumber = sl.number === null ? "" : String(sl.number);
      slider.value = String(i);
      wlInfo.textContent = `W ${Math.round(st.ww)} / L ${Math.round(st.wl)}` + (st.zoom !== 1 ? ` · ${st.zoom.toFixed(1)}×` : "");
      if (!st.hu.has(i)) {
        load(i).then(() => { if (st.index === i) draw(); }, () => { caption.textContent = `${sl.caption} · could not load`; });
        return;
      }
      render();
      const r = fit();
      g.setTransform(1, 0, 0, 1, 0, 0);
      g.fillStyle = "#000"; g.fillRect(0, 0, canvas.width, canvas.height);
      g.imageSmoothingEnabled = true;
      g.drawImage(off, r.x, r.y, r.w, r.h);
      loadHeat(i);
      const heat = st.heat.get(i);
      if (st.heatOn && heat) { g.globalAlpha = 0.85; g.drawImage(heat, r.x, r.y, r.w, r.h); g.globalAlpha = 1; }
      root.dataset.heatShown = st.heatOn && heat ? "true" : "false";
      st.rendered += 1;
      root.dataset.rendered = String(st.rendered);
      if (st.rendered === 1) root.dataset.firstImageMs = String(Math.round(performance.now()));
    }

    function go(i) {
      if (!st.m) return;
      const n = st.m.slices.length;
      const j = Math.max(0, Math.min(n - 1, i));
      if (j !== st.index) { st.index = j; draw(); }
    }

    function setWindow(ww, wl) {
      st.ww = Math.max(1, ww); st.wl = wl;
      root.querySelectorAll("button.preset").forEach((b) => b.classList.toggle("chosen",
        +b.dataset.ww === Math.round(st.ww) && +b.dataset.wl === Math.round(st.wl)));
      draw();
    }

    function buildLegend() {
      legend.replaceChildren();
      keys.replaceChildren();
      st.m.segments.forEach((s) => {
        st.segOn.add(s.number);
        const lab = el("label", { class: "seg-toggle" });
        const box = el("input", { type: "checkbox", "data-segment": String(s.number), id: `seg-${s.label}` });
        box.checked = true;
        const sw = el("span", { class: "swatch" });
        sw.style.background = s.color;
        lab.append(box, sw, document.createTextNode(` ${s.name}` + (s.volume_ml !== null ? ` (${s.volume_ml.toFixed(1)} mL)` : "")));
        legend.append(lab);
      });
      if (st.m.heat_available) {
        const lab = el("label", { class: "seg-toggle" });
        const box = el("input", { type: "checkbox", id: "heat-toggle" });
        box.checked = st.heatOn;
        const sw = el("span", { class: "swatch heat" });
        lab.append(box, sw, document.createTextNode(" Heatmap (key slices)"));
        legend.append(lab);
      }
      if (!st.m.segments.length && !st.m.heat_available) legend.append(el("span", { class: "sub" }, "No segmentation for this series."));
      st.m.keys.forEach((k) => {
        const b = el("button", { type: "button", class: "key-jump", "data-index": String(k.index), title: k.name }, `${k.short}: ${k.caption}`);
        keys.append(b);
      });
      legend.querySelectorAll("input[data-segment]").forEach((box) => box.addEventListener("change", () => {
        const n = +box.dataset.segment;
        if (box.checked) st.segOn.add(n); else st.segOn.delete(n);
        draw();
      }));
      const ht = legend.querySelector("#heat-toggle");
      if (ht) ht.addEventListener("change", () => { st.heatOn = ht.checked; draw(); });
      keys.querySelectorAll("button.key-jump").forEach((b) => b.addEventListener("click", () => go(+b.dataset.index)));
    }

    async function open(seriesId) {
      st.generation += 1;
      st.hu.clear(); st.masks.clear(); st.heat.clear(); st.pending.clear(); st.segOn.clear();
      const q = seriesId ? `?series=${encodeURIComponent(seriesId)}` : "";
      const resp = await fetchOk(`/studies/${studyId}/viewer.json${q}`, "application/json");
      st.m = await resp.json();
      root.dataset.slices = String(st.m.slices.length);
      root.classList.toggle("empty", !st.m.slices.length);
      if (!st.m.slices.length) { caption.textContent = "No images stored for this series."; return; }
      slider.max = String(st.m.slices.length - 1);
      st.index = st.m.keys.length ? st.m.keys[0].index : Math.floor(st.m.slices.length / 2);
      st.zoom = 1; st.panX = 0; st.panY = 0;
      buildLegend();
      setWindow(80, 40);
      await load(st.index).catch(() => {});
      draw();
      prefetch();
    }

    // ---- input
    canvas.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      if (ev.ctrlKey) { st.zoom = Math.max(0.5, Math.min(8, st.zoom * (ev.deltaY < 0 ? 1.15 : 1 / 1.15))); draw(); return; }
      go(st.index + (ev.deltaY > 0 ? 1 : -1));
    }, { passive: false });
    let hovering = false;
    canvas.addEventListener("pointerenter", () => { hovering = true; });
    canvas.addEventListener("pointerleave", () => { hovering = false; });
    document.addEventListener("keydown", (ev) => {
      // Keys act while the viewer has the focus or the pointer is over the image.
      const t = ev.target;
      if (!st.m || !(hovering || root.contains(document.activeElement))) return;
      if (t && t !== root && t !== document.body && (t.tagName === "SELECT" || t.tagName === "TEXTAREA" ||
          (t.tagName === "INPUT" && t.type !== "checkbox"))) return;
      const step = { ArrowDown: 1, ArrowRight: 1, PageDown: 5, ArrowUp: -1, ArrowLeft: -1, PageUp: -5 }[ev.key];
      if (step) { ev.preventDefault(); go(st.index + step); }
      else if (ev.key === "Home") { ev.preventDefault(); go(0); }
      else if (ev.key === "End") { ev.preventDefault(); go(st.m.slices.length - 1); }
    });
    slider.addEventListener("input", () => go(parseInt(slider.value, 10)));
    let drag = null;
    const touches = new Map(); // pointer id -> position, for the two-finger pinch (zoom and pan)
    let pinch = null;
    const spread = () => { const [a, b] = [...touches.values()]; return Math.hypot(a.x - b.x, a.y - b.y); };
    const middle = () => { const [a, b] = [...touches.values()]; return { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 }; };
    canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
    canvas.addEventListener("pointerdown", (ev) => {
      canvas.setPointerCapture(ev.pointerId);
      root.focus({ preventScroll: true });
      touches.set(ev.pointerId, { x: ev.clientX, y: ev.clientY });
      if (touches.size === 2) {
        const m = middle();
        pinch = { d: Math.max(1, spread()), zoom: st.zoom, x: m.x, y: m.y, panX: st.panX, panY: st.panY };
        drag = null;
        return;
      }
      const mode = ev.button === 2 || ev.shiftKey ? "pan" : st.tool;
      drag = { x: ev.clientX, y: ev.clientY, mode, ww: st.ww, wl: st.wl, panX: st.panX, panY: st.panY, index: st.index };
    });
    canvas.addEventListener("pointermove", (ev) => {
      if (touches.has(ev.pointerId)) touches.set(ev.pointerId, { x: ev.clientX, y: ev.clientY });
      if (pinch && touches.size === 2) {
        const m = middle();
        st.zoom = Math.max(0.5, Math.min(8, pinch.zoom * spread() / pinch.d));
        st.panX = pinch.panX + m.x - pinch.x; st.panY = pinch.panY + m.y - pinch.y;
        draw();
        return;
      }
      if (!drag) return;
      const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
      if (drag.mode === "window") setWindow(drag.ww + dx * Math.max(1, drag.ww) / 200, drag.wl + dy * Math.max(1, drag.ww) / 400);
      else if (drag.mode === "pan") { st.panX = drag.panX + dx; st.panY = drag.panY + dy; draw(); }
      else go(drag.index + Math.round(dy / 12));
    });
    const end = (ev) => { touches.delete(ev.pointerId); if (touches.size < 2) pinch = null; drag = null; };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("dblclick", () => { st.zoom = 1; st.panX = 0; st.panY = 0; setWindow(80, 40); });
    root.querySelectorAll("button.preset").forEach((b) => b.addEventListener("click", () => setWindow(+b.dataset.ww, +b.dataset.wl)));
    root.querySelectorAll("button.tool").forEach((b) => b.addEventListener("click", () => {
      st.tool = b.dataset.tool;
      root.querySelectorAll("button.tool").forEach((x) => x.classList.toggle("chosen", x === b));
    }));
    root.querySelectorAll("button.tool").forEach((x) => x.classList.toggle("chosen", x.dataset.tool === st.tool));
    const zoomBy = (f) => { st.zoom = Math.max(0.5, Math.min(8, st.zoom * f)); draw(); };
    root.querySelector("#zoom-in").addEventListener("click", () => zoomBy(1.25));
    root.querySelector("#zoom-out").addEventListener("click", () => zoomBy(0.8));
    root.querySelector("#zoom-reset").addEventListener("click", () => { st.zoom = 1; st.panX = 0; st.panY = 0; draw(); });
    if (seriesSel) seriesSel.addEventListener("change", () => open(seriesSel.value));
    window.addEventListener("resize", () => draw());
    open(root.dataset.seriesId || "");
  }

  document.addEventListener("DOMContentLoaded", () => {
    const root = document.getElementById("viewer");
    if (root) Viewer(root);
  });
})();
