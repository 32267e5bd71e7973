// asl view: the token strip, its views, paging and the token inspector (reference/oracle/view.py writes the data).
// Every string from the data is set with textContent: nothing from a trace is ever parsed as HTML.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("asl-data").textContent);
  const N = D.n;
  const $ = (id) => document.getElementById(id);
  const TYPES = { f32: Float32Array, u16: Uint16Array, u32: Uint32Array };

  function unpack(x) {
    if (!x) return null;
    if (!x._a) {
      const bin = atob(x.b);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      x._a = new TYPES[x.t](bytes.buffer);
    }
    return x._a;
  }

  function member(x) {  // a packed list of positions -> Uint8Array(N) of 0/1
    if (!x) return null;
    if (!x._m) {
      const m = new Uint8Array(N);
      for (const q of unpack(x)) m[q] = 1;
      x._m = m;
    }
    return x._m;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g;
  function visible(s) {
    return s.replace(CONTROL, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"))
      .replace(/\t/g, "⇥").replace(/\n/g, "↵\n");
  }
  function tokenText(i) {
    if (!D.pieces) return String(D.ids[i]) + " ";
    const p = D.pieces[i];
    return p === "" ? "∅" : visible(p);
  }
  function fmt(x) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(3) : x.toPrecision(4);
  }

  const win = D.window;
  const inWindow = (i) => win !== null && i >= win[0] && i < win[1];
  const STATE = ["dropped", "kept", "only-o", "only-c"];

  // ------------------------------------------------------------ views: which tokens are kept, how dark
  let view = null, state = new Uint8Array(N), shade = new Float32Array(N);
  let page = 0, pinned = null, focus = D.focus;

  function rankShade(s, i) {
    const sc = D.scored[s];
    const r = unpack(sc.rank)[i];
    if (!r) return 1;
    const count = sc.count || sc.ranked;
    return 0.2 + 0.8 * (1 - Math.min(r - 1, count) / Math.max(count, 1));
  }

  function compute(v) {
    state = new Uint8Array(N);
    shade = new Float32Array(N).fill(1);
    if (v.kind === "all") state.fill(1);
    else if (v.kind === "set") {
      for (const q of unpack(v.kept)) state[q] = 1;
      if (v.shade !== null && v.shade !== undefined) for (let i = 0; i < N; i++) shade[i] = rankShade(v.shade, i);
    } else if (v.kind === "ranked") {
      const sc = D.scored[v.scored], r = unpack(sc.rank);
      for (let i = 0; i < N; i++) {
        state[i] = (r[i] && r[i] <= sc.count) || (!r[i] && inWindow(i)) ? 1 : 0;
        shade[i] = rankShade(v.scored, i);
      }
    } else if (v.kind === "snap") {
      const count = new Uint8Array(N);
      for (const h of v.heads) for (const q of unpack(h)) count[q]++;
      for (let i = 0; i < N; i++) { state[i] = count[i] ? 1 : 0; shade[i] = 0.2 + 0.8 * count[i] / v.heads.length; }
    } else if (v.kind === "diff") {
      const o = member(v.oracle), c = member(v.cand);
      for (let i = 0; i < N; i++) state[i] = o[i] && c[i] ? 1 : o[i] ? 2 : c[i] ? 3 : 0;
    }
  }

  function select(key) {
    view = D.views.find((v) => v.key === key) || D.views[0];
    $("view").value = view.key;
    compute(view);
    const kept = state.reduce((a, s) => a + (s ? 1 : 0), 0);
    $("view-note").textContent = view.kind === "diff"
      ? countDiff() : kept + " of " + N + " tokens highlighted";
    drawOverview();
    draw();
  }

  function countDiff() {
    let o = 0, c = 0;
    for (let i = 0; i < N; i++) { if (state[i] === 2) o++; if (state[i] === 3) c++; }
    return o + " kept only by the oracle, " + c + " only by the candidate";
  }

  // ------------------------------------------------------------ the strip, a page at a time
  const pages = Math.max(1, Math.ceil(N / D.pageSize));

  function draw() {
    const strip = $("strip");
    const start = page * D.pageSize, end = Math.min(N, start + D.pageSize);
    const frag = document.createDocumentFragment();
    for (let i = start; i < end; i++) {
      const s = el("span", "t " + STATE[state[i]] + (inWindow(i) ? " win" : "") + (i === focus ? " focus" : "")
        + (i === pinned ? " pinned" : ""), tokenText(i));
      s.dataset.i = i;
      if (state[i] === 1) s.style.backgroundColor = "rgba(49, 110, 200, " + (0.12 + 0.55 * shade[i]).toFixed(3) + ")";
      frag.appendChild(s);
    }
    strip.replaceChildren(frag);
    $("page-label").textContent = "tokens " + start + "–" + (end - 1) + " of " + N
      + (pages > 1 ? " (page " + (page + 1) + " of " + pages + ")" : "");
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    const box = $("ov-page");
    if (box) { box.style.left = (100 * start / N) + "%"; box.style.width = Math.max(0.4, 100 * (end - start) / N) + "%"; }
  }

  function goPage(p) { page = Math.max(0, Math.min(pages - 1, p)); draw(); }
  function reveal(i, scrollWindow) {  // the token's page, scrolled to inside the strip (the window only when asked)
    goPage(Math.floor(i / D.pageSize));
    const strip = $("strip"), s = strip.querySelector('[data-i="' + i + '"]');
    if (s) strip.scrollTop = Math.max(0, s.offsetTop - strip.clientHeight / 2);
    if (scrollWindow) strip.scrollIntoView({ block: "nearest" });
  }

  function drawOverview() {  // the whole prompt in bins: how much of each bin is highlighted, where the diffs are
    const box = $("overview");
    const bins = Math.min(N, 400);
    const frag = document.createDocumentFragment();
    for (let b = 0; b < bins; b++) {
      const lo = Math.floor(b * N / bins), hi = Math.max(lo + 1, Math.floor((b + 1) * N / bins));
      let k = 0, d = 0;
      for (let i = lo; i < hi; i++) { if (state[i]) k++; if (state[i] >= 2) d++; }
      const cell = el("div", d ? "bin diff" : "bin");
      if (!d) cell.style.opacity = (0.08 + 0.92 * k / (hi - lo)).toFixed(3);
      cell.style.width = (100 / bins) + "%";
      cell.dataset.i = lo;
      frag.appendChild(cell);
    }
    frag.appendChild(Object.assign(el("div", "ov-page"), { id: "ov-page" }));
    box.replaceChildren(frag);
  }

  // ------------------------------------------------------------ the inspector
  function heldBy(list, i) {  // binary search in a sorted Uint32Array
    let lo = 0, hi = list.length - 1;
    while (lo <= hi) { const m = (lo + hi) >> 1; if (list[m] === i) return true; if (list[m] < i) lo = m + 1; else hi = m - 1; }
    return false;
  }

  function status(i) {
    const v = view;
    if (v.kind === "diff") {
      return ["dropped by both", "kept by both", "kept only by the oracle", "kept only by the candidate"][state[i]];
    }
    if (state[i] === 0) return "dropped" + (v.layer !== undefined ? " at layer " + v.layer : "");
    if (inWindow(i)) return "kept: in the window (the last tokens, always kept)";
    return "kept" + (v.layer !== undefined ? " at layer " + v.layer : "");
  }

  function show(i) {
    const box = $("inspector");
    const frag = document.createDocumentFragment();
    frag.appendChild(el("div", "ihead", "position " + i + " · token id " + D.ids[i]));
    if (D.pieces) frag.appendChild(el("div", "ipiece", "«" + visible(D.pieces[i]) + "»"));
    frag.appendChild(el("div", "istatus " + STATE[state[i]], status(i)));
    if (view.kind === "diff" && view.detail && view.detail[String(i)]) {
      frag.appendChild(el("div", "idiff", view.detail[String(i)]));
    }
    if (D.scored.length) {
      const t = el("table", "itable");
      const hr = el("tr");
      const counts = new Set(D.scored.map((sc) => sc.ranked));
      const of = counts.size === 1 ? " (of " + D.scored[0].ranked + ")" : "";
      for (const h of ["layer", "rank" + of, "score", "top?"]) hr.appendChild(el("th", null, h));
      t.appendChild(hr);
      for (const sc of D.scored) {
        const r = unpack(sc.rank)[i], s = unpack(sc.score)[i];
        const row = el("tr", sc.deciding ? "deciding" : null);
        row.appendChild(el("td", null, sc.name + (sc.deciding ? " (decided)" : "")));
        row.appendChild(el("td", null, r ? (of ? String(r) : r + " / " + sc.ranked) : "–"));
        row.appendChild(el("td", null, r ? fmt(s) : "–"));
        row.appendChild(el("td", null, r && sc.count ? (r <= sc.count ? "✓" : "") : inWindow(i) ? "window" : ""));
        t.appendChild(row);
      }
      frag.appendChild(el("div", "ilabel", (D.check ? "the candidate's " : "") + "score and rank at each scored layer "
        + "(rank 1 = highest score)"));
      frag.appendChild(t);
    } else {
      frag.appendChild(el("div", "ilabel", D.hasArrays ? "no layer of this method scored tokens for a selection"
        : "no scores: the trace was saved without its arrays"));
    }
    const pyr = D.views.filter((v) => v.kind === "set" && v.key.startsWith("kept-"));
    if (pyr.length) {
      const lost = pyr.find((v) => !member(v.kept)[i]);
      frag.appendChild(el("div", "ilabel", lost ? "passed on by the pruning layers before layer " + lost.layer
        + ", dropped there" : "passed on by every pruning layer"));
    }
    if (D.snap.length) {
      frag.appendChild(el("div", "ilabel", "SnapKV" + (D.check ? ", the candidate's caches" : "")
        + ": which KV heads cached it (■ kept, □ evicted)"));
      const grid = el("div", "snapgrid");
      for (const s of D.snap) {
        let line = "layer " + String(s.layer).padStart(3, " ") + "  ";
        const who = [];
        s.heads.forEach((h, g) => { const k = heldBy(unpack(h), i); line += k ? "■" : "□"; if (k) who.push(g); });
        grid.appendChild(el("div", view.layer === s.layer ? "cur" : null,
          line + "  " + (who.length ? (who.length > 1 ? "heads " : "head ") + who.join(", ") : "no head")));
      }
      frag.appendChild(grid);
    }
    box.replaceChildren(frag);
  }

  // ------------------------------------------------------------ wiring
  const sel = $("view");
  for (const v of D.views) {
    const o = el("option", null, v.label);
    o.value = v.key;
    sel.appendChild(o);
  }
  sel.addEventListener("change", () => { select(sel.value); if (pinned !== null) show(pinned); });
  $("prev").addEventListener("click", () => goPage(page - 1));
  $("next").addEventListener("click", () => goPage(page + 1));
  $("goto").addEventListener("change", (e) => {
    const i = parseInt(e.target.value, 10);
    if (i >= 0 && i < N) { pinned = i; reveal(i, false); show(i); }
  });
  $("strip").addEventListener("mouseover", (e) => {
    const t = e.target.closest(".t");
    if (t) show(parseInt(t.dataset.i, 10));
  });
  $("strip").addEventListener("mouseleave", () => { if (pinned !== null) show(pinned); });
  $("strip").addEventListener("click", (e) => {
    const t = e.target.closest(".t");
    if (!t) return;
    const i = parseInt(t.dataset.i, 10);
    pinned = pinned === i ? null : i;
    draw();
    show(i);
  });
  $("overview").addEventListener("click", (e) => {
    const b = e.target.closest(".bin");
    if (b) goPage(Math.floor(parseInt(b.dataset.i, 10) / D.pageSize));
  });
  const jump = $("goto-focus");
  if (jump) {
    jump.addEventListener("click", () => {
      const diff = D.views.find((v) => v.kind === "diff");
      if (diff) select(diff.key);
      const i = parseInt(jump.dataset.pos, 10);
      pinned = i; reveal(i, true); show(i);
    });
  }

  // #v=VIEW&p=POSITION picks a view and pins a token (links, screenshots)
  const hash = new URLSearchParams(location.hash.slice(1));
  select(hash.get("v") || D.default);
  const p = parseInt(hash.get("p"), 10);
  const start = p >= 0 && p < N ? p : focus;
  if (start !== null && start !== undefined && start >= 0 && start < N) {
    if (p >= 0 && p < N) pinned = p;
    reveal(start, false);
    show(start);
  }
  document.body.dataset.ready = "1";
})();
