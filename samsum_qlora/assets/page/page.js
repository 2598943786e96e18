"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const MODELS = DATA.models, METRICS = DATA.metrics, ROWS = DATA.rows;
  const $ = (id) => document.getElementById(id);
  const rowsBox = document.querySelector("#examples .rows");
  const sortSel = $("sort"), metricSel = $("metric"), endedSel = $("ended"), filterBox = $("filter");
  const dirButton = $("direction"), countEl = $("count");
  let descending = true;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function cell(cls) {
    const node = el("div", "cell " + cls);
    node.setAttribute("role", "cell");
    return node;
  }
  function option(select, value, text) {
    const o = el("option", null, text);
    o.value = value;
    select.appendChild(o);
  }
  function pct(x) { return (100 * x).toFixed(2); }
  function short(metric) { return metric.replace("ROUGE-", "R"); }
  // white at 0 to a soft green at 1: higher is greener, nothing shouts
  function tint(x) { return "rgba(46, 160, 67, " + (0.06 + 0.42 * Math.max(0, Math.min(1, x))).toFixed(3) + ")"; }

  // a block of text from the data, folded when long; textContent only
  function foldable(text) {
    const box = el("div");
    const body = el("div", "text", text);
    box.appendChild(body);
    if (text.split("\n").length > 7 || text.length > 520) {
      body.classList.add("clamp");
      const toggle = el("button", "link fold", "show all");
      toggle.type = "button";
      toggle.addEventListener("click", () => {
        const folded = body.classList.toggle("clamp");
        toggle.textContent = folded ? "show all" : "show less";
      });
      box.appendChild(toggle);
    }
    return box;
  }

  function summaryCell(out) {
    const td = cell("summary");
    if (!out) { td.appendChild(el("div", "absent", "(not scored)")); return td; }
    td.appendChild(out.prediction ? foldable(out.prediction) : el("div", "absent", "(empty)"));
    const chips = el("div", "chips");
    out.scores.forEach((s, m) => {
      const chip = el("span", "chip score", short(METRICS[m]) + " " + pct(s));
      chip.style.background = tint(s);
      chip.title = METRICS[m] + " F-measure x100";
      chips.appendChild(chip);
    });
    if (out.ended === false) chips.appendChild(el("span", "chip runon", "did not end"));
    else if (out.ended === true) chips.appendChild(el("span", "chip ended", "ended"));
    td.appendChild(chips);
    return td;
  }

  function buildRow(row) {
    const tr = el("div", "row");
    tr.setAttribute("role", "row");
    tr.dataset.id = row.id;
    tr.dataset.key = row.key;
    const head = cell("rowid");
    const link = el("a", null, row.id);
    link.href = "#id=" + encodeURIComponent(row.id);
    head.appendChild(link);
    if (row.index !== null) head.appendChild(el("span", "pos", "row " + row.index));
    row.sortEl = el("span", "sortval");
    head.appendChild(row.sortEl);
    tr.appendChild(head);
    const dialogue = cell("dialogue");
    dialogue.appendChild(
      row.dialogue === null ? el("div", "absent", "(dialogue not recorded)") : foldable(row.dialogue));
    tr.appendChild(dialogue);
    const reference = cell("reference");
    reference.appendChild(foldable(row.reference));
    tr.appendChild(reference);
    row.out.forEach((out) => tr.appendChild(summaryCell(out)));
    row.tr = tr;
    row.haystack = [row.id, row.dialogue || "", row.reference]
      .concat(row.out.map((o) => (o ? o.prediction : ""))).join("\n").toLowerCase();
  }

  function buildControls() {
    const headRow = document.querySelector("#examples .head");
    document.getElementById("examples").style.setProperty("--models", String(MODELS.length));
    ["Row", "Dialogue", "Reference"].concat(MODELS.map((m) => m.short)).forEach((text, k) => {
      const th = el("div", null, text);
      th.setAttribute("role", "columnheader");
      if (k >= 3) th.title = MODELS[k - 3].label;
      headRow.appendChild(th);
    });
    option(sortSel, "order", "row order");
    MODELS.forEach((m, i) => option(sortSel, "model:" + i, m.short));
    option(sortSel, "best", "best of all models");
    MODELS.forEach((a, i) => MODELS.forEach((b, j) => {
      if (i !== j) option(sortSel, "diff:" + i + ":" + j, a.short + " − " + b.short);
    }));
    METRICS.forEach((name, m) => option(metricSel, String(m), name));
    metricSel.value = String(METRICS.length - 1);  // ROUGE-L
    option(endedSel, "", "all rows");
    option(endedSel, "any", "a summary did not end");
    MODELS.forEach((m, i) => option(endedSel, "model:" + i, m.short + " did not end"));
  }

  // the value a row is sorted by, or null where it has none (those go last)
  function sortValue(row, how, m) {
    if (how === "order") return null;
    const parts = how.split(":");
    if (parts[0] === "model") { const o = row.out[+parts[1]]; return o ? o.scores[m] : null; }
    if (parts[0] === "best") {
      const scored = row.out.filter((o) => o);
      return scored.length ? Math.max(...scored.map((o) => o.scores[m])) : null;
    }
    const a = row.out[+parts[1]], b = row.out[+parts[2]];
    return a && b ? a.scores[m] - b.scores[m] : null;
  }

  function keep(row, needle, ended) {
    if (needle && !row.haystack.includes(needle)) return false;
    if (ended === "any") return row.out.some((o) => o && o.ended === false);
    if (ended) { const o = row.out[+ended.split(":")[1]]; return Boolean(o) && o.ended === false; }
    return true;
  }

  function apply() {
    const how = sortSel.value, m = +metricSel.value, needle = filterBox.value.trim().toLowerCase();
    const ended = endedSel.value, sign = descending ? -1 : 1;
    metricSel.disabled = dirButton.disabled = how === "order";
    const shown = ROWS.filter((row) => keep(row, needle, ended));
    shown.forEach((row) => { row.value = sortValue(row, how, m); });
    if (how !== "order") {
      shown.sort((x, y) => {
        if (x.value === null || y.value === null) return (x.value === null) - (y.value === null);
        return sign * (x.value - y.value);
      });
    }
    // beside each row's id, the value it is sorted by: "RL 23.53", "best RL 40.00", "Δ RL +19.27"
    const prefix = ({ best: "best ", diff: "Δ " }[how.split(":")[0]] || "") + short(METRICS[m]) + " ";
    shown.forEach((row) => {
      const sign = how.startsWith("diff") && row.value >= 0 ? "+" : "";
      row.sortEl.textContent = row.value === null ? "" : prefix + sign + pct(row.value);
    });
    rowsBox.replaceChildren(...shown.map((row) => row.tr));
    countEl.textContent = shown.length + " of " + ROWS.length + " dialogues";
  }

  // report.html#id=ROW_ID: show that row, scroll to it, highlight it
  function followHash() {
    const match = /^#id=(.*)$/.exec(location.hash);
    if (!match) return;
    let id = match[1];
    try { id = decodeURIComponent(id); } catch (e) { /* a hand-typed "%": take it as written */ }
    const row = ROWS.find((r) => r.id === id);
    if (!row) return;
    if (!row.tr.isConnected) { filterBox.value = ""; endedSel.value = ""; apply(); }
    document.querySelectorAll("#examples .row.target").forEach((tr) => tr.classList.remove("target"));
    row.tr.classList.add("target");
    row.tr.scrollIntoView({ block: "center" });
  }

  buildControls();
  ROWS.forEach(buildRow);
  sortSel.addEventListener("change", apply);
  metricSel.addEventListener("change", apply);
  endedSel.addEventListener("change", apply);
  filterBox.addEventListener("input", apply);
  function setDirection(highFirst) {
    descending = highFirst;
    dirButton.textContent = descending ? "↓ high first" : "↑ low first";
    apply();
  }
  dirButton.addEventListener("click", () => setDirection(!descending));
  // the paired comparison's "browse A − B": the rows where A gains most come first
  document.querySelectorAll("button[data-a]").forEach((button) => button.addEventListener("click", () => {
    sortSel.value = "diff:" + button.dataset.a + ":" + button.dataset.b;
    setDirection(true);
    $("examples-section").scrollIntoView();
  }));
  window.addEventListener("hashchange", followHash);
  apply();
  followHash();
})();
