// fedge dashboard: re-fetch the server-rendered content every few seconds and redraw the charts (uPlot).
(function () {
  "use strict";
  const live = document.getElementById("live");
  const section = document.getElementById("charts");
  const refreshMs = Number(live.dataset.refreshMs) || 2000;
  const COLORS = { global: "#2563eb", personal: "#16a34a", naive: "#374151", reported: "#2563eb",
                   selected: "#9ca3af", seconds: "#7c3aed" };
  const LABELS = { global: "global head", personal: "personalised", naive: "seasonal naive",
                   reported: "updates", selected: "asked", seconds: "seconds" };
  const SERIES = { error: ["global", "personal", "naive"], participation: ["selected", "reported"],
                   duration: ["seconds"], devices: ["global", "personal", "naive"] };
  const plots = {};

  function chartData() {
    const el = document.getElementById("chart-data");
    return el ? JSON.parse(el.textContent) : {};
  }

  function height() { return window.innerWidth < 600 ? 170 : 220; }

  function options(name, el, d) {
    const perDevice = name === "devices";
    const series = [{ label: perDevice ? "device" : "round" }];
    for (const key of SERIES[name]) {
      const s = { label: LABELS[key], stroke: COLORS[key], width: 2, spanGaps: !perDevice };
      if (key === "naive" || key === "selected") s.dash = [6, 4];
      if (perDevice) Object.assign(s, { paths: () => null, points: { show: true, size: 9, fill: COLORS[key] } });
      if (name === "duration") Object.assign(s, { fill: "rgba(124,58,237,0.15)" });
      series.push(s);
    }
    const xAxis = { grid: { show: false } };
    if (perDevice) {
      xAxis.splits = () => (d.names.length <= 40 ? d.names.map((_, i) => i) : []);
      xAxis.values = (u, vals) => vals.map((v) => d.names[v] ?? "");
      const labelled = d.names.length <= 40;  // beyond that the names are on the table, not the axis
      if (!labelled) xAxis.values = () => [];
      const longest = labelled ? Math.max(1, ...d.names.map((n) => n.length)) : 1;
      const slanted = d.names.length * longest * 7 > el.clientWidth * 0.9;  // names would overlap side by side
      xAxis.rotate = slanted ? -30 : 0;
      xAxis.size = slanted ? 30 + Math.ceil(longest * 3.6) : 30;  // sin(30°) of the label's width, plus a margin
    } else {
      xAxis.incrs = [1, 2, 5, 10, 20, 50, 100];
      xAxis.values = (u, vals) => vals.map((v) => (Number.isInteger(v) ? String(v) : ""));
    }
    const xScale = perDevice ? { time: false, range: () => [-0.5, Math.max(0.5, d.names.length - 0.5)] }
                             : { time: false };
    return { width: el.clientWidth, height: height(), series, scales: { x: xScale },
             axes: [xAxis, { size: 50 }], legend: { live: false }, cursor: { drag: { x: false, y: false } } };
  }

  function columns(name, d) {
    const x = name === "devices" ? d.names.map((_, i) => i) : d.x;
    return [x, ...SERIES[name].map((k) => d[k])];
  }

  function draw(all) {
    if (!section || typeof uPlot === "undefined") return;
    for (const el of section.querySelectorAll("[data-chart]")) {
      const name = el.dataset.chart;
      const d = all[name];
      if (!d) continue;
      const key = name === "devices" ? d.names.join("|") : "";
      const p = plots[name];
      if (p && p.key === key) {
        p.plot.setData(columns(name, d));
      } else {  // first draw, or the device list changed (the x axis labels are part of the options)
        if (p) p.plot.destroy();
        plots[name] = { key, el, plot: new uPlot(options(name, el, d), columns(name, d), el) };
      }
    }
  }

  async function refresh() {
    if (document.hidden || !section) return;
    try {
      const url = new URL(section.dataset.fragment, location.href);
      for (const [k, v] of new URLSearchParams(location.search)) if (!url.searchParams.has(k)) url.searchParams.set(k, v);
      const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) throw new Error(String(r.status));
      const fresh = document.createElement("template");
      fresh.innerHTML = await r.text();
      for (const slot of fresh.content.querySelectorAll("[data-slot]")) {  // top: tiles, bottom: tables
        document.getElementById(slot.dataset.slot).replaceChildren(...slot.childNodes);
      }
      draw(chartData());
      live.textContent = "live";
      live.className = "live ok";
    } catch (err) {
      live.textContent = "no connection";
      live.className = "live err";
    }
  }

  window.addEventListener("resize", () => {
    for (const p of Object.values(plots)) p.plot.setSize({ width: p.el.clientWidth, height: height() });
  });
  draw(chartData());
  live.className = "live ok";
  setInterval(refresh, refreshMs);
})();
