/* edgecloud fleet console.
 *
 * Plain JavaScript, no framework and no build step: the page is a few tables, forms and line
 * plots, and every figure comes from the controller's documented JSON API (docs/fleet.md), the
 * same calls the CLI makes. Views poll the API every POLL_MS while the tab is visible (one
 * refresh in flight at a time, backing off to MAX_BACKOFF_MS while the controller is
 * unreachable), so a console left open costs the controller a few small requests a second.
 * Everything is built with DOM calls (never innerHTML), so a device id or a reason a device
 * sent is always shown as text. Plots are inline SVG drawn here.
 */
"use strict";
(() => {
  const POLL_MS = 2000;
  const MAX_BACKOFF_MS = 30000;
  const KEEP_RECORDS = 720; // telemetry records per device kept for its plots
  const STATES = ["SUCCEEDED", "IN_PROGRESS", "QUEUED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"];
  const COLORS = {
    SUCCEEDED: "#1a7f37", IN_PROGRESS: "#9a6700", QUEUED: "#1f6feb", FAILED: "#cf222e",
    REJECTED: "#a40e26", TIMED_OUT: "#fb8f44", CANCELED: "#8250df", REMOVED: "#818b98",
  };
  const PALETTE = ["#1f6feb", "#1a7f37", "#cf222e", "#8250df", "#9a6700", "#0a7a7a", "#bf3989", "#57606a"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SVG_TAGS = new Set(["svg", "path", "line", "rect", "text", "g", "title", "circle", "polyline"]);
  const main = document.getElementById("main");
  const conn = document.getElementById("conn");

  // -- helpers -------------------------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const svg = SVG_TAGS.has(tag);
    const el = svg ? document.createElementNS(SVG_NS, tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "style") Object.assign(el.style, v); // CSSOM: allowed by the page's CSP
      else if (k === "value" && !svg) el.value = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false || kid === "") continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  const enc = encodeURIComponent;
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %");
  const fmt = (v, d = 1) => (num(v) === null ? "–" : Number(v).toFixed(d));
  function ago(ts) {
    if (!ts) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }
  function clock(ts) {
    if (!ts) return "–";
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }
  function when(ts) {
    if (!ts) return "–";
    return new Date(ts * 1000).toLocaleString([], { hour12: false });
  }
  const badge = (text, cls) => h("span", { class: "badge " + (cls || text) }, text);
  const json = (obj) => h("pre", { class: "json" }, JSON.stringify(obj === undefined ? null : obj, null, 2));
  const msg = (text, kind) => h("div", { class: "msg " + (kind || "error"), role: kind === "ok" ? "status" : "alert" }, text);

  // -- the API -------------------------------------------------------------------------------
  const TOKEN_KEY = "edgecloud-fleet-token";
  function takeToken() {
    const m = location.hash.match(/(?:^#|[&/])token=([^&]*)/);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search + "#/fleet");
    }
  }
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(path, opts = {}) {
    const headers = {};
    if (token()) headers.Authorization = "Bearer " + token();
    let body;
    if (opts.raw !== undefined) { body = opts.raw; headers["Content-Type"] = "application/gzip"; }
    else if (opts.body !== undefined) { body = JSON.stringify(opts.body); headers["Content-Type"] = "application/json"; }
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), opts.raw !== undefined ? 600000 : 15000);
    let r;
    try {
      r = await fetch(path, { method: opts.method || "GET", headers, body, signal: abort.signal, cache: "no-store" });
    } catch (e) {
      throw new ApiError(0, "controller unreachable (" + (e.name === "AbortError" ? "timed out" : e.message) + ")");
    } finally { clearTimeout(timer); }
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) throw new ApiError(r.status, (data && data.error) || "HTTP " + r.status);
    return data;
  }

  // -- confirmation --------------------------------------------------------------------------
  function confirmAction(text) {
    const dlg = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise((resolve) => {
      const yes = document.getElementById("confirm-yes");
      const no = document.getElementById("confirm-no");
      const done = (v) => { yes.onclick = no.onclick = null; dlg.close(); resolve(v); };
      yes.onclick = () => done(true);
      no.onclick = () => done(false);
      dlg.oncancel = () => done(false);
      dlg.showModal();
    });
  }
  async function act(box, text, fn, okText) {
    if (!(await confirmAction(text))) return null;
    box.replaceChildren();
    try {
      const out = await fn();
      box.append(msg(okText(out), "ok"));
      schedule(0);
      return out;
    } catch (e) {
      box.append(msg(e.message));
      return null;
    }
  }

  // -- plots (inline SVG) --------------------------------------------------------------------
  function linePlot(title, series, o = {}) {
    const W = 480, H = o.height || 190, L = 44, R = 10, T = 8, B = 22;
    const pts = series.flatMap((s) => s.points.filter((p) => num(p[1]) !== null));
    const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    const box = h("div", { class: "plot", "data-plot": o.id || title }, h("h3", {}, title), svg);
    if (!pts.length) {
      svg.append(h("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, o.empty || "no data yet"));
      return box;
    }
    const xs = pts.map((p) => p[0]);
    let x0 = o.x0 !== undefined ? o.x0 : Math.min(...xs), x1 = o.x1 !== undefined ? o.x1 : Math.max(...xs);
    if (x1 <= x0) { x0 -= 1; x1 += 1; }
    let y0 = o.ymin !== undefined ? o.ymin : Math.min(0, ...pts.map((p) => p[1]));
    let y1 = o.ymax !== undefined ? o.ymax : Math.max(...pts.map((p) => p[1]));
    if (y1 <= y0) y1 = y0 + 1;
    const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const yf = o.yfmt || ((v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(Math.abs(v) >= 10 ? 1 : 2)));
    for (let i = 0; i <= 4; i++) {
      const v = y0 + ((y1 - y0) * i) / 4;
      svg.append(h("line", { class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
      svg.append(h("text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end" }, yf(v)));
    }
    svg.append(h("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    svg.append(h("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    svg.append(h("text", { x: L, y: H - 6 }, clock(x0)));
    svg.append(h("text", { x: W - R, y: H - 6, "text-anchor": "end" }, clock(x1)));
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      let d = "", pen = false, last = null;
      for (const [x, y] of s.points) {
        if (num(y) === null) { pen = false; continue; }
        d += (pen ? "L" : "M") + X(x).toFixed(1) + " " + Y(y).toFixed(1) + " ";
        pen = true; last = [x, y];
      }
      if (d) svg.append(h("path", { d, fill: "none", stroke: color, "stroke-width": s.width || 2, "stroke-linejoin": "round" }));
      if (last) svg.append(h("circle", { cx: X(last[0]), cy: Y(last[1]), r: 2.5, fill: color }));
    });
    box.append(h("div", { class: "legend" }, series.map((s, i) => {
      const lastPt = [...s.points].reverse().find((p) => num(p[1]) !== null);
      const swatch = h("i");
      swatch.style.background = s.color || PALETTE[i % PALETTE.length];
      return h("span", {}, swatch, s.name, lastPt ? ": " + yf(lastPt[1]) + (o.unit || "") : "");
    })));
    return box;
  }
  function barPlot(title, bars, o = {}) {
    const W = 480, H = o.height || 190, L = 44, R = 10, T = 8, B = 22;
    const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    const box = h("div", { class: "plot", "data-plot": o.id || title }, h("h3", {}, title), svg);
    const max = Math.max(0, ...bars.map((b) => b[1]));
    if (!bars.length || max <= 0) {
      svg.append(h("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, o.empty || "no answers yet"));
      return box;
    }
    const bw = (W - L - R) / bars.length;
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4, y = T + (1 - i / 4) * (H - T - B);
      svg.append(h("line", { class: "grid", x1: L, x2: W - R, y1: y, y2: y }));
      svg.append(h("text", { x: L - 4, y: y + 4, "text-anchor": "end" }, v.toFixed(v >= 10 ? 0 : 1)));
    }
    bars.forEach(([label, v], i) => {
      const hgt = (v / max) * (H - T - B);
      svg.append(h("rect", { x: L + i * bw + 2, y: H - B - hgt, width: Math.max(1, bw - 4), height: hgt, fill: o.color || "#1f6feb" },
        h("title", {}, `${label}: ${v}`)));
      svg.append(h("text", { x: L + i * bw + bw / 2, y: H - 6, "text-anchor": "middle" }, label));
    });
    svg.append(h("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    return box;
  }
  function progress(counts, total) {
    const bar = h("div", { class: "progress", role: "img" });
    const parts = [];
    for (const s of STATES) {
      const n = (counts && counts[s]) || 0;
      if (!n) continue;
      const seg = h("span", { title: `${s}: ${n}` });
      seg.style.width = (100 * n) / Math.max(1, total) + "%";
      seg.style.background = COLORS[s];
      bar.append(seg);
      parts.push(`${s} ${n}`);
    }
    bar.setAttribute("aria-label", parts.join(", ") || "no executions");
    return bar;
  }
  function stateLegend(counts) {
    return h("div", { class: "legend" }, STATES.filter((s) => counts && counts[s]).map((s) => {
      const i = h("i"); i.style.background = COLORS[s];
      return h("span", { "data-state": s }, i, `${s} ${counts[s]}`);
    }));
  }

  // -- the fleet -----------------------------------------------------------------------------
  function variantOf(t) {
    const v = t && t.data && t.data.variant;
    if (!v) return "";
    return v.precision && v.name && v.precision !== v.name ? `${v.name} (${v.precision})` : v.name || v.precision || "";
  }
  function healthOf(d, t) {
    // Warnings are about now (a silent device, lost telemetry, failing requests); the last
    // error a device reported is shown as information, since it may be long resolved.
    const issues = [];
    const data = (t && t.data) || {};
    const c = d.counters || {};
    // a controller that classifies devices itself (e.g. "failing", "reprovisioned") is believed
    if (typeof d.status === "string" && d.status && !["online", "offline"].includes(d.status)) issues.push(d.status);
    if (d.online && t && Date.now() / 1000 - t.ts > 120) issues.push(`no heartbeat for ${ago(t.ts).replace(" ago", "")}`);
    if (c.telemetry_gaps) issues.push(`${c.telemetry_gaps} telemetry records missing`);
    if (data.requests && data.errors) issues.push(`${data.errors} of ${data.requests} requests failed`);
    const info = data.last_error ? "last error: " + data.last_error : "";
    return { level: !d.online ? "offline" : issues.length ? "warn" : "ok", issues, info };
  }
  function countBy(rows, key) {
    const m = new Map();
    for (const r of rows) m.set(r[key] || "–", (m.get(r[key] || "–") || 0) + 1);
    return [...m.entries()].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
  }
  function chipCard(title, entries, id) {
    return h("div", { class: "card", "data-counts": id }, h("div", { class: "k" }, title),
      h("div", { class: "chips" }, entries.length ? entries.map(([k, n]) => h("span", { class: "chip", "data-key": k }, k, " ", h("b", {}, n))) : "–"));
  }

  function fleetView() {
    const st = { q: "", status: "", group: "", sort: "device_id", asc: true };
    const summary = h("div", { class: "cards" });
    const counts = h("div", { class: "grid3" });
    const groupSel = h("select", { "aria-label": "group", onchange: (e) => { st.group = e.target.value; draw(); } }, h("option", { value: "" }, "all groups"));
    const sortSel = h("select", { "aria-label": "sort", id: "fleet-sort", onchange: (e) => { const [k, dir] = e.target.value.split(":"); st.sort = k; st.asc = dir === "asc"; draw(); } },
      [["device_id:asc", "sort: device"], ["device_id:desc", "sort: device, descending"], ["version:asc", "sort: version"], ["status:desc", "sort: online first"],
        ["status:asc", "sort: offline first"], ["last_seen:asc", "sort: longest silent"], ["group:asc", "sort: group"]].map(([v, t]) => h("option", { value: v }, t)));
    const toolbar = h("div", { class: "toolbar" },
      h("input", { type: "search", placeholder: "filter: id, group, model, version", "aria-label": "filter", id: "fleet-filter",
        oninput: (e) => { st.q = e.target.value.toLowerCase(); draw(); } }),
      h("select", { "aria-label": "status", id: "fleet-status", onchange: (e) => { st.status = e.target.value; draw(); } },
        h("option", { value: "" }, "online and offline"), h("option", { value: "online" }, "online"), h("option", { value: "offline" }, "offline")),
      groupSel, sortSel);
    const cols = [
      ["device_id", "Device"], ["group", "Group"], ["model", "Model"], ["version", "Version"], ["variant", "Variant", "hide-sm"],
      ["status", "Status"], ["last_seen", "Last seen", "hide-sm"], ["health", "Health"], ["agent", "Agent", "hide-sm"],
    ];
    const thead = h("thead");
    const tbody = h("tbody");
    const table = h("div", { class: "table-wrap" }, h("table", { id: "devices" }, thead, tbody));
    const root = h("section", {}, h("h1", {}, "Fleet"), summary, counts, toolbar, table);
    let rows = [];
    function drawHead() {
      thead.replaceChildren(h("tr", {}, cols.map(([k, label, cls]) => h("th", {
        class: `sortable ${cls || ""} ${st.sort === k ? "sorted" + (st.asc ? " asc" : "") : ""}`, "data-col": k,
        onclick: () => { st.asc = st.sort === k ? !st.asc : true; st.sort = k; draw(); },
      }, label))));
    }
    function draw() {
      drawHead();
      const key = `${st.sort}:${st.asc ? "asc" : "desc"}`;
      sortSel.value = [...sortSel.options].some((o) => o.value === key) ? key : sortSel.value;
      const shown = rows.filter((r) => (!st.status || r.status === st.status) && (!st.group || r.group === st.group) &&
        (!st.q || [r.device_id, r.group, r.model, r.version, r.variant].join(" ").toLowerCase().includes(st.q)));
      shown.sort((a, b) => {
        const x = a[st.sort], y = b[st.sort];
        const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
        return st.asc ? c : -c;
      });
      tbody.replaceChildren(...shown.map((r) => h("tr", { "data-device": r.device_id, "data-status": r.status },
        h("td", {}, h("a", { href: "#/device/" + enc(r.device_id) }, r.device_id)),
        h("td", {}, r.group || "–"), h("td", {}, r.model || "–"),
        h("td", { class: "version" }, r.version || "–"), h("td", { class: "hide-sm" }, r.variant || "–"),
        h("td", {}, badge(r.status)), h("td", { class: "hide-sm", title: when(r.last_seen) }, ago(r.last_seen)),
        h("td", { class: "reason" }, badge(r.health, r.health), h("span", { class: "hide-sm" }, r.issues.length ? " " + r.issues.join("; ") : "")),
        h("td", { class: "hide-sm" }, r.agent || "–"))));
      if (!shown.length) tbody.append(h("tr", {}, h("td", { colspan: cols.length, class: "empty" }, rows.length ? "no device matches the filter" : "no device has connected yet")));
    }
    return {
      root,
      async refresh() {
        const [devices, latest] = await Promise.all([api("/api/devices"), api("/api/telemetry/latest")]);
        rows = devices.map((d) => {
          const t = latest[d.device_id];
          const hl = healthOf(d, t);
          return {
            device_id: d.device_id, group: d.group || "", model: d.model_name || (t && t.data && t.data.model) || "", version: d.model_version || "",
            variant: variantOf(t), status: d.online ? "online" : "offline", last_seen: d.last_seen || 0,
            health: hl.level, issues: hl.issues, agent: d.agent_version || "",
          };
        });
        const online = rows.filter((r) => r.status === "online").length;
        summary.replaceChildren(
          h("div", { class: "card" }, h("div", { class: "k" }, "devices"), h("div", { class: "v", id: "count-devices" }, rows.length)),
          h("div", { class: "card" }, h("div", { class: "k" }, "online"), h("div", { class: "v", id: "count-online" }, online)),
          h("div", { class: "card" }, h("div", { class: "k" }, "offline"), h("div", { class: "v", id: "count-offline" }, rows.length - online)),
          h("div", { class: "card" }, h("div", { class: "k" }, "need attention"), h("div", { class: "v" }, rows.filter((r) => r.health === "warn").length)));
        counts.replaceChildren(chipCard("per version", countBy(rows, "version"), "version"),
          chipCard("per status", countBy(rows, "status"), "status"), chipCard("per variant", countBy(rows, "variant"), "variant"));
        const groups = [...new Set(rows.map((r) => r.group).filter(Boolean))].sort();
        const keep = st.group;
        groupSel.replaceChildren(h("option", { value: "" }, "all groups"), ...groups.map((g) => h("option", { value: g }, g)));
        groupSel.value = groups.includes(keep) ? keep : "";
        st.group = groupSel.value;
        draw();
      },
    };
  }

  // -- one device ----------------------------------------------------------------------------
  function deriveSeries(recs) {
    const s = { rate: [], offload: [], degraded: [], p50: [], p95: [], hard: [] };
    for (let i = 0; i < recs.length; i++) {
      const r = recs[i], d = r.data || {};
      const lat = d.local_latency || d.latency || {};
      s.p50.push([r.ts, num(lat.p50_ms)]);
      s.p95.push([r.ts, num(lat.p95_ms) !== null ? lat.p95_ms : num(lat.p90_ms)]);
      if (num(d.hard_examples) !== null) s.hard.push([r.ts, d.hard_examples]);
      if (!i) continue;
      const p = recs[i - 1].data || {};
      const dt = r.ts - recs[i - 1].ts, dr = d.requests - p.requests;
      if (!(dt > 0) || !(dr >= 0)) continue; // an agent restart resets its counters
      s.rate.push([r.ts, dr / dt]);
      s.offload.push([r.ts, dr ? (d.cloud - p.cloud) / dr : null]);
      s.degraded.push([r.ts, dr ? (d.degraded - p.degraded) / dr : null]);
    }
    return s;
  }
  function histogramOf(recs) {
    if (!recs.length) return [];
    const last = (recs[recs.length - 1].data || {}).confidence_histogram || {};
    const first = recs.length > 1 ? (recs[0].data || {}).confidence_histogram || {} : {};
    const keys = Object.keys(last).sort((a, b) => parseFloat(a) - parseFloat(b));
    const diff = keys.map((k) => (last[k] || 0) - (first[k] || 0));
    const use = diff.some((v) => v < 0) ? keys.map((k) => last[k] || 0) : diff;
    return keys.map((k, i) => ["≤" + k, use[i]]);
  }
  function deviceView(id) {
    let recs = [], after = null;
    const head = h("div");
    const plots = h("div", { class: "grid2", id: "device-plots" });
    const shadow = h("div", { class: "grid3" });
    const jobsBody = h("tbody");
    const note = h("p", { class: "muted" });
    const root = h("section", {}, h("p", {}, h("a", { href: "#/fleet" }, "← fleet")), head,
      h("h2", {}, "Telemetry"), note, plots,
      h("h2", {}, "Shadow"), shadow,
      h("h2", {}, "Recent jobs"),
      h("div", { class: "table-wrap" }, h("table", { id: "device-jobs" }, h("thead", {}, h("tr", {},
        ["Job", "Operation", "Version", "State", "Reason", "Updated"].map((t) => h("th", {}, t)))), jobsBody)));
    return {
      root,
      async refresh() {
        const d = await api("/api/devices/" + enc(id));
        const seq = num(d.telemetry_seq) === null ? -1 : d.telemetry_seq;
        if (after === null || seq < after) { recs = []; after = Math.max(-1, seq - KEEP_RECORDS); }
        const [tel, jobs] = await Promise.all([api(`/api/devices/${enc(id)}/telemetry?after=${after}`), api(`/api/devices/${enc(id)}/jobs`)]);
        if (tel.length) { recs = recs.concat(tel).slice(-KEEP_RECORDS); after = tel[tel.length - 1].seq; }
        const last = recs.length ? recs[recs.length - 1] : null;
        const hl = healthOf(d, last);
        const labels = Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
        head.replaceChildren(
          h("h1", {}, h("span", { id: "device-id" }, d.device_id), badge(d.online ? "online" : "offline"), badge(hl.level, hl.level)),
          h("div", { class: "panel" }, h("dl", { class: "kv" },
            h("dt", {}, "group"), h("dd", {}, d.group || "–"),
            h("dt", {}, "model"), h("dd", { id: "device-model" }, `${d.model_name || (last && last.data && last.data.model) || "–"} ${d.model_version || ""}`),
            h("dt", {}, "variant"), h("dd", {}, variantOf(last) || "–"),
            h("dt", {}, "agent"), h("dd", {}, d.agent_version || "–"),
            h("dt", {}, "last seen"), h("dd", {}, `${ago(d.last_seen)} (${when(d.last_seen)})`),
            h("dt", {}, "labels"), h("dd", {}, labels || "–"),
            h("dt", {}, "health"), h("dd", { class: "reason" }, hl.issues.join("; ") || "ok", hl.info ? h("div", { class: "muted" }, hl.info) : ""),
            h("dt", {}, "hard examples"), h("dd", { id: "device-hard" }, last && num(last.data && last.data.hard_examples) !== null ? String(last.data.hard_examples) + " captured on the device" : "capture off"))));
        const s = deriveSeries(recs);
        const x0 = recs.length ? recs[0].ts : undefined, x1 = last ? last.ts : undefined;
        note.textContent = recs.length ? `${recs.length} heartbeats, ${clock(x0)}–${clock(x1)}; rates are between consecutive heartbeats.` : "no telemetry yet (the agent sends a heartbeat every telemetry.interval_s)";
        plots.replaceChildren(
          linePlot("Inference rate (requests/s)", [{ name: "requests/s", points: s.rate }], { id: "rate", x0, x1 }),
          linePlot("Local latency (ms)", [{ name: "p50", points: s.p50 }, { name: "p95", points: s.p95, color: "#cf222e" }], { id: "latency", x0, x1, unit: " ms" }),
          linePlot("Offload fraction", [{ name: "to the cloud", points: s.offload }], { id: "offload", x0, x1, ymin: 0, ymax: 1, yfmt: (v) => (100 * v).toFixed(0) + "%" }),
          linePlot("Degraded-answer rate", [{ name: "degraded", points: s.degraded, color: "#cf222e" }], { id: "degraded", x0, x1, ymin: 0, ymax: 1, yfmt: (v) => (100 * v).toFixed(0) + "%" }),
          barPlot("Confidence of local answers (top-1)", histogramOf(recs), { id: "confidence" }),
          linePlot("Hard examples captured", [{ name: "stored on the device", points: s.hard, color: "#8250df" }], { id: "hard", x0, x1, empty: "capture is off on this device" }));
        const sh = d.shadow || {};
        shadow.replaceChildren(
          h("div", { class: "panel" }, h("h3", {}, `Desired (version ${sh.version ?? "–"})`), json(sh.desired)),
          h("div", { class: "panel" }, h("h3", {}, `Reported (version ${sh.reported_version ?? "–"})`), json(sh.reported)),
          h("div", { class: "panel" }, h("h3", {}, "Delta (desired, not reported yet)"), json(sh.delta)));
        jobsBody.replaceChildren(...jobs.slice(0, 20).map((e) => h("tr", { "data-job": e.job_id },
          h("td", {}, h("a", { href: "#/job/" + enc(e.job_id) }, e.job_id)), h("td", {}, e.operation || "–"),
          h("td", {}, e.version || "–"), h("td", {}, badge(e.state)), h("td", { class: "reason" }, e.reason || ""),
          h("td", {}, ago(e.updated_at || e.queued_at)))));
        if (!jobs.length) jobsBody.append(h("tr", {}, h("td", { colspan: 6, class: "empty" }, "no job has targeted this device")));
      },
    };
  }

  // -- rollouts ------------------------------------------------------------------------------
  function jobOptions(f) {
    const body = {};
    const rate = parseFloat(f.rate.value);
    if (rate > 0) body.rollout = { max_per_minute: rate };
    const p = parseFloat(f.abort_pct.value);
    if (p > 0) body.abort = [{ failure_type: f.abort_type.value, threshold_percent: p, min_executed: parseInt(f.abort_min.value || "1", 10) }];
    const to = parseFloat(f.timeout.value);
    if (to > 0) body.timeout_s = to;
    return body;
  }
  const targetsOf = (s) => s.split(/[\s,]+/).map((t) => t.trim()).filter(Boolean);
  function optionFields() {
    return [
      h("label", {}, "rate (devices per minute, empty: all at once)", h("input", { name: "rate", type: "number", min: "0", step: "any", placeholder: "e.g. 10" })),
      h("label", {}, "abort when failures reach (%)", h("input", { name: "abort_pct", type: "number", min: "0", max: "100", step: "any", placeholder: "e.g. 20" })),
      h("label", {}, "failure type", h("select", { name: "abort_type" }, ["ALL", "FAILED", "REJECTED", "TIMED_OUT"].map((t) => h("option", { value: t }, t)))),
      h("label", {}, "after at least (executions)", h("input", { name: "abort_min", type: "number", min: "1", value: "1" })),
      h("label", {}, "in-progress timeout (s)", h("input", { name: "timeout", type: "number", min: "1", step: "any", placeholder: "600" })),
    ];
  }
  function rolloutsView() {
    const deployMsg = h("div"), rbMsg = h("div"), uploadMsg = h("div"), listMsg = h("div");
    const pkgSel = h("select", { name: "package", id: "deploy-package", "aria-label": "package" });
    const targetsList = h("datalist", { id: "targets-list" });
    const file = h("input", { type: "file", accept: ".tar.gz,.tgz,application/gzip", id: "upload-file", "aria-label": "package archive" });
    const deployForm = h("form", { class: "stack", id: "deploy-form", onsubmit: (e) => { e.preventDefault(); deploy(); } },
      h("label", {}, "package", pkgSel),
      h("label", {}, "targets (groups or devices)", h("input", { name: "targets", id: "deploy-targets", list: "targets-list", required: true, placeholder: "e.g. lab" })),
      ...optionFields(),
      h("div", {}, h("button", { class: "primary", type: "submit", id: "deploy-start" }, "Start rollout")));
    const rbForm = h("form", { class: "stack", id: "rollback-form", onsubmit: (e) => { e.preventDefault(); rollback(); } },
      h("label", {}, "targets (groups or devices)", h("input", { name: "targets", list: "targets-list", required: true })),
      h("label", {}, "version (empty: each device's previous one)", h("input", { name: "version" })),
      ...optionFields(),
      h("div", {}, h("button", { class: "danger", type: "submit", id: "rollback-start" }, "Roll back")));
    const jobsBody = h("tbody");
    const root = h("section", {}, h("h1", {}, "Rollouts"), targetsList,
      h("div", { class: "panel" }, h("h2", {}, "Start a rollout"), deployForm, deployMsg,
        h("h3", {}, "Upload a package"), h("div", { class: "toolbar" }, file,
          h("button", { type: "button", id: "upload-button", onclick: upload }, "Upload")), uploadMsg),
      h("h2", {}, "Jobs"), listMsg,
      h("div", { class: "table-wrap" }, h("table", { id: "jobs" }, h("thead", {}, h("tr", {},
        ["Job", "Operation", "Version", "Status", "Progress", "Reason", "Created", ""].map((t) => h("th", {}, t)))), jobsBody)),
      h("div", { class: "panel" }, h("h2", {}, "Roll back"), rbForm, rbMsg));
    async function deploy() {
      const [name, version] = (pkgSel.value || "").split("\u0000");
      if (!name) { deployMsg.replaceChildren(msg("choose a package (upload one first)")); return; }
      const targets = targetsOf(deployForm.targets.value);
      const body = { package_ref: { name, version }, targets, ...jobOptions(deployForm) };
      await act(deployMsg, `Deploy ${name} ${version} to ${targets.join(", ")}?`,
        () => api("/api/deploy", { method: "POST", body }), (job) => `started job ${job.job_id} for ${job.total} device(s)`);
    }
    async function rollback() {
      const targets = targetsOf(rbForm.targets.value);
      const body = { targets, ...jobOptions(rbForm) };
      if (rbForm.version.value.trim()) body.version = rbForm.version.value.trim();
      await act(rbMsg, `Roll back ${targets.join(", ")} to ${body.version || "the previous version"}?`,
        () => api("/api/rollback", { method: "POST", body }), (job) => `started rollback job ${job.job_id} for ${job.total} device(s)`);
    }
    async function upload() {
      const f = file.files && file.files[0];
      if (!f) { uploadMsg.replaceChildren(msg("choose a package archive (.tar.gz)")); return; }
      uploadMsg.replaceChildren(msg(`uploading ${f.name} …`, "ok"));
      try {
        const p = await api("/api/packages", { method: "POST", raw: f });
        uploadMsg.replaceChildren(msg(`stored ${p.name} ${p.version} (${p.size} bytes)`, "ok"));
        schedule(0);
      } catch (e) { uploadMsg.replaceChildren(msg(e.message)); }
    }
    return {
      root,
      async refresh() {
        const [jobs, pkgs, devices] = await Promise.all([api("/api/jobs"), api("/api/packages"), api("/api/devices")]);
        const keep = pkgSel.value;
        pkgSel.replaceChildren(...(pkgs.length ? pkgs.map((p) => h("option", { value: p.name + "\u0000" + p.version }, `${p.name} ${p.version}`))
          : [h("option", { value: "" }, "no package stored yet")]));
        if ([...pkgSel.options].some((o) => o.value === keep)) pkgSel.value = keep;
        const groups = [...new Set(devices.map((d) => d.group).filter(Boolean))].sort();
        targetsList.replaceChildren(...groups.map((g) => h("option", { value: g }, "group")), ...devices.map((d) => h("option", { value: d.device_id }, "device")));
        jobsBody.replaceChildren(...[...jobs].reverse().map((j) => h("tr", { "data-job": j.job_id, "data-status": j.status },
          h("td", {}, h("a", { href: "#/job/" + enc(j.job_id) }, j.job_id)), h("td", {}, j.operation),
          h("td", {}, (j.document && j.document.version) || "–"), h("td", {}, badge(j.status)),
          h("td", {}, h("div", { class: "grow" }, progress(j.counts, j.total), stateLegend(j.counts))), h("td", { class: "reason" }, j.reason || ""),
          h("td", {}, ago(j.created_at)),
          h("td", {}, j.status === "IN_PROGRESS" ? h("button", { type: "button", class: "danger", "data-cancel": j.job_id,
            onclick: () => act(listMsg, `Cancel job ${j.job_id}? Executions not started yet are canceled.`,
              () => api(`/api/jobs/${enc(j.job_id)}/cancel`, { method: "POST", body: { force: false } }), (v) => `job ${v.job_id}: ${v.status}`) }, "Cancel") : ""))));
        if (!jobs.length) jobsBody.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "no job yet")));
      },
    };
  }

  function abortStatus(c, counts) {
    const terminal = ["SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"];
    const finished = terminal.reduce((a, s) => a + (counts[s] || 0), 0);
    const types = c.failure_type === "ALL" ? ["FAILED", "REJECTED", "TIMED_OUT"] : [c.failure_type];
    const failed = types.reduce((a, s) => a + (counts[s] || 0), 0);
    const p = finished ? (100 * failed) / finished : 0;
    const tripped = finished >= c.min_executed && p >= c.threshold_percent;
    return { finished, failed, p, tripped };
  }
  function jobView(id) {
    const body = h("div"), box = h("div");
    const root = h("section", {}, h("p", {}, h("a", { href: "#/rollouts" }, "← rollouts")), box, body);
    return {
      root,
      async refresh() {
        const j = await api("/api/jobs/" + enc(id));
        const counts = j.counts || {};
        const doc = j.document || {};
        const ro = j.rollout || {};
        const rate = ro.max_per_minute ? `${ro.max_per_minute}/min` : ro.base_rate_per_minute ? `from ${ro.base_rate_per_minute}/min ×${ro.increment_factor} per ${ro.on_succeeded} succeeded` : "all at once";
        const running = j.status === "IN_PROGRESS";
        // only the devices this job changed have something to go back from
        const updated = (j.executions || []).filter((e) => e.state === "SUCCEEDED").map((e) => e.device_id);
        body.replaceChildren(
          h("h1", {}, h("span", { id: "job-id" }, j.job_id), h("span", { id: "job-status" }, badge(j.status))),
          j.reason ? h("div", { class: "msg " + (j.status === "CANCELED" ? "error" : "ok"), id: "job-reason" }, j.reason) : "",
          h("div", { class: "grid2" },
            h("div", { class: "panel" }, h("dl", { class: "kv" },
              h("dt", {}, "operation"), h("dd", {}, j.operation),
              h("dt", {}, "package"), h("dd", {}, doc.model ? `${doc.model} ${doc.version}` : doc.version || "–"),
              h("dt", {}, "targets"), h("dd", {}, `${(j.groups || []).join(", ") || "devices"} (${j.total} devices)`),
              h("dt", {}, "rollout rate"), h("dd", {}, rate),
              h("dt", {}, "in-progress timeout"), h("dd", {}, `${j.timeout_s} s`),
              h("dt", {}, "created"), h("dd", {}, when(j.created_at)),
              h("dt", {}, "completed"), h("dd", {}, when(j.completed_at)))),
            h("div", { class: "panel" }, h("h3", {}, "Progress"), progress(counts, j.total), stateLegend(counts),
              h("h3", {}, "Abort criteria"),
              (j.abort || []).length ? h("ul", { id: "abort-criteria" }, j.abort.map((c) => {
                const s = abortStatus(c, counts);
                return h("li", {}, `${c.failure_type} ≥ ${c.threshold_percent} % once ${c.min_executed} finished — now ${s.failed}/${s.finished} (${s.p.toFixed(0)} %) `,
                  s.tripped ? badge("tripped", "failing") : "");
              })) : h("p", { class: "muted" }, "none: the job runs to the end"),
              running ? h("div", { class: "toolbar" },
                h("button", { type: "button", class: "danger", id: "job-cancel", onclick: () => act(box, `Cancel job ${j.job_id}?`, () => api(`/api/jobs/${enc(j.job_id)}/cancel`, { method: "POST", body: { force: false } }), (v) => `job ${v.job_id}: ${v.status}`) }, "Cancel"),
                h("button", { type: "button", class: "danger", onclick: () => act(box, `Force-cancel job ${j.job_id}? Running executions are marked CANCELED too.`, () => api(`/api/jobs/${enc(j.job_id)}/cancel`, { method: "POST", body: { force: true } }), (v) => `job ${v.job_id}: ${v.status}`) }, "Force cancel")) : "",
              j.operation === "deploy" && updated.length ? h("div", { class: "toolbar" },
                h("button", { type: "button", id: "job-rollback", onclick: () => act(box, `Roll back the ${updated.length} device(s) this job updated (${updated.join(", ")}) to their previous version?`, () => api("/api/rollback", { method: "POST", body: { targets: updated } }), (v) => `started rollback job ${v.job_id} for ${v.total} device(s)`) }, `Roll back the ${updated.length} updated device(s)`)) : "")),
          h("h2", {}, "Executions"),
          h("div", { class: "table-wrap" }, h("table", { id: "executions" },
            h("thead", {}, h("tr", {}, ["Device", "State", "Reason", "Sent", "Started", "Updated"].map((t) => h("th", {}, t)))),
            h("tbody", {}, (j.executions || []).map((e) => h("tr", { "data-device": e.device_id, "data-state": e.state },
              h("td", {}, h("a", { href: "#/device/" + enc(e.device_id) }, e.device_id)), h("td", {}, badge(e.state)),
              h("td", { class: "reason" }, e.reason || ""), h("td", {}, clock(e.sent_at)), h("td", {}, clock(e.started_at)), h("td", {}, clock(e.updated_at))))))));
      },
    };
  }

  // -- routing -------------------------------------------------------------------------------
  function routingView() {
    let windowS = 300;
    const body = h("div", { id: "routing" });
    const sel = h("select", { "aria-label": "window", onchange: (e) => { windowS = +e.target.value; schedule(0); } },
      [[60, "last minute"], [300, "last 5 min"], [900, "last 15 min"], [3600, "last hour"], [21600, "last 6 h"]].map(([v, t]) => h("option", { value: v }, t)));
    sel.value = "300";
    const root = h("section", {}, h("h1", {}, "Routing"), h("div", { class: "toolbar" }, sel,
      h("span", { class: "muted" }, "from the agents' heartbeats: what they answered locally, what they sent to each region and how it went")), body);
    return {
      root,
      pollMs: 5000, // the figures move with the agents' heartbeats, 30 s apart by default
      async refresh() {
        const r = await api("/api/routing?window=" + windowS);
        const x0 = r.now - r.window_s, x1 = r.now;
        body.replaceChildren(...r.groups.map((g) => {
          const regions = g.regions || [];
          return h("div", { class: "panel", "data-group": g.group },
            h("h2", {}, `Group ${g.group || "(none)"}`, " ", h("span", { class: "muted" }, `${g.online}/${g.devices.length} devices online`)),
            h("div", { class: "cards" },
              h("div", { class: "card" }, h("div", { class: "k" }, "requests"), h("div", { class: "v" }, fmt(g.requests, 0))),
              h("div", { class: "card" }, h("div", { class: "k" }, "offloaded"), h("div", { class: "v", "data-figure": "offload" }, pct(g.offload))),
              h("div", { class: "card" }, h("div", { class: "k" }, "degraded"), h("div", { class: "v" }, pct(g.degraded_rate)))),
            h("div", { class: "grid3" }, regions.map((reg) => h("div", { class: "card region " + (reg.failing ? "failing" : reg.state === "closed" || !reg.state ? "" : "degraded"), "data-region": reg.name, "data-failing": reg.failing ? "true" : "false" },
              h("div", { class: "k" }, "region"), h("div", { class: "v" }, reg.name, " ", reg.failing ? badge("failing") : ""),
              h("div", {}, "circuit ", badge((reg.state || "unknown").replace("_", "-"), reg.state || ""), reg.states && reg.states.length > 1 ? ` (devices differ: ${reg.states.join(", ")})` : ""),
              h("div", {}, `${fmt(reg.requests, 0)} attempts, ${fmt(reg.failures, 0)} failed in the window`),
              reg.failing ? h("div", { class: "reason" }, reg.recent_requests ? `every one of the last ${fmt(reg.recent_requests, 0)} attempts failed` : "circuit open on every device") : "",
              reg.last_error ? h("div", { class: "reason muted" }, "last error: " + reg.last_error) : ""))),
            h("div", { class: "grid2" },
              linePlot("Offload fraction and degraded rate", [{ name: "offloaded", points: g.series.map((p) => [p.t, p.offload]) },
                { name: "degraded", points: g.series.map((p) => [p.t, p.degraded_rate]), color: "#cf222e" }],
              { id: "offload-" + g.group, x0, x1, ymin: 0, ymax: 1, yfmt: (v) => (100 * v).toFixed(0) + "%" }),
              linePlot("Cloud latency per region, p50 (ms)", regions.map((reg, i) => ({ name: reg.name, points: reg.series.map((p) => [p.t, p.p50_ms]), color: reg.failing ? "#cf222e" : PALETTE[i % PALETTE.length] })),
                { id: "cloud-latency-" + g.group, x0, x1, unit: " ms", empty: "no region answered in this window" }),
              linePlot("Failed attempts per region", regions.map((reg, i) => ({ name: reg.name, points: reg.series.map((p) => [p.t, p.failures]), color: reg.failing ? "#cf222e" : PALETTE[i % PALETTE.length] })),
                { id: "failures-" + g.group, x0, x1, empty: "no attempt in this window" })));
        }));
        if (!r.groups.length) body.append(h("div", { class: "empty" }, "no device has sent telemetry yet"));
      },
    };
  }

  // -- login, router and the poller ----------------------------------------------------------
  function loginView(reason) {
    const input = h("input", { type: "password", id: "token", autocomplete: "off", "aria-label": "token" });
    return {
      root: h("section", {}, h("h1", {}, "Sign in"), h("div", { class: "panel" },
        h("p", {}, "This controller asks for its API token (", h("code", {}, "--token"), " or EDGECLOUD_FLEET_TOKEN)."),
        reason ? msg(reason) : "",
        h("form", { class: "toolbar", onsubmit: (e) => { e.preventDefault(); sessionStorage.setItem(TOKEN_KEY, input.value); route(); } },
          input, h("button", { class: "primary", type: "submit" }, "Use token")))),
      async refresh() {},
    };
  }
  const VIEWS = { fleet: fleetView, device: deviceView, rollouts: rolloutsView, job: jobView, routing: routingView };
  let view = null, timer = null, backoff = POLL_MS, generation = 0, running = false, pending = false;
  function setConn(ok, text) {
    conn.className = "conn " + (ok ? "ok" : "bad");
    conn.textContent = text;
  }
  function schedule(ms) {
    clearTimeout(timer);
    const gen = generation;
    timer = setTimeout(() => cycle(gen), ms);
  }
  async function cycle(gen) {
    if (gen !== generation) return;
    if (running) { pending = true; return; } // one refresh in flight at a time
    if (document.hidden) { schedule(POLL_MS); return; }
    running = true;
    try {
      const [health] = await Promise.all([api("/api/health"), view.refresh()]);
      if (gen !== generation) return;
      setConn(health.connected, health.connected ? `live · ${clock(Date.now() / 1000)}` : "controller has no broker");
      labelCells();
      document.body.dataset.refreshes = String(+(document.body.dataset.refreshes || 0) + 1);
      const stale = view.root.querySelector(":scope > .msg.poll");
      if (stale) stale.remove();
      backoff = POLL_MS;
    } catch (e) {
      if (gen !== generation) return;
      if (e.status === 401) { setConn(false, "token needed"); show(loginView(token() ? "the token was refused" : "")); return; }
      setConn(false, e.status === 0 ? "controller unreachable" : "error");
      const old = view.root.querySelector(":scope > .msg.poll");
      const m = msg(e.message); m.classList.add("poll");
      if (old) old.replaceWith(m); else view.root.prepend(m);
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    } finally { running = false; }
    if (gen !== generation) return;
    schedule(pending ? 0 : Math.max(backoff, view.pollMs || POLL_MS));
    pending = false;
  }
  function labelCells() {
    // On a phone, tables become one card per row (console.css); each cell names its column.
    for (const table of main.querySelectorAll("table")) {
      const names = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
      for (const tr of table.querySelectorAll("tbody tr")) {
        [...tr.children].forEach((td, i) => { if (names[i]) td.setAttribute("data-label", names[i]); });
      }
    }
  }
  function show(v) {
    generation++;
    clearTimeout(timer);
    running = false;
    view = v;
    main.replaceChildren(v.root);
  }
  function route() {
    takeToken();
    const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
    const arg = decodeURIComponent(rest.join("/"));
    const key = VIEWS[name] ? name : "fleet";
    for (const a of document.querySelectorAll("nav a")) {
      const nav = a.getAttribute("data-nav");
      a.classList.toggle("active", nav === key || (nav === "rollouts" && key === "job") || (nav === "fleet" && key === "device"));
    }
    document.title = `${key === "device" || key === "job" ? arg : key[0].toUpperCase() + key.slice(1)} · edgecloud fleet`;
    show(VIEWS[key](arg));
    backoff = POLL_MS;
    schedule(0);
  }
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(0); });
  route();
})();
