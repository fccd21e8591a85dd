"""report/report.html: the report's sections as one self-contained page, with matplotlib plots embedded as
base64 PNGs (no external assets): reconstruction error per layer by block and type, token saliency by
modality, per-component fidelity and task accuracy per question type, each where the report has the numbers."""
from __future__ import annotations

import base64
import html
import io
import math
import re

from .report import Section, layer_kind

STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}img{max-width:100%;display:block;margin:.5em 0}
.pass{background:#d9f2d9}.warn{background:#fff1c2}.fail{background:#f8cfcf}h2.pass,h2.warn,h2.fail{padding:4px 8px}"""
COLORS = {"pass", "warn", "fail"}


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _lines(lines: list[str]) -> list[str]:
    """Markdown lines as HTML: runs of "- " bullets become a list, headings headings, the rest paragraphs."""
    out, items = [], []
    for line in lines + [""]:
        if line.startswith("- "):
            cls = ' class="warn"' if line.startswith("- warning:") else ""
            items.append(f"<li{cls}>{_inline(line[2:])}</li>")
            continue
        if items:
            out += ["<ul>", *items, "</ul>"]
            items = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
    return out


def _section(s: Section, plot: bytes | None) -> list[str]:
    result = s.title.split(": ")[-1].lower() if s.title.startswith("Verdict") else ""
    cls = f' class="{result}"' if result in COLORS else ""
    out = [f"<h{s.level}{cls}>{_inline(s.title)}</h{s.level}>", *_lines(s.text)]
    if plot:
        out.append(f'<img src="data:image/png;base64,{base64.b64encode(plot).decode()}" alt="{html.escape(s.plot)}">')
    if s.header:
        out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in s.header) + "</tr>")
        for row in s.rows:
            out.append("<tr>" + "".join(f'<td class="{c}">{c}</td>' if c in COLORS else f"<td>{_inline(c)}</td>"
                                        for c in row) + "</tr>")
        out.append("</table>")
    return out + _lines(s.notes)


