// CLMS analytics dashboard: vanilla JS, no dependencies. Draws the municipality map from GeoJSON
// as SVG, then renders every `counts` event of the SSE stream (/v1/stream) into the map, the
// funnel bars and the table, without reloading the page.
"use strict";

// A coordinator's or analyst's token (pasted into the form, kept in this page's memory only,
// never in a URL) shows exact figures: it buys a one-time stream ticket (POST /v1/stream/ticket).
let token = null;
const SUPPRESSED = "c"; // published view: 1-5, or hidden so that such a count cannot be worked out

const STAGES = [
  ["identified", "Identified"], ["referred", "Referred"], ["acknowledged_in_time", "Acknowledged in time"],
  ["accepted", "Accepted"], ["completed", "Completed"], ["withdrawn", "Withdrawn from work"],
  ["school_enrolled", "Enrolled in school"],
];
const COLUMNS = ["population", "identified", "per_10000", "referred", "acknowledged_in_time", "accepted",
  "completed", "withdrawn", "school_enrolled", "open_referrals", "overdue_referrals"];
// identifications per 10,000 residents
const BREAKS = [[0.5, "#fde0c5"], [1, "#facba6"], [2, "#f59e72"], [5, "#e8634a"], [Infinity, "#b3261e"]];
const ZERO = "#eef1f4", HIDDEN = "#9fb0c6", NODATA = "#ffffff";

const svgNS = "http://www.w3.org/2000/svg";
const paths = new Map(); // slug -> SVG path
const rows = new Map(); // slug -> table row
let last = null;

function colourFor(m) {
  if (m.identified === 0) return ZERO;
  if (m.identified === SUPPRESSED) return HIDDEN;
  if (m.per_10000 === null || m.per_10000 === undefined) return NODATA;
  for (const [limit, colour] of BREAKS) if (m.per_10000 < limit) return colour;
  return BREAKS[BREAKS.length - 1][1];
}

function fmt(v) {
  if (v === null || v === undefined) return "\u2013";
  if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(2);
  return typeof v === "number" ? v.toLocaleString("en") : String(v);
}

function legend() {
  const el = document.getElementById("legend");
  const items = [[ZERO, "none"], [HIDDEN, "suppressed (c)"]];
  let lo = 0;
  for (const [limit, colour] of BREAKS) {
    items.push([colour, limit === Infinity ? "\u2265 " + lo : lo + "\u2013" + limit]);
    lo = limit;
  }
  el.innerHTML = "";
  for (const [c, label] of items) {
    const s = document.createElement("span");
    s.innerHTML = `<i style="background:${c}"></i>${label}`;
    el.appendChild(s);
  }
}

// --- map ---------------------------------------------------------------------------------------
function drawMap(geo) {
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  const polys = (g) => (g.type === "Polygon" ? [g.coordinates] : g.coordinates);
  for (const f of geo.features) for (const poly of polys(f.geometry)) for (const ring of poly) for (const [x, y] of ring) {
    minX = Math.min(minX, x); maxX = Math.max(maxX, x); minY = Math.min(minY, y); maxY = Math.max(maxY, y);
  }
  const k = Math.cos(((minY + maxY) / 2) * Math.PI / 180); // equirectangular, true scale at mid-latitude
  const W = 600, scale = W / ((maxX - minX) * k), H = Math.ceil((maxY - minY) * scale);
  const project = ([x, y]) => [((x - minX) * k * scale).toFixed(1), ((maxY - y) * scale).toFixed(1)];
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  for (const f of geo.features) {
    let d = "";
    for (const poly of polys(f.geometry)) for (const ring of poly) d += "M" + ring.map((p) => project(p).join(",")).join("L") + "Z";
    const p = document.createElementNS(svgNS, "path");
    p.setAttribute("d", d);
    p.setAttribute("fill", NODATA);
    p.setAttribute("fill-rule", "evenodd");
    p.classList.add("municipality");
    p.dataset.slug = f.properties.slug;
    const title = document.createElementNS(svgNS, "title");
    title.textContent = f.properties.slug;
    p.appendChild(title);
    p.addEventListener("mouseenter", () => hover(f.properties.slug));
    svg.appendChild(p);
    paths.set(f.properties.slug, p);
  }
  document.getElementById("map").appendChild(svg);
}

function hover(slug) {
  const m = last && last.municipalities.find((x) => x.slug === slug);
  if (!m) return;
  document.getElementById("hover").textContent =
    `${m.name}: ${fmt(m.identified)} identified, ${fmt(m.per_10000)} per 10,000 residents, ${fmt(m.referred)} referred`;
}

