// Slide list: one row per slide of the RUN folder with its predictions.
"use strict";

function fmt(v) {
  if (v === null || v === undefined || v === "") return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(3);
  return String(v);
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

async function main() {
  const resp = await fetch("/api/slides");
  const data = await resp.json();
  document.getElementById("run-info").textContent =
    `run ${data.run} · model ${data.model || "none"} · ${data.slides.length} slides`;
  const head = document.getElementById("slides-head");
  for (const c of data.columns) head.appendChild(el("th", {}, c));
  const body = document.getElementById("slides-body");
  body.textContent = "";
  for (const s of data.slides) {
    const tr = el("tr", { "data-slide-id": s.slide_id });
    const name = el("td");
    const a = el("a", { href: s.url }, s.slide_id);
    name.appendChild(a);
    if (!s.has_scores) name.appendChild(el("span", { class: "muted small" }, " (no scores)"));
    tr.appendChild(name);
    const th = el("td");
    const img = el("img", { src: s.thumbnail, alt: "", loading: "lazy" });
    img.onerror = () => { img.remove(); th.textContent = "unavailable"; };
    const link = el("a", { href: s.url });
    link.appendChild(img);
    th.appendChild(link);
    tr.appendChild(th);
    for (const c of data.columns) {
      const v = s.prediction[c];
      tr.appendChild(el("td", { class: typeof v === "number" ? "num" : "" }, fmt(v)));
    }
    body.appendChild(tr);
  }
  if (!data.slides.length) body.appendChild(el("tr", {}, "no tiled slides in this run"));
}

main().catch((e) => {
  document.getElementById("slides-body").textContent = "failed to load: " + e;
});
