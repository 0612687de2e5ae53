// The built-in dashboard: panels from /api/panels drawn with uPlot (vendored), pipeline
// health from /api/pipeline. Range, filters and refresh live in the URL's hash, so a view can
// be bookmarked. The page asks nothing of any host but its own.
"use strict";

const SECTIONS = [
  ["Call quality", 0], ["Session health", 4], ["Login health", 6], ["Adoption", 8],
];
const COLOURS = ["#2e6be6", "#f79009", "#d92d20", "#12b76a", "#7a5af8", "#667085",
                 "#0ba5ec", "#ee46bc"];
const FILTER_NAMES = {
  app_id: "App", software_version: "Version", os_family: "OS", browser_family: "Browser",
  country_code: "Country",
};
const PIPELINE = [
  ["Pipeline: events per second", ["events_in_per_s", "enriched_per_s", "rows_written_per_s"],
   ["in (collector)", "enriched (worker)", "rows written (sink)"]],
  ["Pipeline: refused per second, by reason", null, null],
  ["Pipeline: consumer lag (records)", ["stream_lag", "sink_lag"], ["worker", "sink"]],
];

const state = { about: null, charts: [], timer: null, refreshes: 0 };

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function formatter(unit) {
  if (unit === "percentunit") return (v) => (v == null ? "–" : (v * 100).toFixed(1) + " %");
  if (unit === "ms") return (v) => (v == null ? "–" : v.toFixed(0) + " ms");
  if (unit === "s") return (v) => (v == null ? "–" : v.toFixed(v < 10 ? 2 : 0) + " s");
  return (v) => (v == null ? "–" : Number.isInteger(v) ? String(v) : v.toFixed(2));
}

function query(extra = {}) {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const [key, value] of Object.entries(extra)) params.set(key, value);
  for (const [key, value] of [...params]) if (!value) params.delete(key);
  return params;
}

function setHash(key, value) {
  const params = query({ [key]: value });
  history.replaceState(null, "", "#" + params.toString());
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error((await response.text()) || response.statusText);
  return response.json();
}

// Columns after "time": numbers are series; one text column (a reason) pivots into series.
function timeSeries(columns, rows) {
  const textColumn = columns.findIndex((c, i) => i > 0 && rows.some((r) => typeof r[i] === "string"));
  const times = [...new Set(rows.map((r) => r[0]))].sort((a, b) => a - b);
  const at = new Map(times.map((t, i) => [t, i]));
  if (textColumn < 0) {
    const series = columns.slice(1).map((name, i) => ({ name, values: rows.map((r) => r[i + 1]) }));
    return { times: rows.map((r) => r[0]), series };
  }
  const valueColumn = columns.findIndex((c, i) => i > 0 && i !== textColumn);
  const byName = new Map();
  for (const row of rows) {
    const name = row[textColumn] || "(none)";
    if (!byName.has(name)) byName.set(name, new Array(times.length).fill(null));
    byName.get(name)[at.get(row[0])] = row[valueColumn];
  }
  return { times, series: [...byName].map(([name, values]) => ({ name, values })) };
}

function drawChart(body, times, series, unit) {
  const format = formatter(unit);
  const width = Math.max(body.clientWidth, 300);
  const options = {
    width, height: 210, scales: { x: { time: true } },
    series: [{}, ...series.map((s, i) => ({
      label: s.name, stroke: COLOURS[i % COLOURS.length], width: 1.6, spanGaps: false,
      points: { show: times.length < 40, size: 5 }, value: (u, v) => format(v),
    }))],
    axes: [{}, { values: (u, values) => values.map(format), size: 64 }],
  };
  const chart = new uPlot(options, [times, ...series.map((s) => s.values)], body);
  state.charts.push({ chart, body });
  return times.length * series.length;
}

function drawBars(body, columns, rows) {
  const max = Math.max(...rows.map((r) => r[1]), 1);
  const bars = el("div", { class: "bars" });
  for (const [name, value] of rows) {
    const bar = el("div", { class: "bar" });
    bar.style.width = ((100 * value) / max).toFixed(1) + "%";
    bars.append(el("span", { class: "name", title: name }, name || "(unknown)"),
                el("span", {}, bar), el("span", { class: "num" }, String(value)));
  }
  body.append(bars);
  return rows.length;
}

function drawTable(body, columns, rows, unit) {
  const table = el("table");
  table.append(el("tr", {}, ...columns.map((c, i) => el("th", i ? { class: "num" } : {}, c))));
  for (const row of rows) {
    table.append(el("tr", {}, ...row.map((v, i) => el("td", i ? { class: "num" } : {},
      typeof v === "number" && !Number.isInteger(v) ? formatter("percentunit")(v) : String(v ?? "–")))));
  }
  body.append(table);
  return rows.length;
}

function panelCard(id, title) {
  const card = el("section", { class: "panel", "data-panel": id, "data-state": "loading" },
                  el("h3", {}, title), el("p", { class: "note" }), el("div", { class: "body" }));
  return card;
}

function showPanel(card, draw, note) {
  const body = card.querySelector(".body");
  body.replaceChildren();
  card.querySelector(".note").textContent = note || "";
  const points = draw(body);
  card.dataset.points = String(points);
  card.dataset.state = points ? "ok" : "empty";
  if (!points) body.textContent = "No data in this range.";
}

function showError(card, error) {
  card.dataset.state = "error";
  card.dataset.points = "0";
  card.querySelector(".body").textContent = String(error.message || error).slice(0, 200);
}

