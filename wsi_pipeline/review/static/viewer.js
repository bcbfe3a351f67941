// wsi-pipeline slide viewer: a small deep-zoom canvas viewer (DZI tiles), a level-0-aligned heatmap
// overlay, a colour legend, tile-score tooltip and top/bottom-k tile thumbnails. Plain JavaScript.
"use strict";

(function () {
  const slideId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const tooltip = document.getElementById("tooltip");
  const statusEl = document.getElementById("status");
  const ui = {
    toggle: document.getElementById("overlay-toggle"),
    channel: document.getElementById("channel"),
    scale: document.getElementById("scale"),
    smooth: document.getElementById("smooth"),
    opacity: document.getElementById("opacity"),
    opacityValue: document.getElementById("opacity-value"),
    legendBar: document.getElementById("legend-bar"),
    legendTicks: document.getElementById("legend-ticks"),
    legendLabel: document.getElementById("legend-label"),
    topk: document.getElementById("topk"),
    tmeSection: document.getElementById("tme-section"),
    tmeToggle: document.getElementById("tme-toggle"),
    tmeLegend: document.getElementById("tme-legend"),
    tmePhenotype: document.getElementById("tme-phenotype"),
    bottomk: document.getElementById("bottomk"),
  };

  const MAX_CACHED_TILES = 600;
  const st = {
    info: null,          // /api/slides/<id>
    dz: null,            // {tileSize, overlap, format, width, height, maxLevel, url}
    ox: 0, oy: 0,        // level-0 coordinate at the canvas's top-left corner
    zoom: 1,             // CSS pixels per level-0 pixel
    minZoom: 0.001, maxZoom: 4,
    cssW: 1, cssH: 1, dpr: 1,
    tiles: new Map(),    // "l/c/r" -> {img, ok, failed, used}
    frame: 0,
    overlay: { img: null, url: "", ok: false },
    showOverlay: false,
    tme: { img: null, ok: false },  // the TME tissue-class raster (info.tme)
    showTme: false,
    opacity: 0.5,
    channel: null,       // channel object of info.channels
    tileData: null,      // /api/slides/<id>/tiles
    buckets: null,       // spatial index for the tooltip
    highlight: null,     // tile index to outline
    drag: null,
    ready: false,
    drawPending: false,
  };

  // ------------------------------------------------------------------ deep zoom geometry
  function parseDzi(text, url) {
    const xml = new DOMParser().parseFromString(text, "application/xml");
    const image = xml.getElementsByTagName("Image")[0];
    const size = xml.getElementsByTagName("Size")[0];
    const width = parseInt(size.getAttribute("Width"), 10);
    const height = parseInt(size.getAttribute("Height"), 10);
    return {
      tileSize: parseInt(image.getAttribute("TileSize"), 10),
      overlap: parseInt(image.getAttribute("Overlap"), 10),
      format: image.getAttribute("Format"),
      width, height,
      maxLevel: Math.ceil(Math.log2(Math.max(width, height, 1))),
      filesUrl: url.replace(/\.dzi$/, "_files"),
    };
  }

  function levelDownsample(level) { return Math.pow(2, st.dz.maxLevel - level); }

  function levelSize(level) {
    const ds = levelDownsample(level);
    return [Math.max(1, Math.ceil(st.dz.width / ds)), Math.max(1, Math.ceil(st.dz.height / ds))];
  }

  function levelGrid(level) {
    const [w, h] = levelSize(level);
    return [Math.ceil(w / st.dz.tileSize), Math.ceil(h / st.dz.tileSize)];
  }

  function baseLevel() {  // the coarsest level still bigger than one pixel, whole slide in one tile
    let best = 0;
    for (let l = 0; l <= st.dz.maxLevel; l++) {
      const [w, h] = levelSize(l);
      if (Math.max(w, h) <= st.dz.tileSize) best = l;
    }
    return best;
  }

  function targetLevel() {
    const need = 1 / (st.zoom * st.dpr);  // level-0 px per device px
    const l = st.dz.maxLevel - Math.floor(Math.log2(Math.max(need, 1e-9)));
    return Math.max(0, Math.min(st.dz.maxLevel, l));
  }

  function getTile(level, col, row, request) {
    const key = level + "/" + col + "/" + row;
    let t = st.tiles.get(key);
    if (!t && request) {
      t = { img: new Image(), ok: false, failed: false, used: st.frame };
      t.img.onload = () => { t.ok = true; scheduleDraw(); };
      t.img.onerror = () => { t.failed = true; scheduleDraw(); };
      t.img.src = `${st.dz.filesUrl}/${level}/${col}_${row}.${st.dz.format}`;
      st.tiles.set(key, t);
    }
    if (t) t.used = st.frame;
    return t;
  }

  function evictTiles() {
    if (st.tiles.size <= MAX_CACHED_TILES) return;
    const old = [...st.tiles.entries()].filter(([, t]) => t.used < st.frame).sort((a, b) => a[1].used - b[1].used);
    for (const [k] of old.slice(0, st.tiles.size - MAX_CACHED_TILES)) st.tiles.delete(k);
  }

  // ------------------------------------------------------------------ view transform
  function toScreen(x, y) { return [(x - st.ox) * st.zoom, (y - st.oy) * st.zoom]; }
  function toL0(sx, sy) { return [sx / st.zoom + st.ox, sy / st.zoom + st.oy]; }

  function fitView() {
    const z = Math.min(st.cssW / st.dz.width, st.cssH / st.dz.height) * 0.96;
    st.zoom = z;
    st.minZoom = z / 4;
    st.ox = st.dz.width / 2 - st.cssW / 2 / z;
    st.oy = st.dz.height / 2 - st.cssH / 2 / z;
  }

  function zoomAt(sx, sy, factor) {
    const [x, y] = toL0(sx, sy);
    st.zoom = Math.max(st.minZoom, Math.min(st.maxZoom, st.zoom * factor));
    st.ox = x - sx / st.zoom;
    st.oy = y - sy / st.zoom;
    scheduleDraw();
  }

  function centreOn(x, y, zoom) {
    if (zoom) st.zoom = Math.max(st.minZoom, Math.min(st.maxZoom, zoom));
    st.ox = x - st.cssW / 2 / st.zoom;
    st.oy = y - st.cssH / 2 / st.zoom;
    scheduleDraw();
  }

  function resize() {
    const r = canvas.getBoundingClientRect();
    st.dpr = window.devicePixelRatio || 1;
    const first = st.cssW <= 1;
    st.cssW = Math.max(1, r.width);
    st.cssH = Math.max(1, r.height);
    canvas.width = Math.round(st.cssW * st.dpr);
    canvas.height = Math.round(st.cssH * st.dpr);
    if (first && st.dz) fitView();
    scheduleDraw();
  }

  // ------------------------------------------------------------------ drawing
  function scheduleDraw() {
    if (st.drawPending) return;
    st.drawPending = true;
    requestAnimationFrame(() => { st.drawPending = false; draw(); });
  }

  function drawLevel(level, request) {
    const ds = levelDownsample(level);
    const [cols, rows] = levelGrid(level);
    const ts = st.dz.tileSize, ov = st.dz.overlap;
    const [x0, y0] = toL0(0, 0);
    const [x1, y1] = toL0(st.cssW, st.cssH);
    const c0 = Math.max(0, Math.floor(x0 / ds / ts)), c1 = Math.min(cols - 1, Math.floor(x1 / ds / ts));
    const r0 = Math.max(0, Math.floor(y0 / ds / ts)), r1 = Math.min(rows - 1, Math.floor(y1 / ds / ts));
    let missing = 0;
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        const t = getTile(level, c, r, request);
        if (!t || !t.ok) { if (!t || !t.failed) missing++; continue; }
        const lx = c * ts - (c > 0 ? ov : 0), ly = r * ts - (r > 0 ? ov : 0);
        const [sx, sy] = toScreen(lx * ds, ly * ds);
        const [ex, ey] = toScreen((lx + t.img.naturalWidth) * ds, (ly + t.img.naturalHeight) * ds);
        ctx.drawImage(t.img, Math.floor(sx), Math.floor(sy), Math.ceil(ex - Math.floor(sx)), Math.ceil(ey - Math.floor(sy)));
      }
    }
    return missing;
  }

  function draw() {
    if (!st.dz) return;
    st.frame++;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);  // the whole bitmap: no stale rows at fractional sizes
    ctx.setTransform(st.dpr, 0, 0, st.dpr, 0, 0);
    ctx.imageSmoothingEnabled = true;
    const target = targetLevel();
    const base = Math.min(baseLevel(), target);
    const baseMissing = drawLevel(base, true);
    for (let l = Math.max(base + 1, target - 2); l < target; l++) drawLevel(l, false);
    const missing = target > base ? drawLevel(target, true) : baseMissing;

    const ovReady = !st.showOverlay || !st.channel || st.overlay.ok;
    if (st.showOverlay && st.overlay.ok && st.info.grid) {
      const g = st.info.grid;
      const [sx, sy] = toScreen(0, 0);
      ctx.save();
      ctx.globalAlpha = st.opacity;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(st.overlay.img, sx, sy, g.width * g.cell_l0 * st.zoom, g.height * g.cell_l0 * st.zoom);
      ctx.restore();
    }
    const tmeReady = !st.showTme || st.tme.ok;
    if (st.showTme && st.tme.ok) {
      const t = st.info.tme;
      const [sx, sy] = toScreen(t.origin_l0[0], t.origin_l0[1]);
      ctx.save();
      ctx.globalAlpha = st.opacity;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(st.tme.img, sx, sy, t.width * t.cell_l0 * st.zoom, t.height * t.cell_l0 * st.zoom);
      ctx.restore();
    }
    if (st.highlight !== null && st.tileData) {
      const i = st.highlight, s = st.tileData.tile_size_l0;
      const [sx, sy] = toScreen(st.tileData.x[i], st.tileData.y[i]);
      ctx.strokeStyle = "#2563eb";
      ctx.lineWidth = 2;
      ctx.strokeRect(sx, sy, s * st.zoom, s * st.zoom);
    }
    evictTiles();
    st.ready = missing === 0 && ovReady && tmeReady;
    document.body.dataset.ready = st.ready ? "1" : "0";
    const mpp = st.info && st.info.mpp;
    statusEl.textContent = `level ${target}/${st.dz.maxLevel} · ${(st.zoom).toFixed(3)} px per level-0 px` +
      (mpp ? ` · ${(mpp / st.zoom).toFixed(2)} µm per screen px` : "") + (missing ? ` · loading ${missing}` : "");
  }

  // ------------------------------------------------------------------ overlay, legend, galleries
  function overlayUrl() {
    return `${st.channel.overlay}?scale=${encodeURIComponent(ui.scale.value)}&smooth=${ui.smooth.checked ? "true" : "false"}`;
  }

  function loadOverlay() {
    if (!st.channel) return;
    const url = overlayUrl();
    if (st.overlay.url === url) { scheduleDraw(); return; }
    const img = new Image();
    st.overlay = { img, url, ok: false };
    img.onload = () => { if (st.overlay.img === img) { st.overlay.ok = true; scheduleDraw(); } };
    img.onerror = () => { statusEl.textContent = "overlay failed to load"; };
    img.src = url;
    scheduleDraw();
  }

  function drawLegend() {
    const c = ui.legendBar, g = c.getContext("2d");
    const lut = st.info.lut;
    for (let i = 0; i < c.width; i++) {
      g.fillStyle = lut[Math.round(i / (c.width - 1) * (lut.length - 1))];
      g.fillRect(i, 0, 1, c.height);
    }
    ui.legendTicks.textContent = "";
    if (!st.channel) return;
    const leg = st.channel.legend[ui.scale.value];
    const ticks = leg.ticks;
    for (const t of [ticks[0], ticks[Math.floor(ticks.length / 2)], ticks[ticks.length - 1]]) {
      const span = document.createElement("span");
      span.textContent = t[1];
      ui.legendTicks.appendChild(span);
    }
    ui.legendLabel.textContent = `${st.channel.label} — ${leg.label}`;
  }

  function fillThumbs(container, refs) {
    container.textContent = "";
    for (const ref of refs) {
      const fig = document.createElement("figure");
      fig.dataset.tileIndex = ref.index;
      const img = document.createElement("img");
      img.src = ref.image;
      img.alt = `tile ${ref.index}`;
      img.loading = "lazy";
      const cap = document.createElement("figcaption");
      cap.textContent = ref.score.toFixed(3);
      fig.appendChild(img);
      fig.appendChild(cap);
      fig.addEventListener("click", () => jumpToTile(ref.index, fig));
      container.appendChild(fig);
    }
  }

  function jumpToTile(i, fig) {
    if (!st.tileData) return;
    const s = st.tileData.tile_size_l0;
    document.querySelectorAll(".thumbs figure.active").forEach((f) => f.classList.remove("active"));
    if (fig) fig.classList.add("active");
    st.highlight = i;
    centreOn(st.tileData.x[i] + s / 2, st.tileData.y[i] + s / 2, Math.min(st.cssW, st.cssH) / (s * 4));
  }

  function selectChannel() {
    st.channel = st.info.channels.find((c) => c.key === ui.channel.value) || null;
    drawLegend();
    if (st.channel) {
      fillThumbs(ui.topk, st.channel.top);
      fillThumbs(ui.bottomk, st.channel.bottom);
      loadOverlay();
    }
  }

  // ------------------------------------------------------------------ tooltip
  function buildIndex(td) {
    const s = td.tile_size_l0, b = new Map();
    for (let i = 0; i < td.x.length; i++) {
      const k = Math.floor(td.x[i] / s) + "," + Math.floor(td.y[i] / s);
      if (!b.has(k)) b.set(k, []);
      b.get(k).push(i);
    }
    return b;
  }

  function tileAt(x, y) {
    const td = st.tileData;
    if (!td) return -1;
    const s = td.tile_size_l0, bx = Math.floor(x / s), by = Math.floor(y / s);
    let best = -1, bestD = Infinity;
    for (let dy = -1; dy <= 0; dy++) {
      for (let dx = -1; dx <= 0; dx++) {
        for (const i of st.buckets.get((bx + dx) + "," + (by + dy)) || []) {
          if (x >= td.x[i] && x < td.x[i] + s && y >= td.y[i] && y < td.y[i] + s) {
            const d = (td.x[i] + s / 2 - x) ** 2 + (td.y[i] + s / 2 - y) ** 2;
            if (d < bestD) { bestD = d; best = i; }
          }
        }
      }
    }
    return best;
  }

  function updateTooltip(sx, sy) {
    if (!st.channel || !st.tileData) { tooltip.hidden = true; return; }
    const [x, y] = toL0(sx, sy);
    const i = tileAt(x, y);
    if (i < 0) { tooltip.hidden = true; delete tooltip.dataset.tileIndex; return; }
    const v = st.tileData.values[st.channel.key][i];
    const p = st.tileData.percentiles[st.channel.key][i];
    tooltip.textContent = `${st.channel.label}: ${v === null ? "n/a" : v.toFixed(3)}` +
      (p === null ? "" : ` (p${Math.round(p * 100)})`) + ` · tile ${i} @ ${st.tileData.x[i]},${st.tileData.y[i]}`;
    tooltip.dataset.tileIndex = String(i);
    tooltip.dataset.value = v === null ? "" : String(v);
    tooltip.hidden = false;
    const left = Math.min(sx + 14, st.cssW - tooltip.offsetWidth - 4);
    tooltip.style.left = `${Math.max(0, left)}px`;
    tooltip.style.top = `${Math.max(0, sy + 14)}px`;
  }

  // ------------------------------------------------------------------ input
  function bindInput() {
    canvas.addEventListener("pointerdown", (e) => {
      st.drag = { x: e.clientX, y: e.clientY, ox: st.ox, oy: st.oy };
      canvas.setPointerCapture(e.pointerId);
      canvas.classList.add("dragging");
    });
    canvas.addEventListener("pointermove", (e) => {
      const r = canvas.getBoundingClientRect();
      if (st.drag) {
        st.ox = st.drag.ox - (e.clientX - st.drag.x) / st.zoom;
        st.oy = st.drag.oy - (e.clientY - st.drag.y) / st.zoom;
        tooltip.hidden = true;
        scheduleDraw();
      } else {
        updateTooltip(e.clientX - r.left, e.clientY - r.top);
      }
    });
    const endDrag = () => { st.drag = null; canvas.classList.remove("dragging"); };
    canvas.addEventListener("pointerup", endDrag);
    canvas.addEventListener("pointercancel", endDrag);
    canvas.addEventListener("pointerleave", () => { tooltip.hidden = true; });
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = canvas.getBoundingClientRect();
      zoomAt(e.clientX - r.left, e.clientY - r.top, Math.exp(-e.deltaY * 0.0015));
    }, { passive: false });
    canvas.addEventListener("keydown", (e) => {
      const step = 80 / st.zoom;
      if (e.key === "+" || e.key === "=") zoomAt(st.cssW / 2, st.cssH / 2, 1.5);
      else if (e.key === "-") zoomAt(st.cssW / 2, st.cssH / 2, 1 / 1.5);
      else if (e.key === "0") { fitView(); scheduleDraw(); }
      else if (e.key === "ArrowLeft") { st.ox -= step; scheduleDraw(); }
      else if (e.key === "ArrowRight") { st.ox += step; scheduleDraw(); }
      else if (e.key === "ArrowUp") { st.oy -= step; scheduleDraw(); }
      else if (e.key === "ArrowDown") { st.oy += step; scheduleDraw(); }
    });
    ui.toggle.addEventListener("change", () => { st.showOverlay = ui.toggle.checked; loadOverlay(); scheduleDraw(); });
    ui.channel.addEventListener("change", selectChannel);
    ui.scale.addEventListener("change", () => { drawLegend(); loadOverlay(); });
    ui.smooth.addEventListener("change", loadOverlay);
    ui.opacity.addEventListener("input", () => {
      st.opacity = ui.opacity.value / 100;
      ui.opacityValue.textContent = `${ui.opacity.value}%`;
      scheduleDraw();
    });
    new ResizeObserver(resize).observe(canvas);
  }

  // ------------------------------------------------------------------ the TME tissue-class map
  function setupTme() {
    const t = st.info.tme;
    if (!t) return;
    ui.tmeSection.hidden = false;
    // a call close to a threshold is borderline (tme.csv phenotype_margin; the server decides: rules.is_borderline)
    const borderline = t.borderline  // implies a finite margin
      ? ` (borderline: ${(100 * t.margin).toFixed(1)} % from its threshold)` : "";
    ui.tmePhenotype.textContent = t.phenotype ? `immune phenotype: ${t.phenotype}${borderline}` : "";
    ui.tmePhenotype.title = t.reason || "";
    for (const c of t.classes) {
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = c.color;
      li.appendChild(sw);
      li.appendChild(document.createTextNode(` ${c.name}` + (c.share === null ? "" : ` ${(100 * c.share).toFixed(0)}%`)));
      ui.tmeLegend.appendChild(li);
    }
    ui.tmeToggle.addEventListener("change", () => {
      st.showTme = ui.tmeToggle.checked;
      if (st.showTme && !st.tme.img) {
        const img = new Image();
        st.tme = { img, ok: false };
        img.onload = () => { st.tme.ok = true; scheduleDraw(); };
        img.onerror = () => { statusEl.textContent = "tissue-class map failed to load"; };
        img.src = t.overlay;
      }
      scheduleDraw();
    });
  }

  function formatPrediction(pred) {
    const parts = [];
    for (const [k, v] of Object.entries(pred || {})) {
      if (k === "patient_id" || v === null || v === "") continue;
      if (k.endsWith("_pred") || k.endsWith("_prob") || k.endsWith("_risk")) {
        parts.push(`${k}: ${typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(3)) : v}`);
      }
    }
    return parts.join(" · ");
  }

  // ------------------------------------------------------------------ start
  async function main() {
    const info = await (await fetch(`/api/slides/${encodeURIComponent(slideId)}`)).json();
    st.info = info;
    document.title = `wsi-pipeline · ${slideId}`;
    document.getElementById("slide-title").textContent = slideId;
    document.getElementById("prediction").textContent = formatPrediction(info.prediction);
    st.dz = parseDzi(await (await fetch(info.dzi)).text(), info.dzi);
    for (const s of info.scales) ui.scale.appendChild(new Option(s, s));
    for (const c of info.channels) ui.channel.appendChild(new Option(c.label, c.key));
    ui.toggle.disabled = ui.channel.disabled = !info.channels.length;
    st.opacity = ui.opacity.value / 100;
    bindInput();
    setupTme();
    resize();
    fitView();
    if (info.channels.length) {
      st.tileData = await (await fetch(info.tiles)).json();
      st.buckets = buildIndex(st.tileData);
      ui.toggle.checked = st.showOverlay = true;  // a model's scores exist: show the first target's overlay
      selectChannel();
    }
    scheduleDraw();
  }

  // hooks for people debugging and for the browser tests
  window.wsiViewer = {
    get ready() { return st.ready; },
    get state() { return { ox: st.ox, oy: st.oy, zoom: st.zoom, level: st.dz ? targetLevel() : null }; },
    l0ToClient(x, y) {
      const r = canvas.getBoundingClientRect();
      const [sx, sy] = toScreen(x, y);
      return { x: r.left + sx, y: r.top + sy };
    },
    centreOn, jumpToTile, fitView: () => { fitView(); scheduleDraw(); },
  };

  main().catch((e) => { statusEl.textContent = "failed to load: " + e; });
})();
