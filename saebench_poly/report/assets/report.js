// The report page: builds every section from the JSON blocks of the page. Strings from the data only ever reach
// the page as text nodes or attribute values (never as markup).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const vocabulary = JSON.parse(document.getElementById("vocabulary").textContent);
  const entries = data.entries;
  const byKey = Object.fromEntries(entries.map((e) => [e.key, e]));
  const unitCache = {};
  const plotConfig = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["sendDataToCloud"] };

  function el(tag, attributes, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children || []) node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    return node;
  }

  function format(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
    return Number(value.toPrecision(4)).toString();
  }

  function unitData(key) {
    if (!(key in unitCache)) {
      const block = document.getElementById(data.unit_blocks[key]);
      unitCache[key] = block ? JSON.parse(block.textContent) : null;
    }
    return unitCache[key];
  }

  // --- header -------------------------------------------------------------------------------------------------
  document.getElementById("subtitle").textContent =
    `${data.source}: ${entries.length} entries · generated ${data.generated} by saebench-poly ${data.version}`;

  // --- leaderboard table --------------------------------------------------------------------------------------
  function buildTable() {
    const table = document.getElementById("leaderboard-table");
    const columns = [
      { label: "entry", text: true, value: (e) => e.label, cell: entryCell },
      { label: "kind", text: true, value: (e) => e.kind },
      { label: "hook", text: true, value: (e) => e.hook },
      { label: "width", value: (e) => e.width },
      ...data.metrics.map((m) => ({ label: m.name, title: `${m.name} (v${m.version}, ${m.direction} is better)`, value: (e) => e.values[m.name] })),
      { label: "RD", text: true, value: (e) => flag(e.pareto.pareto_rate_distortion) },
      { label: "RDP", text: true, value: (e) => flag(e.pareto.pareto_rate_distortion_polysemanticity) },
    ];
    const head = el("tr");
    columns.forEach((column, index) => {
      const th = el("th", { text: column.label, className: column.text ? "text" : "", title: column.title || column.label });
      th.addEventListener("click", () => sortBy(index));
      head.appendChild(th);
    });
    const body = el("tbody");
    table.replaceChildren(el("thead", {}, [head]), body);
    let state = { index: -1, ascending: true };
    function render(rows) {
      body.replaceChildren(...rows.map((e) => {
        const tr = el("tr", { className: e.reference ? "reference" : "", "data-entry": e.key });
        for (const column of columns) {
          const td = el("td", { className: column.text ? "text" : "" });
          if (column.cell) column.cell(td, e); else td.textContent = format(column.value(e));
          tr.appendChild(td);
        }
        return tr;
      }));
    }
    function sortBy(index) {
      state = { index, ascending: state.index === index ? !state.ascending : true };
      const column = columns[index];
      const rows = entries.slice().sort((a, b) => {
        const x = column.value(a), y = column.value(b);
        const missingX = x === null || x === undefined || x === "", missingY = y === null || y === undefined || y === "";
        if (missingX || missingY) return missingX - missingY; // missing values last, either way
        const order = column.text ? String(x).localeCompare(String(y)) : x - y;
        return state.ascending ? order : -order;
      });
      head.querySelectorAll("th").forEach((th, i) => {
        th.classList.toggle("sorted-asc", i === index && state.ascending);
        th.classList.toggle("sorted-desc", i === index && !state.ascending);
      });
      render(rows);
    }
    render(entries);
  }
  function flag(value) { return value === null || value === undefined ? "" : value ? "★" : "·"; }
  function entryCell(td, e) {
    td.appendChild(document.createTextNode(e.label));
    if (e.kind === "neurons") td.appendChild(el("span", { className: "badge neurons", text: "neurons" }));
    else if (e.reference) td.appendChild(el("span", { className: "badge baseline", text: "baseline" }));
    td.title = e.source_uri;
  }

  // --- figures ------------------------------------------------------------------------------------------------
  function buildFigures() {
    const holder = document.getElementById("frontier-plots");
    if (!data.frontiers.length) holder.appendChild(el("p", { className: "note", text: "No entry has both a rate and an FVU." }));
    data.frontiers.forEach((item, i) => {
      const div = el("div", { id: `frontier-${item.id}-${i}`, className: "plot frontier-plot" });
      holder.appendChild(div);
      Plotly.newPlot(div, item.figure.data, item.figure.layout, plotConfig);
    });
    const select = document.getElementById("distribution-entry");
    const keys = Object.keys(data.distributions);
    keys.sort((a, b) => (byKey[a].kind === "neurons") - (byKey[b].kind === "neurons"));
    for (const key of keys) select.appendChild(el("option", { value: key, text: byKey[key].label }));
    const plot = document.getElementById("distribution-plot");
    function draw() {
      const figure = data.distributions[select.value];
      if (figure) Plotly.react(plot, figure.data, figure.layout, plotConfig);
    }
    select.addEventListener("change", draw);
    if (keys.length) draw(); else plot.appendChild(el("p", { className: "note", text: "No per-unit behaviours in this leaderboard." }));
    if (data.shares) Plotly.newPlot(document.getElementById("shares-plot"), data.shares.data, data.shares.layout, plotConfig);
  }

  // --- unit explorer ------------------------------------------------------------------------------------------
  const explorer = {
    entry: document.getElementById("explorer-entry"), unit: document.getElementById("explorer-unit"),
    note: document.getElementById("explorer-note"), metrics: document.getElementById("unit-metrics"),
    behaviours: document.getElementById("unit-behaviours"), mostIndex: 0,
  };

  function buildExplorer() {
    const keys = entries.filter((e) => e.has_units).map((e) => e.key);
    for (const key of keys) explorer.entry.appendChild(el("option", { value: key, text: byKey[key].label }));
    if (!keys.length) { explorer.note.textContent = "This leaderboard has no per-unit table."; return; }
    explorer.entry.addEventListener("change", () => { explorer.mostIndex = 0; showMost(); });
    document.getElementById("explorer-show").addEventListener("click", () => showUnit(Number(explorer.unit.value)));
    explorer.unit.addEventListener("keydown", (event) => { if (event.key === "Enter") showUnit(Number(explorer.unit.value)); });
    document.getElementById("explorer-previous").addEventListener("click", () => step(-1));
    document.getElementById("explorer-next").addEventListener("click", () => step(1));
    document.getElementById("explorer-most").addEventListener("click", () => showMost());
    document.getElementById("explorer-random").addEventListener("click", () => {
      const units = unitData(explorer.entry.value).units;
      showUnit(units[Math.floor(Math.random() * units.length)]);
    });
    const first = keys.find((k) => byKey[k].kind !== "neurons") || keys[0];
    explorer.entry.value = first;
    showMost();
  }

  function showMost() {
    const units = unitData(explorer.entry.value);
    const most = units.most_polysemantic;
    if (!most.length) { showUnit(units.units[0]); return; }
    showUnit(most[explorer.mostIndex % most.length]);
    explorer.mostIndex += 1;
  }

  function step(direction) {
    const units = unitData(explorer.entry.value).units;
    const current = Number(explorer.unit.value);
    let index = units.findIndex((u) => u >= current);
    if (index < 0) index = units.length;
    index = units[index] === current ? index + direction : direction > 0 ? index : index - 1;
    showUnit(units[Math.min(Math.max(index, 0), units.length - 1)]);
  }

  function showUnit(unit) {
    const key = explorer.entry.value;
    const units = unitData(key);
    explorer.unit.value = unit;
    const row = units.units.indexOf(unit);
    const shown = units.units.length < units.width ? `${units.units.length} of its ${units.width} units are in this report (the most polysemantic fifth and a seeded random sample; \`saebench-poly report --max-units\` sets how many)` : `all ${units.width} units are in this report`;
    explorer.note.textContent = `${byKey[key].label}: ${shown}.`;
    explorer.metrics.replaceChildren();
    explorer.behaviours.replaceChildren();
    if (!Number.isInteger(unit) || unit < 0 || unit >= units.width) {
      explorer.metrics.appendChild(el("p", { text: `There is no unit ${explorer.unit.value}: units are 0 to ${units.width - 1}.` }));
      return;
    }
    if (row < 0) {
      explorer.metrics.appendChild(el("p", { text: `Unit ${unit} is not among the units in this report.` }));
      return;
    }
    const table = el("table", { id: "unit-metrics-table" });
    table.appendChild(el("tr", {}, [el("th", { className: "text", text: "unit" }), el("td", { text: String(unit) })]));
    for (const [name, values] of Object.entries(units.columns)) {
      table.appendChild(el("tr", {}, [el("th", { className: "text", text: name }), el("td", { text: format(values[row]) })]));
    }
    explorer.metrics.appendChild(el("h3", { text: `${byKey[key].label}, unit ${unit}` }));
    explorer.metrics.appendChild(table);
    showBehaviours(units, unit);
  }

  function showBehaviours(units, unit) {
    const holder = explorer.behaviours;
    const behaviours = units.examples[unit];
    if (!behaviours) {
      const central = units.central[unit];
      if (!data.has_examples && central) {
        holder.appendChild(el("p", { className: "note", text: "This leaderboard has no stored examples (a run of this saebench-poly writes them): the central example of each behaviour, as (context, position) in the scored data:" }));
        holder.appendChild(el("ol", {}, central.map(([c, p]) => el("li", { text: `context ${c}, position ${p}` }))));
      } else {
        holder.appendChild(el("p", { className: "note", text: "This unit has no characteristic examples (it never reached its examples' threshold, or its units have no neuron embedding)." }));
      }
      return;
    }
    let peak = 0;
    for (const b of behaviours) for (const x of b.examples) for (const a of x.a) if (a !== null) peak = Math.max(peak, Math.abs(a));
    const tabs = el("div", { className: "tabs", role: "tablist" });
    const panels = el("div");
    behaviours.forEach((b, i) => {
      const button = el("button", { type: "button", role: "tab", text: `behaviour ${b.behaviour + 1} (${b.size} example${b.size === 1 ? "" : "s"})` });
      const panel = el("div", { className: "behaviour", role: "tabpanel" });
      panel.hidden = i !== 0;
      if (i === 0) button.classList.add("active");
      button.addEventListener("click", () => {
        panels.childNodes.forEach((p, j) => { p.hidden = j !== i; });
        tabs.childNodes.forEach((t, j) => t.classList.toggle("active", j === i));
      });
      for (const x of b.examples) panel.appendChild(exampleView(x, peak, units.text_kind));
      tabs.appendChild(button);
      panels.appendChild(panel);
    });
    holder.appendChild(tabs);
    holder.appendChild(panels);
    const sizes = units.columns.behaviour_sizes ? units.columns.behaviour_sizes[units.units.indexOf(unit)] : null;
    const total = sizes ? sizes.split(",").length : behaviours.length;
    if (total > behaviours.length) holder.appendChild(el("p", { className: "note", text: `The page shows the ${behaviours.length} largest of its ${total} behaviours; the examples table holds them all.` }));
    const kinds = { ids: "Token ids: this model has no tokenizer.", features: "A toy model's sample: its nonzero features, not text." };
    if (kinds[units.text_kind]) holder.appendChild(el("p", { className: "note", text: kinds[units.text_kind] }));
  }

  function exampleView(x, peak, kind) {
    const div = el("div", { className: x.m ? "example central" : "example" });
    div.appendChild(el("span", { className: "meta", text: `${x.m ? "central example · " : ""}context ${x.c}, peak at position ${x.p}` }));
    x.t.forEach((t, i) => {
      const a = x.a[i];
      const share = peak > 0 && a !== null ? Math.min(Math.abs(a) / peak, 1) : 0;
      const colour = a !== null && a < 0 ? `rgba(31, 119, 180, ${share.toFixed(3)})` : `rgba(255, 127, 14, ${share.toFixed(3)})`;
      const span = el("span", { className: i === x.k ? "token peak" : "token", title: `position ${x.s + i}: ${format(a)}` });
      span.textContent = kind === "ids" && i > 0 ? ` ${vocabulary[t]}` : vocabulary[t];
      span.style.backgroundColor = colour;
      div.appendChild(span);
    });
    return div;
  }

  // --- provenance ---------------------------------------------------------------------------------------------
  function buildProvenance() {
    const holder = document.getElementById("provenance-specs");
    for (const spec of data.specs) {
      holder.appendChild(el("h3", { text: `${spec.spec_name} (spec hash ${spec.spec_hash})` }));
      const table = el("table", { className: "provenance-table" });
      const fields = ["spec_hash", "model_id", "model_revision", "model_family", "dataset_id", "dataset_revision", "tokenizer",
        "tokens_scored", "context_size", "prepend_bos", "seed", "device", "dtype", "git_commit", "created_at", "entries"];
      for (const field of fields) table.appendChild(el("tr", {}, [el("th", { className: "text", text: field }), el("td", { className: "text", text: format(spec[field]) })]));
      table.appendChild(el("tr", {}, [el("th", { className: "text", text: "runs" }), el("td", { className: "text", text: spec.runs.join(", ") })]));
      for (const [name, value] of Object.entries(spec.package_versions)) {
        table.appendChild(el("tr", {}, [el("th", { className: "text", text: name }), el("td", { className: "text", text: value })]));
      }
      holder.appendChild(table);
      if (spec.settings) {
        const details = el("details", {}, [el("summary", { text: "settings the spec hash covers" }), el("pre", { text: JSON.stringify(spec.settings, null, 1) })]);
        holder.appendChild(details);
      }
    }
  }

  buildTable();
  buildFigures();
  buildExplorer();
  buildProvenance();
  document.body.setAttribute("data-rendered", "true");
})();
