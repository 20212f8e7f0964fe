"""Benchmark report: one self-contained HTML page, a Markdown twin and machine-readable results.

Files written into the output folder:

* ``report.html``: every table and figure (PNG embedded as base64, so the file can be mailed);
* ``report.md``: the same tables, figures linked by relative path;
* ``results.csv``: one row per (task, label, encoder, variant, metric) with fold mean ± sd, the
  pooled point estimate and its subject-level bootstrap 95% interval;
* ``paired.csv``: every encoder versus the reference (difference, interval, permutation p-value);
* ``results.json``: all of the above plus the resolved config and provenance (encoder weights and
  their sha256, store feature-set hashes, split files, library versions, timings).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

RESULT_COLUMNS = ("task", "label", "encoder", "variant", "metric", "mean", "sd", "point", "ci_low", "ci_high",
                  "n_subjects", "n_folds", "n_repeats")
PAIRED_COLUMNS = ("task", "label", "variant", "metric", "encoder", "reference", "delta", "ci_low", "ci_high",
                  "p_value", "n_subjects")


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def _cell(row: Mapping) -> str:
    """``point [lo, hi] (mean ± sd over folds)``."""
    text = f"{_fmt(row.get('point'))} [{_fmt(row.get('ci_low'))}, {_fmt(row.get('ci_high'))}]"
    if row.get("mean") is not None and _is_num(row.get("sd")):
        text += f" ({_fmt(row['mean'])} ± {_fmt(row['sd'])})"
    return text


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def summary_tables(rows: Sequence[Mapping]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Tables ``(title, header, body)``: one per (task, label), encoders as rows, metrics as columns."""
    tables = []
    keys = list(dict.fromkeys((r["task"], r["label"]) for r in rows))
    for task, label in keys:
        sub = [r for r in rows if r["task"] == task and r["label"] == label]
        metrics = list(dict.fromkeys(r["metric"] for r in sub))
        body = []
        for enc, var in dict.fromkeys((r["encoder"], r["variant"]) for r in sub):
            cells = {r["metric"]: _cell(r) for r in sub if r["encoder"] == enc and r["variant"] == var}
            body.append([enc, str(var)] + [cells.get(m, "–") for m in metrics])
        n = sub[0].get("n_subjects", "")
        tables.append((f"{task} — {label} (n = {n})", ["encoder", "variant", *metrics], body))
    return tables


def paired_table(paired: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "label", "variant", "metric", "encoder", "vs reference", "Δ (A − ref)", "95% CI", "p"]
    body = [[p["task"], p["label"], str(p["variant"]), p["metric"], p["encoder"], p["reference"], _fmt(p["delta"]),
             f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]", _fmt(p["p_value"], 4)] for p in paired]
    return header, body


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in body]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}pre{background:#f6f6f6;padding:0.8em;
font-size:12px;overflow-x:auto}.note{color:#555;font-size:13px}"""


def write_report(out_dir: str | Path, *, title: str, rows: Sequence[Mapping], paired: Sequence[Mapping],
                 figures: Sequence[tuple[str, str | Path]], config: Mapping, provenance: Mapping,
                 notes: Sequence[str] = (), extra: Mapping | None = None) -> dict[str, Path]:
    """Writes report.html, report.md, results.csv, paired.csv and results.json into ``out_dir``.

    Args:
        rows: metric rows with the keys of :data:`RESULT_COLUMNS`.
        paired: paired-comparison rows with the keys of :data:`PAIRED_COLUMNS`.
        figures: (caption, PNG path) in display order; missing files are reported, not fatal.
        config: the resolved experiment config.
        provenance: encoders, weights, hashes, versions, timings.
        notes: protocol sentences printed under the title.
        extra: more JSON-able results (e.g. per-subject Dice) stored in results.json.

    Returns:
        name -> path of every file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.html", "report.md", "results.csv", "paired.csv", "results.json")}
    with open(paths["results.csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["paired.csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PAIRED_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(paired)
    payload = {"title": title, "results": list(rows), "paired": list(paired), "config": config,
               "provenance": provenance, "figures": [{"caption": c, "path": os.path.relpath(p, out)} for c, p in figures],
               **(dict(extra) if extra else {})}
    paths["results.json"].write_text(json.dumps(payload, indent=1, default=_json_default))

    tables = summary_tables(rows)
    p_header, p_body = paired_table(paired)
    legend = ("Cells: pooled out-of-fold estimate [subject-level bootstrap 95% CI] (mean ± sd over folds). "
              "Δ: metric(encoder) − metric(reference) on the same subjects and splits, paired bootstrap CI, "
              "two-sided paired permutation p-value.")
    # HTML
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append(f"<p class='note'>{html.escape(legend)}</p><h2>Results</h2>")
    for t, header, body in tables:
        parts.append(f"<h3>{html.escape(t)}</h3>" + _html_table(header, body))
    if paired:
        parts.append("<h2>Paired comparisons</h2>" + _html_table(p_header, p_body))
    parts.append("<h2>Figures</h2>")
    for caption, fig in figures:
        fig = Path(fig)
        if fig.exists():
            data = base64.b64encode(fig.read_bytes()).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        else:
            parts.append(f"<p class='note'>missing figure: {html.escape(str(fig))}</p>")
    parts.append("<h2>Provenance</h2><pre>" + html.escape(json.dumps(provenance, indent=1, default=_json_default))
                 + "</pre><h2>Resolved config</h2><pre>"
                 + html.escape(json.dumps(config, indent=1, default=_json_default)) + "</pre></body></html>")
    paths["report.html"].write_text("".join(parts))
    # Markdown
    md = [f"# {title}", "", *[f"{n}  " for n in notes], "", legend, "", "## Results", ""]
    for t, header, body in tables:
        md += [f"### {t}", "", _md_table(header, body), ""]
    if paired:
        md += ["## Paired comparisons", "", _md_table(p_header, p_body), ""]
    md += ["## Figures", ""]
    for caption, fig in figures:
        md += [f"![{caption}]({os.path.relpath(fig, out)})", "", f"*{caption}*", ""]
    md += ["## Provenance", "", "```json", json.dumps(provenance, indent=1, default=_json_default), "```", "",
           "## Resolved config", "", "```json", json.dumps(config, indent=1, default=_json_default), "```", ""]
    paths["report.md"].write_text("\n".join(md))
    return paths


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)
