"""The HTML, CSS and JavaScript of the dictionary page (`dictionary_html`): %TITLE% and %SUMMARY% are replaced by
HTML-escaped text, %DATA% by the JSON blob with every '<' escaped. The script reads the blob with JSON.parse and
puts every text from it on the page with textContent (never innerHTML), so a token text is always shown as text.
Vanilla JavaScript, no external resource: the page works offline from file://."""

TEMPLATE = r"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%TITLE%</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222}
header{padding:10px 16px;border-bottom:1px solid #ddd}
h1{font-size:18px;margin:0 0 4px} #summary{font-size:13px;color:#555;margin:0}
main{display:flex;height:calc(100vh - 62px)}
#left{width:440px;min-width:300px;border-right:1px solid #ddd;display:flex;flex-direction:column}
#q{margin:8px;padding:5px;font-size:14px} #count{font-size:12px;color:#666;margin:0 8px 4px}
#listbox{overflow:auto;flex:1} table{border-collapse:collapse;width:100%;font-size:13px}
th{position:sticky;top:0;background:#f4f4f4;text-align:left;padding:3px 6px;cursor:pointer;user-select:none}
td{padding:2px 6px;border-bottom:1px solid #f0f0f0;vertical-align:top} tr.row{cursor:pointer}
tr.row:hover{background:#f5f8ff} tr.sel{background:#e3ecff}
.chip{font-family:monospace;white-space:pre;background:#eef;border-radius:3px;padding:0 3px;margin-right:3px}
.n{color:#888;font-size:11px} #more{margin:6px 8px}
#card{flex:1;overflow:auto;padding:12px 18px} h2{font-size:16px;margin:4px 0} h3{font-size:14px;margin:14px 0 4px}
.stats{font-size:13px;color:#444}
.hist{display:flex;align-items:flex-end;height:110px;border-bottom:1px solid #999;max-width:640px;gap:1px}
.bar{flex:1;background:#4a78c2;min-width:2px} .axis{display:flex;justify-content:space-between;max-width:640px;
font-size:11px;color:#666}
.lens{display:flex;gap:40px;font-size:13px} .lens ol{margin:2px 0;padding-left:22px}
.ex{display:flex;gap:8px;margin:3px 0;font-size:13px} .val{color:#666;width:52px;text-align:right;flex:none}
.line{font-family:monospace;line-height:1.7}
.tok{display:inline-block;white-space:pre;padding:1px 0;border-radius:2px} .tgt{outline:1.5px solid #111}
.bin{font-size:12px;color:#555;margin-top:6px}
</style></head><body>
<header><h1>%TITLE%</h1><p id="summary">%SUMMARY%</p></header>
<main><div id="left"><input id="q" type="search" placeholder="search a token text or a feature index">
<div id="count"></div><div id="listbox"><table><thead><tr><th data-k="0">feature</th><th data-k="1">freq</th>
<th data-k="2">max</th><th>top tokens</th></tr></thead><tbody id="rows"></tbody></table>
<button id="more" hidden>show more</button></div></div>
<div id="card"><p class="stats">Click a feature to open its card.</p></div></main>
<script type="application/json" id="data">%DATA%</script>
<script>
(function () {
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const V = D.vocab, F = D.features, N = D.n_tokens, STEP = 1000;
const at = new Map(F.map((f, j) => [f[0], j]));
const keys = F.map(f => f[3].map(t => V[t[0]].toLowerCase()).join("\n"));
const $ = id => document.getElementById(id);
let sortKey = 1, sortDir = -1, shown = STEP, current = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}
const p3 = x => Number(x).toPrecision(3);
const pct = c => p3(100 * c / N) + "%";
function chip(v, n) {
  const s = el("span");
  s.appendChild(el("span", "chip", V[v]));
  if (n !== undefined) s.appendChild(el("span", "n", "\u00d7" + n + " "));
  return s;
}
function matches() {
  const q = $("q").value.trim().toLowerCase();
  let js = F.map((f, j) => j);
  if (q) js = js.filter(j => keys[j].includes(q));
  js.sort((a, b) => sortDir * (F[a][sortKey] - F[b][sortKey]) || F[a][0] - F[b][0]);
  if (/^\d+$/.test(q) && at.has(Number(q))) {  // a feature index: that feature first
    const j = at.get(Number(q));
    js = [j].concat(js.filter(x => x !== j));
  }
  return js;
}
function renderList() {
  const js = matches(), body = $("rows");
  body.textContent = "";
  for (const j of js.slice(0, shown)) {
    const f = F[j], tr = el("tr", "row" + (f[0] === current ? " sel" : ""));
    tr.dataset.f = f[0];
    tr.appendChild(el("td", "", f[0]));
    tr.appendChild(el("td", "", pct(f[1])));
    tr.appendChild(el("td", "", p3(f[2])));
    const td = el("td");
    f[3].forEach(t => td.appendChild(chip(t[0], t[1])));
    tr.appendChild(td);
    tr.addEventListener("click", () => { showCard(f[0]); writeHash(); });
    body.appendChild(tr);
  }
  $("count").textContent = js.length + " of " + F.length + " live features match";
  $("more").hidden = js.length <= shown;
}
function tokenSpan(v, q, top, target) {
  const s = el("span", "tok" + (target ? " tgt" : ""), V[v]);
  if (q > 0) s.style.backgroundColor = "rgba(255,102,0," + (q / 255).toFixed(3) + ")";
  s.title = q > 0 ? "activation \u2248 " + p3(q / 255 * top) : "activation 0";
  return s;
}
function example(ex, top) {
  const row = el("div", "ex"), line = el("span", "line");
  row.appendChild(el("span", "val", p3(ex[0])));
  ex[2].forEach((v, i) => line.appendChild(tokenSpan(v, parseInt(ex[3].substr(2 * i, 2), 16), top, i === ex[1])));
  row.appendChild(line);
  return row;
}
function histogram(h) {
  const edges = h[0], counts = h[1], m = Math.max.apply(null, counts), box = el("div", "hist");
  if (!counts.length) return el("p", "stats", "no histogram");
  counts.forEach((c, i) => {
    const b = el("div", "bar");
    b.style.height = (c > 0 ? Math.max(1, 100 * c / m) : 0) + "%";
    b.title = p3(edges[i]) + " \u2013 " + p3(edges[i + 1]) + ": " + c + " tokens";
    box.appendChild(b);
  });
  const axis = el("div", "axis");
  axis.appendChild(el("span", "", p3(edges[0])));
  axis.appendChild(el("span", "", "activation (log-spaced bins)"));
  axis.appendChild(el("span", "", p3(edges[edges.length - 1])));
  const wrap = el("div", "histwrap");
  wrap.appendChild(box); wrap.appendChild(axis);
  return wrap;
}
function lensList(cls, title, entries) {
  const box = el("div", cls), ol = el("ol");
  box.appendChild(el("h3", "", title));
  entries.forEach(t => { const li = el("li"); li.appendChild(chip(t[0])); li.appendChild(el("span", "", p3(t[1]))); ol.appendChild(li); });
  box.appendChild(ol);
  return box;
}
function showCard(i) {
  const card = $("card");
  card.textContent = "";
  current = i;
  document.querySelectorAll("tr.row").forEach(tr => tr.classList.toggle("sel", Number(tr.dataset.f) === i));
  if (!at.has(i)) {
    card.appendChild(el("p", "stats", i >= 0 && i < D.n_directions ? "Feature " + i + " is dead: it never fired on the "
      + N + " tokens mined." : "There is no feature " + i + " (the dictionary has " + D.n_directions + ")."));
    return;
  }
  const f = F[at.get(i)], top = f[2];
  card.appendChild(el("h2", "", "Feature " + i));
  card.appendChild(el("p", "stats", "fires on " + pct(f[1]) + " of tokens (" + f[1] + " of " + N + ") \u00b7 max "
    + p3(top)));
  const tt = el("p", "stats", "top tokens: ");
  f[3].forEach(t => tt.appendChild(chip(t[0], t[1])));
  card.appendChild(tt);
  card.appendChild(el("h3", "", "Activation histogram (firing tokens)"));
  card.appendChild(histogram(f[4]));
  if (f[7]) {
    const lens = el("div", "lens");
    lens.appendChild(lensList("lens-up", "Logit lens: promotes", f[7][0]));
    lens.appendChild(lensList("lens-down", "Logit lens: suppresses", f[7][1]));
    card.appendChild(lens);
  }
  const tops = el("div", "top");
  tops.appendChild(el("h3", "", "Top examples (colour: activation / max; box: the example's token)"));
  f[5].forEach(ex => tops.appendChild(example(ex, top)));
  card.appendChild(tops);
  if (f[6].length) {
    const qs = el("div", "quantiles");
    qs.appendChild(el("h3", "", "Quantile examples (a sample per activation bin)"));
    f[6].slice().reverse().forEach(b => {
      qs.appendChild(el("div", "bin", "activation " + p3(b[0]) + " \u2013 " + p3(b[1]) + (b[2].length ? "" : ": none")));
      b[2].forEach(ex => qs.appendChild(example(ex, top)));
    });
    card.appendChild(qs);
  }
}
function writeHash() {
  const p = new URLSearchParams();
  if ($("q").value) p.set("q", $("q").value);
  if (current !== null) p.set("f", current);
  try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* some file:// setups refuse */ }
}
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  $("q").value = p.get("q") || "";
  shown = STEP;
  renderList();
  if (p.has("f") && /^\d+$/.test(p.get("f"))) showCard(Number(p.get("f")));
}
$("q").addEventListener("input", () => { shown = STEP; renderList(); writeHash(); });
$("more").addEventListener("click", () => { shown += STEP; renderList(); });
document.querySelectorAll("th[data-k]").forEach(th => th.addEventListener("click", () => {
  const k = Number(th.dataset.k);
  sortDir = k === sortKey ? -sortDir : (k === 0 ? 1 : -1);
  sortKey = k;
  renderList();
}));
window.addEventListener("hashchange", readHash);
readHash();
})();
</script>
</body></html>
"""