def render_html(header: list[str], secs: list[Section], manifest: dict, report: dict, verdict: dict) -> str:
    figs = plots(manifest, report, verdict["outlier_layers"])
    body = _lines(header)
    for s in secs:
        body += _section(s, figs.get(s.plot))
    title = html.escape(f"vlmq-export report: {manifest['source']['model']}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------- plots
def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(rows: int, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height * rows), layout="constrained")
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def layer_errors_plot(layers: list[dict], outliers: list[dict]) -> bytes | None:
    from matplotlib.ticker import MaxNLocator

    by_comp: dict[str, dict[str, list]] = {}
    for r in layers:
        if r.get("bits") and r.get("error") is not None and math.isfinite(r["error"]) and r["error"] > 0:
            block, kind = layer_kind(r["name"])
            by_comp.setdefault(r.get("component", ""), {}).setdefault(kind, []).append((block or 0, r["error"]))
    if not by_comp:
        return None
    fig, axes = _figure(len(by_comp))
    flagged = {o["name"]: o for o in outliers}
    for ax, (comp, kinds) in zip(axes, by_comp.items()):
        for kind, pts in sorted(kinds.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=kind)
        outs = [o for o in flagged.values() if o["component"] == comp]
        if outs:
            ax.scatter([o["block"] or 0 for o in outs], [o["error"] for o in outs], s=120, facecolors="none",
                       edgecolors="red", linewidths=2, label="outlier", zorder=3)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{comp}: reconstruction error per layer, by block and layer type")
        ax.set_xlabel("block")
        ax.set_ylabel("error (log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def saliency_plot(sal: dict) -> bytes:
    import numpy as np

    sites = list(sal)
    x = np.arange(len(sites))
    fig, (a, b) = _figure(2, 2.8)
    for i, mod in enumerate(("vision", "text", "other")):
        a.bar(x + (i - 1) * 0.27, [sal[s].get(f"{mod}_mean_grad") or 0 for s in sites], 0.27, label=mod)
    a.set_title("token saliency by modality: mean gradient norm per block")
    b.plot(x, [sal[s].get("vision_weight_share") or 0 for s in sites], marker="o", label="share of Hessian weight")
    if all("vision_token_share" in sal[s] for s in sites):
        b.plot(x, [sal[s]["vision_token_share"] for s in sites], marker="s", ls="--", label="share of tokens")
    b.set_title("vision tokens: share of the calibration weight against their share of the tokens")
    for ax in (a, b):
        ax.set_xticks(x, sites, rotation=90 if len(sites) > 16 else 0, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return _png(fig)


def components_plot(comp: dict) -> bytes | None:
    items = [(f"{c} {k}", v) for c, metrics in comp.items() for k, v in metrics.items() if v is not None]
    if not items:
        return None
    fig, (ax,) = _figure(1, 0.4 * len(items) + 1)
    ax.barh(range(len(items)), [v for _, v in items], color="#4a7fb5")
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=8)
    ax.invert_yaxis()
    lo = min(v for _, v in items)
    ax.set_xlim(max(0.0, min(0.9, lo - 0.02)), 1.0)
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    ax.set_title("per-component fidelity against the float graphs (1 = identical)")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def task_plot(task: dict) -> bytes | None:
    import numpy as np

    models = {k: v for k, v in task.items() if isinstance(v, dict) and "per_qtype" in v}
    if not models:
        return None
    qtypes = sorted({q for v in models.values() for q in v["per_qtype"]}) + ["overall"]
    x = np.arange(len(qtypes))
    w = 0.8 / len(models)
    fig, (ax,) = _figure(1, 3.0)
    for i, (name, res) in enumerate(models.items()):
        vals = [res["per_qtype"].get(q, 0) for q in qtypes[:-1]] + [res.get("accuracy") or 0]
        cis = [res.get("per_qtype_ci95", {}).get(q) for q in qtypes[:-1]] + [res.get("ci95")]
        err = None  # 95 % Wilson intervals as error bars (asymmetric), where the result has them
        if all(cis):
            err = np.clip([[v - lo for v, (lo, _) in zip(vals, cis)], [hi - v for v, (_, hi) in zip(vals, cis)]], 0, None)
        label = name.replace("_", " ") + (f" (n={res['n']})" if res.get("n") not in (None, task.get("samples")) else "")
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * w, vals, w, yerr=err, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xticks(x, qtypes)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("exact match")
    ax.set_title(f"task accuracy per question type ({task.get('samples')} samples; bars: 95 % Wilson intervals)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _png(fig)


def perplexity_plot(ppl: dict) -> bytes | None:
    models = {k: v for k, v in ppl.items() if isinstance(v, dict)}
    if not models:
        return None
    fig, axes = _figure(2, 0.45 * len(models) + 0.9)
    for ax, text in zip(axes, ("english", "heldout")):
        rows = [(name.replace("_", " "), res[text]) for name, res in models.items()]
        vals = [r["perplexity"] for _, r in rows]
        err = [[v - r["ci95"][0] for v, (_, r) in zip(vals, rows)], [r["ci95"][1] - v for v, (_, r) in zip(vals, rows)]]
        ax.barh(range(len(rows)), vals, xerr=err, capsize=4, color="#4a7fb5")
        ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"perplexity on {'english.txt' if text == 'english' else 'the held-out English text'} "
                     f"({rows[0][1]['tokens']:,} tokens; bars: 95 % bootstrap interval)")
        ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def plots(manifest: dict, report: dict, outliers: list[dict]) -> dict[str, bytes]:
    figs = {"layers": layer_errors_plot(manifest.get("layers", []), outliers)}
    if report.get("saliency"):
        figs["saliency"] = saliency_plot(report["saliency"])
    if report.get("components"):
        figs["components"] = components_plot(report["components"])
    if report.get("task"):
        figs["task"] = task_plot(report["task"])
    if report.get("perplexity"):
        figs["perplexity"] = perplexity_plot(report["perplexity"])
    return {k: v for k, v in figs.items() if v}