// --- funnel and table -----------------------------------------------------------------------------
function renderFunnel(stages) {
  const el = document.getElementById("funnel");
  const byStage = Object.fromEntries(stages.map((s) => [s.stage, s.count]));
  const top = typeof byStage.identified === "number" && byStage.identified > 0 ? byStage.identified : 5;
  if (!el.childElementCount) {
    for (const [stage, label] of STAGES) {
      const row = document.createElement("div");
      row.className = "bar";
      row.dataset.stage = stage;
      row.innerHTML = `<span class="label">${label}</span><span class="track"><span class="fill"></span></span><span class="value"></span>`;
      el.appendChild(row);
    }
  }
  for (const row of el.children) {
    const v = byStage[row.dataset.stage];
    const n = typeof v === "number" ? v : 2.5; // "c": a short bar, the label says why
    row.querySelector(".fill").style.width = Math.min(100, (100 * n) / top) + "%";
    row.querySelector(".value").textContent = fmt(v);
  }
}

function renderTable(munis) {
  const body = document.querySelector("#table tbody");
  for (const m of munis) {
    let tr = rows.get(m.slug);
    if (!tr) {
      tr = document.createElement("tr");
      tr.id = "row-" + m.slug;
      tr.innerHTML = `<td>${m.name}</td>` + COLUMNS.map((c) => `<td data-field="${c}"></td>`).join("");
      body.appendChild(tr);
      rows.set(m.slug, tr);
    }
    let changed = false;
    for (const c of COLUMNS) {
      const td = tr.querySelector(`[data-field="${c}"]`);
      const text = fmt(m[c]);
      if (td.textContent !== text) { changed = changed || td.textContent !== ""; td.textContent = text; }
    }
    if (changed) { tr.classList.add("changed"); setTimeout(() => tr.classList.remove("changed"), 1500); }
  }
}

function render(data) {
  last = data;
  for (const m of data.municipalities) {
    const p = paths.get(m.slug);
    if (!p) continue;
    const fill = colourFor(m);
    if (p.getAttribute("fill") !== fill && p.getAttribute("fill") !== NODATA) {
      p.classList.add("flash"); setTimeout(() => p.classList.remove("flash"), 1200);
    }
    p.setAttribute("fill", fill);
    p.dataset.identified = String(m.identified);
    p.querySelector("title").textContent = `${m.name}: ${fmt(m.identified)} identified (${fmt(m.per_10000)} per 10,000)`;
  }
  renderFunnel(data.funnel);
  renderTable(data.municipalities);
  const asOf = document.getElementById("as-of");
  if (asOf) asOf.textContent = data.as_of ? "Published figures as of " + data.as_of.replace("T", " ").replace("+00:00", " UTC") + "." : "";
  document.body.dataset.updated = String(Date.now());
}

function setStatus(state, text) {
  const el = document.getElementById("status");
  el.dataset.state = state;
  el.textContent = text;
}

async function start() {
  legend();
  try {
    const geo = await (await fetch("/static/kosovo_municipalities.geojson")).json();
    drawMap(geo);
  } catch (e) {
    document.getElementById("map").textContent = "The map could not be loaded.";
  }
  document.getElementById("signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const field = document.getElementById("token");
    token = field.value.trim() || null;
    field.value = "";
    connect();
  });
  connect();
}

let source = null;

async function streamUrl() {
  if (!token) return "/v1/stream";
  const r = await fetch("/v1/stream/ticket", { method: "POST", headers: { Authorization: "Bearer " + token } });
  if (!r.ok) {
    token = null;
    document.getElementById("viewer").textContent = "The token was refused (" + r.status + "): showing the public view.";
    return "/v1/stream";
  }
  document.getElementById("viewer").textContent = "Signed in: figures you coordinate are exact.";
  return (await r.json()).url;
}

async function connect() {
  if (source) source.close();
  const es = new EventSource(await streamUrl());
  source = es;
  es.addEventListener("counts", (ev) => { setStatus("live", "live"); render(JSON.parse(ev.data)); });
  es.addEventListener("expired", () => { es.close(); token = null; connect(); });
  es.onopen = () => setStatus("live", "live");
  es.onerror = () => {
    setStatus("offline", "reconnecting\u2026");
    // a ticket works once: a signed-in stream reconnects with a new one
    if (token || es.readyState === EventSource.CLOSED) { es.close(); setTimeout(connect, 2000); }
  };
}

start();
