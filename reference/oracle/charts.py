"""The two charts of `asl view`'s page, drawn as inline SVG (reference/oracle/view.py): the tokens each layer
processed and cached, and ASL's ratio against τ. Plain strings in, an <svg> element out: no drawing library, no
script; every label is escaped, and each mark carries a <title> the browser shows on hover.
"""

from __future__ import annotations

import html
import math


def number(x) -> str:
    """A trace's number as a label: "–" for null, "∞" for "inf", 4 significant digits."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return "∞" if x == "inf" else html.escape(x)
    if isinstance(x, (bool, int)):
        return str(x)
    return f"{x:.4g}"


def _si(x: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}"
    return f"{x:g}"


def _ticks(top: float, count: int = 4) -> list[float]:
    if top <= 0:
        return [0.0]
    raw = top / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(f for f in (1, 2, 2.5, 5, 10) if f * step >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e4 else _si(v)


def tokens_chart(entries: list[dict], title: str, N: int, select: int | None, select_label: str,
                 decided: list[int] = ()) -> str:
    """Bars: tokens each layer processed; marks: tokens each KV head cached, where they differ; the selection."""
    W, H, left, right, top, bottom = 760, 230, 56, 12, 28, 34
    pw, ph = W - left - right, H - top - bottom
    n = max(len(entries), 1)
    band = pw / n
    ymax = max([N] + [e["prefill_tokens"] for e in entries]) or 1
    y = lambda v: top + ph - ph * v / ymax  # noqa: E731
    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">',
           f'<text class="ctitle" x="{left}" y="16">{html.escape(title)}</text>']
    for t in _ticks(ymax):
        out.append(f'<line class="grid" x1="{left}" x2="{W - right}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
                   f'<text class="tick" x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>')
    for i, e in enumerate(entries):
        x0 = left + i * band
        kv = e["kv_tokens"]
        differs = bool(kv) and any(t != e["prefill_tokens"] for t in kv)
        tip = (f"layer {e['layer']}: processed {e['prefill_tokens']} tokens; cached "
               f"{', '.join(map(str, kv)) if kv else 'nothing (q and k only)'} per KV head"
               f"{'; scored' if e['scored'] else ''}{'; kept ' + str(e['kept_tokens']) if e['kept_tokens'] else ''}"
               f"{'; SnapKV decided' if e['kv_boundary_gaps'] else ''}")
        out.append(f'<g class="bar"><title>{html.escape(tip)}</title>'
                   f'<rect class="processed{" sel" if e["layer"] == select else ""}" x="{x0 + band * 0.1:.1f}" '
                   f'y="{y(e["prefill_tokens"]):.1f}" width="{band * 0.8:.1f}" '
                   f'height="{max(ph * e["prefill_tokens"] / ymax, 0.5):.1f}"/>')
        if differs:
            sub = band * 0.8 / len(kv)
            for g, t in enumerate(kv):
                out.append(f'<rect class="cached" x="{x0 + band * 0.1 + g * sub + sub * 0.15:.1f}" y="{y(t):.1f}" '
                           f'width="{sub * 0.7:.1f}" height="{max(ph * t / ymax, 0.5):.1f}"/>')
        if e["layer"] in decided:
            out.append(f'<text class="mark" x="{x0 + band / 2:.1f}" y="{y(e["prefill_tokens"]) - 3:.1f}" '
                       f'text-anchor="middle">▾</text>')
        out.append("</g>")
        if n <= 40 or i % max(1, n // 20) == 0:
            out.append(f'<text class="tick" x="{x0 + band / 2:.1f}" y="{top + ph + 14}" text-anchor="middle">'
                       f'{e["layer"]}</text>')
    if select is not None and select < n:
        xs = left + (select + 1) * band
        after = [e["prefill_tokens"] for e in entries[select + 1:]]
        right_side = bool(after) and (n - select - 1) * band > 7 * len(select_label)
        ly = y(max(after)) - 8 if right_side else top + 10  # above the bars after the selection, or at the top
        out.append(f'<line class="selline" x1="{xs:.1f}" x2="{xs:.1f}" y1="{top - 4}" y2="{top + ph}"/>'
                   f'<text class="sellabel" x="{xs + (5 if right_side else -5):.1f}" y="{max(ly, top + 10):.1f}" '
                   f'text-anchor="{"start" if right_side else "end"}">{html.escape(select_label)}</text>')
    out.append(f'<text class="axis" x="{left + pw / 2:.1f}" y="{H - 4}" text-anchor="middle">layer</text>'
               f'<text class="axis" transform="translate(13 {top + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">tokens</text></svg>')
    return "".join(out)


def criterion_chart(entries: list[dict], tau: float, l_min: int, fired: int | None, never: str,
                    oracle: list[dict] | None = None, oracle_fired: int | None = None) -> str:
    """ASL's ratio v_ℓ / V0 layer by layer against τ; the firing layer, or 'never fired', marked."""
    W, H, left, right, top, bottom = 760, 230, 56, 12, 28, 34
    pw, ph = W - left - right, H - top - bottom
    n = max(len(entries), 1)
    band = pw / n
    finite = [e["ratio"] for e in entries + (oracle or []) if isinstance(e["ratio"], (int, float))]
    ymax = max([1.05, tau * 1.15] + [r * 1.05 for r in finite])
    y = lambda v: top + ph - ph * min(v, ymax) / ymax  # noqa: E731
    x = lambda layer: left + (layer + 0.5) * band  # noqa: E731
    out = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="ASL ratio against tau">',
           '<text class="ctitle" x="56" y="16">ASL\'s criterion: ratio = rank variance / its value at L_min, '
           'per layer</text>',
           f'<rect class="warmup" x="{left}" y="{top}" width="{band * min(l_min, n):.1f}" height="{ph}"/>']
    if 0 < l_min <= n:
        out.append(f'<text class="tick" x="{left + 4}" y="{top + 12}">before L_min: scored, not judged</text>')
    for t in _ticks(ymax):
        out.append(f'<line class="grid" x1="{left}" x2="{W - right}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
                   f'<text class="tick" x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>')
    out.append(f'<line class="tau" x1="{left}" x2="{W - right}" y1="{y(tau):.1f}" y2="{y(tau):.1f}"/>'
               f'<text class="taulabel" x="{W - right - 4}" y="{y(tau) - 4:.1f}" text-anchor="end">'
               f'τ = {number(tau)}</text>')

    def line(es, cls):
        pts = [(x(e["layer"]), top if isinstance(e["ratio"], str) else y(e["ratio"])) for e in es
               if e["ratio"] is not None]
        return f'<polyline class="{cls}" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>' if pts else ""

    if oracle:
        out.append(line(oracle, "oracle"))
    out.append(line(entries, "ratio"))
    for e in entries:
        if e["ratio"] is None:
            continue
        inf = isinstance(e["ratio"], str)
        tip = (f"layer {e['layer']}: ratio {number(e['ratio'])}, margin {number(e['margin'])} "
               f"({'below' if not inf and e['ratio'] < tau else 'not below'} τ), |U| = {e['union_size']}, "
               f"boundary gap {number(e['boundary_gap'])}")
        cls = "pt fired" if e["layer"] == fired else "pt"
        out.append(f'<circle class="{cls}" cx="{x(e["layer"]):.1f}" cy="{top if inf else y(e["ratio"]):.1f}" '
                   f'r="{6 if e["layer"] == fired else 3.2}"><title>{html.escape(tip)}</title></circle>')
        if inf:
            out.append(f'<text class="tick" x="{x(e["layer"]):.1f}" y="{top - 3}" text-anchor="middle">∞</text>')
    if fired is not None:
        e = entries[fired]
        py = top if isinstance(e["ratio"], str) else y(e["ratio"])
        ly = py + 18 if py < top + ph * 0.6 else py - 12  # below the point, or above it near the axis
        out.append(f'<text class="firedlabel" x="{x(fired) + (8 if fired < n * 0.7 else -8):.1f}" y="{ly:.1f}" '
                   f'text-anchor="{"start" if fired < n * 0.7 else "end"}">fired at layer {fired}: ratio '
                   f'{number(e["ratio"])} &lt; τ</text>')
    else:
        out.append(f'<text class="firedlabel" x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" '
                   f'text-anchor="middle">{html.escape(never)}</text>')
    if oracle_fired is not None and oracle_fired != fired:
        out.append(f'<line class="oracleline" x1="{x(oracle_fired):.1f}" x2="{x(oracle_fired):.1f}" y1="{top}" '
                   f'y2="{top + ph}"/><text class="tick" x="{x(oracle_fired) + 3:.1f}" y="{top + ph - 4}">'
                   f"oracle's ℓ* = {oracle_fired}</text>")
    for e in entries:
        if n <= 40 or e["layer"] % max(1, n // 20) == 0:
            out.append(f'<text class="tick" x="{x(e["layer"]):.1f}" y="{top + ph + 14}" text-anchor="middle">'
                       f'{e["layer"]}</text>')
    out.append(f'<text class="axis" x="{left + pw / 2:.1f}" y="{H - 4}" text-anchor="middle">layer</text>'
               f'<text class="axis" transform="translate(13 {top + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">ratio</text></svg>')
    return "".join(out)
