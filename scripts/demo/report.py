#!/usr/bin/python3
"""Writes the demo's HTML report: one self-contained file (inline SVG, no scripts, no network).

Usage: report.py WORK_DIR   (reads WORK_DIR/results.json and WORK_DIR/owners/*/run/metrics.jsonl,
                             writes WORK_DIR/report.html)
"""
import glob
import html
import json
import os
import sys


def esc(s):
    return html.escape(str(s))


def table(results):
    mixed = results.get("mixed_domains", [])
    single = [d for d in results["domains"] if d not in mixed]
    best = {d: min(r["bits_per_byte"][d] for r in results["rows"]) for d in results["domains"]}
    out = ["<table><tr><th>model</th>" + "".join(f"<th>{esc(d)}</th>" for d in single) + "<th>average</th>"
           + "".join(f"<th>{esc(d)}</th>" for d in mixed) + "</tr>"]
    for r in results["rows"]:
        def cell(d):
            v = r["bits_per_byte"][d]
            return f"<td class='{'best' if v == best[d] else ''}'>{v:.4f}</td>"
        out.append(f"<tr class='{esc(r['kind'])}'><td>{esc(r['name'])}</td>{''.join(cell(d) for d in single)}"
                   f"<td>{r['average']:.4f}</td>{''.join(cell(d) for d in mixed)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def line_chart(series, width=560, height=260, xlabel="step", ylabel="training loss (nats/token)"):
    """series: {name: [(x, y), ...]} → an SVG line chart."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    pts = [p for s in series.values() for p in s]
    if not pts:
        return "<p>(no data)</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    L, R, T, B = 50, 110, 10, 35
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)
    sy = lambda y: T + (1 - (y - y0) / (y1 - y0)) * (height - T - B)
    svg = [f"<svg width='{width}' height='{height}' class='chart'>"]
    svg.append(f"<line x1='{L}' y1='{height - B}' x2='{width - R}' y2='{height - B}' stroke='#888'/>")
    svg.append(f"<line x1='{L}' y1='{T}' x2='{L}' y2='{height - B}' stroke='#888'/>")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        svg.append(f"<text x='{L - 4}' y='{sy(y) + 4:.1f}' text-anchor='end'>{y:.2f}</text>")
        x = x0 + (x1 - x0) * i / 4
        svg.append(f"<text x='{sx(x):.1f}' y='{height - B + 14}' text-anchor='middle'>{x:.0f}</text>")
    svg.append(f"<text x='{(L + width - R) / 2}' y='{height - 4}' text-anchor='middle'>{esc(xlabel)}</text>")
    svg.append(f"<text x='12' y='{(T + height - B) / 2}' transform='rotate(-90 12 {(T + height - B) / 2})' text-anchor='middle'>{esc(ylabel)}</text>")
    for i, (name, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(s))
        svg.append(f"<path d='{path}' fill='none' stroke='{c}' stroke-width='2'/>")
        svg.append(f"<text x='{width - R + 8}' y='{T + 14 + 16 * i}' fill='{c}'>{esc(name)}</text>")
    svg.append("</svg>")
    return "".join(svg)


def heatmap(matrix, rows, cols, title):
    """matrix[r][c] in [0, 1] → an SVG grid with the values written in."""
    cw, ch, L, T = 64, 26, 70, 34
    w, h = L + cw * len(cols) + 10, T + ch * len(rows) + 10
    svg = [f"<svg width='{w}' height='{h}' class='heat'><text x='{L}' y='14' font-weight='bold'>{esc(title)}</text>"]
    for j, c in enumerate(cols):
        svg.append(f"<text x='{L + cw * j + cw / 2}' y='{T - 6}' text-anchor='middle'>{esc(c)}</text>")
    for i, r in enumerate(rows):
        svg.append(f"<text x='{L - 6}' y='{T + ch * i + ch / 2 + 4}' text-anchor='end'>{esc(r)}</text>")
        for j in range(len(cols)):
            v = matrix[i][j]
            shade = int(255 - 200 * v)
            svg.append(f"<rect x='{L + cw * j}' y='{T + ch * i}' width='{cw - 2}' height='{ch - 2}' fill='rgb({shade},{shade},255)'/>")
            svg.append(f"<text x='{L + cw * j + cw / 2}' y='{T + ch * i + ch / 2 + 4}' text-anchor='middle' fill='{'#fff' if v > 0.6 else '#000'}'>{100 * v:.0f}%</text>")
    svg.append("</svg>")
    return "".join(svg)


def opt_out_chart(results):
    """Change in bits per byte per domain when each expert is opted out, against the merged model."""
    rows = results["rows"]
    merged = next(r for r in rows if r["kind"] == "merged")
    outs = [r for r in rows if r["kind"] == "opt_out"]
    domains = results["domains"]
    out = ["<table><tr><th>opted out</th>" + "".join(f"<th>{esc(d)}</th>" for d in domains) + "</tr>"]
    for r in outs:
        cells = []
        for d in domains:
            change = 100 * (r["bits_per_byte"][d] / merged["bits_per_byte"][d] - 1)
            width = min(abs(change) * 3, 120)
            color = "#d62728" if change > 0 else "#2ca02c"
            cells.append(f"<td class='bar'><span style='display:inline-block;width:{width:.0f}px;background:{color}'>&nbsp;</span> {change:+.1f}%</td>")
        out.append(f"<tr><td>{esc(r['name'].split(', ')[-1].replace(' opted out', ''))}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def main():
    work = sys.argv[1]
    results = json.load(open(os.path.join(work, "results.json")))
    curves = {}
    for path in sorted(glob.glob(os.path.join(work, "owners", "*", "run", "metrics.jsonl"))):
        owner = path.split(os.sep)[-3]
        pts = []
        for line in open(path):
            m = json.loads(line)
            if "loss" in m and "step" in m:
                pts.append((m["step"], m["loss"]))
        curves[owner] = pts
    experts = results.get("experts", [])
    heat = []
    for domain, layers in results.get("routing", {}).items():
        heat.append(heatmap(layers, [f"layer {i}" for i in range(len(layers))], [f"e{j} {e}" for j, e in enumerate(experts)],
                            f"{domain} text"))
    def verdict(c):
        if not c["holds"]:
            return "does not hold"
        return "holds" if c.get("confident", True) else "leans (point estimate only; the 95% interval crosses the line)"
    checks = "".join(
        f"<li class='{'ok' if c['holds'] else 'fail'}'>{verdict(c)}: {esc(c['claim'])} — {esc(c['detail'])}</li>"
        for c in results.get("checks", []))
    timing = {}
    tsv = os.path.join(work, "timings.tsv")
    if os.path.exists(tsv):
        for line in open(tsv):
            name, seconds = line.rstrip("\n").split("\t")
            timing[name] = seconds
    timing_html = "".join(f"<tr><td>{esc(k)}</td><td>{v} s</td></tr>" for k, v in timing.items())
    s = results.get("settings", {})
    doc = f"""<!doctype html><html><head><meta charset='utf-8'><title>FlexFed demo report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} td.best{{font-weight:bold;background:#e8f5e9}}
tr.merged td:first-child{{font-weight:bold}} .chart text,.heat text{{font-size:11px}}
li.ok{{color:#1b5e20}} li.fail{{color:#b71c1c}} .heats svg{{margin:0 1em 1em 0}} td.bar{{text-align:left;white-space:nowrap}}
</style></head><body>
<h1>FlexFed demo: experts trained apart, merged, and opted out</h1>
<p>Three data owners (code, math, scripture) each trained one expert against the same frozen public anchor
(a small model pretrained on public English text), on their own machine-local data, and uploaded only
parameters. The coordinator merged them into one mixture-of-experts model. Held-out text: {s.get('max_sequences')}
sequences of {s.get('seq_len')} tokens per domain. Lower bits per byte is better; the best value per column is bold.</p>
<h2>Bits per byte on held-out text</h2>
{table(results)}
<h2>The paper's claims</h2><p>Each with the relative difference it rests on and its 95% paired bootstrap interval over sequences.</p><ul>{checks}</ul>
<h2>Effect of each opt-out (change against the merged model)</h2>
<p>Opting an expert out at inference removes its router row: its domain falls back towards the anchor, the others
should barely move.</p>
{opt_out_chart(results)}
<h2>Routing of the merged model</h2>
<p>Share of each domain's held-out tokens whose highest-weighted expert is e, per layer (e0 is the public expert).</p>
<div class='heats'>{''.join(heat)}</div>
<h2>Owners' training loss</h2>
{line_chart(curves)}
<h2>Timings</h2><table>{timing_html}</table>
<p>Produced by <code>scripts/demo.sh</code>; method and rows explained in <code>docs/EVALUATION.md</code>.</p>
</body></html>
"""
    tmp = os.path.join(work, "report.html.tmp")
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, os.path.join(work, "report.html"))
    print(f"wrote {os.path.join(work, 'report.html')}")


if __name__ == "__main__":
    main()