async function loadPanel(card, panel, params) {
  try {
    const data = await getJson(`/api/panel/${panel.id}?${params}`);
    const filtering = [...params.keys()].some((k) => k in FILTER_NAMES);
    const note = filtering && !data.filtered ? "Not filterable by these dimensions: all traffic." : "";
    showPanel(card, (body) => {
      if (!data.rows.length) return 0;
      if (data.kind === "timeseries") {
        const { times, series } = timeSeries(data.columns, data.rows);
        return drawChart(body, times, series, data.unit);
      }
      if (data.kind === "barchart") return drawBars(body, data.columns, data.rows);
      return drawTable(body, data.columns, data.rows, data.unit);
    }, note);
  } catch (error) {
    showError(card, error);
  }
}

async function loadPipeline(cards) {
  try {
    const data = await getJson("/api/pipeline");
    const reasons = Object.keys(data.columns).filter(
      (c) => c.startsWith("refused_") && data.columns[c].some((v) => v > 0));
    const silent = Object.entries(data.reachable).filter(([, ok]) => !ok).map(([n]) => n);
    PIPELINE.forEach(([, names, labels], i) => {
      const columns = names || reasons;
      const series = columns.map((c, j) => ({
        name: labels ? labels[j] : c.replace(/^refused_|_per_s$/g, ""), values: data.columns[c],
      }));
      const note = silent.length ? `Not answering: ${silent.join(", ")}.` : "";
      showPanel(cards[i], (body) => (data.time.length && series.length
        ? drawChart(body, data.time, series, "short") : 0), note);
      if (!names && data.time.length) { // no refusal at all is data too
        cards[i].dataset.points = String(Math.max(Number(cards[i].dataset.points), data.time.length));
        if (!series.length) {
          cards[i].dataset.state = "ok";
          cards[i].querySelector(".body").textContent = "No event refused in the last hour.";
        }
      }
    });
  } catch (error) {
    cards.forEach((card) => showError(card, error));
  }
}

async function loadFilters() {
  const params = query();
  const values = await getJson(`/api/filters?range=${params.get("range") || "24h"}`);
  const holder = document.getElementById("filters");
  holder.replaceChildren();
  for (const dimension of state.about.filters) {
    const select = el("select", { name: dimension, id: `filter-${dimension}` },
                      el("option", { value: "" }, "all"));
    const chosen = params.get(dimension) || "";
    const options = new Set(values[dimension] || []);
    if (chosen) options.add(chosen);
    for (const value of [...options].sort()) select.append(el("option", { value }, value));
    select.value = chosen;
    select.addEventListener("change", () => { setHash(dimension, select.value); refresh(); });
    holder.append(el("label", {}, FILTER_NAMES[dimension] + " ", select));
  }
}

let sqlCards = [];
let pipelineCards = [];

function layout() {
  const main = document.getElementById("panels");
  main.replaceChildren();
  sqlCards = [];
  state.about.panels.forEach((panel, i) => {
    const section = SECTIONS.find(([, first]) => first === i);
    if (section) main.append(el("h2", {}, section[0]));
    const card = panelCard(`sql-${panel.id}`, panel.title);
    sqlCards.push(card);
    main.append(card);
  });
  main.append(el("h2", {}, "Pipeline health (last hour, from the stages' metrics)"));
  pipelineCards = PIPELINE.map(([title], i) => panelCard(`pipeline-${i}`, title));
  main.append(...pipelineCards);
}

async function refresh() {
  document.body.dataset.state = "loading";
  for (const { chart } of state.charts) chart.destroy();
  state.charts = [];
  const params = query();
  if (!params.get("range")) params.set("range", "24h");
  await Promise.all([
    ...state.about.panels.map((panel, i) => loadPanel(sqlCards[i], panel, params)),
    loadPipeline(pipelineCards),
  ]);
  state.refreshes += 1;
  document.getElementById("updated").textContent =
    "updated " + new Date().toLocaleTimeString();
  document.body.dataset.refreshes = String(state.refreshes);
  document.body.dataset.state = "ready";
}

function schedule() {
  clearInterval(state.timer);
  const seconds = Number(document.getElementById("refresh").value);
  setHash("refresh", seconds === 30 ? "" : String(seconds));
  if (seconds > 0) state.timer = setInterval(refresh, seconds * 1000);
}

async function start() {
  state.about = await getJson("/api/panels");
  const params = query();
  const range = document.getElementById("range");
  for (const name of state.about.ranges) range.append(el("option", { value: name }, name));
  range.value = params.get("range") || "24h";
  range.addEventListener("change", async () => {
    setHash("range", range.value === "24h" ? "" : range.value);
    await loadFilters();
    refresh();
  });
  const every = document.getElementById("refresh");
  if (params.get("refresh")) every.value = params.get("refresh");
  every.addEventListener("change", schedule);
  document.getElementById("about").textContent =
    `Aggregates only: within each hour, a group of fewer than ${state.about.min_users} users ` +
    `reads "${state.about.other}". ClickHouse: ${state.about.backend}.`;
  layout();
  try { await loadFilters(); } catch (error) { /* ClickHouse not answering yet: panels say so */ }
  await refresh();
  schedule();
  window.addEventListener("resize", () => {
    for (const { chart, body } of state.charts) {
      chart.setSize({ width: Math.max(body.clientWidth, 300), height: 210 });
    }
  });
}

document.addEventListener("DOMContentLoaded", start);
