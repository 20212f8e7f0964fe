"""README.md tables from a benchmark run folder: the summary (encoder x label) as Markdown.

The README's IXI tables are the ``summary`` of ``results.json`` written by

    slice2vol bench --config configs/experiments/ixi.yaml --out runs/ixi
    python scripts/reproduce/readme_tables.py runs/ixi              # prints the Markdown

(``make figures`` runs both). Each cell is the headline estimate of the label's primary metric and
task (the one its paired tests use) with its 95% CI; the difference to the reference and the
Holm-adjusted p-value of the paired test follow on a second table. Nothing is recomputed here: the
numbers are those of the report, only laid out for the README.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _fmt(value, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value in ("inf", "-inf") or (isinstance(value, float) and math.isinf(value)):
        # results.json writes infinity (the HD95 of a missed structure) as a string
        return "∞" if value == "inf" or (isinstance(value, float) and value > 0) else "−∞"
    return f"{value:.2f}" if metric in ("mae", "rmse") else f"{value:.3f}"


def tables(results: dict, labels: list[str] | None = None, tasks: dict[str, str] | None = None) -> str:
    """Markdown for the README.

    Args:
        results: a ``results.json`` (schema ``slice2vol.results/2``).
        labels: labels (columns) to show, in order (default: all).
        tasks: optional task per label (default: the summary's primary task).
    """
    summary = results["summary"]
    labels = labels or list(dict.fromkeys(s["label"] for s in summary))
    head = {}
    for label in labels:
        first = next((s for s in summary if s["label"] == label), None)
        if first is None:
            raise SystemExit(f"readme_tables: label {label!r} is not in the summary "
                             f"(has {sorted({s['label'] for s in summary})})")
        head[label] = first
    encoders = list(dict.fromkeys(s["encoder"] for s in summary if s["label"] in labels))
    cols = [f"{label}: {head[label]['metric']} ({head[label]['task']}, {head[label].get('estimate_kind', 'pooled')})"
            for label in labels]
    lines = ["| set | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(labels)]
    delta_lines = ["| set | " + " | ".join(f"{label}: delta vs {results.get('reference')} [95% CI], p (Holm)"
                                         for label in labels) + " |", "| --- |" + " --- |" * len(labels)]
    for enc in encoders:
        cells, dcells = [], []
        for label in labels:
            s = next((s for s in summary if s["label"] == label and s["encoder"] == enc), None)
            if s is None:
                cells.append("—")
                dcells.append("—")
                continue
            m = s["metric"]
            cells.append(f"{_fmt(s['estimate'], m)} [{_fmt(s['ci_low'], m)}, {_fmt(s['ci_high'], m)}]")
            if enc == results.get("reference"):
                dcells.append("reference")
            elif s.get("delta") is None:
                dcells.append("—")
            else:
                p = s.get("p_holm")
                p_txt = "—" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")
                dcells.append(f"{s['delta']:+.3f} [{_fmt(s['delta_ci_low'], '')}, {_fmt(s['delta_ci_high'], '')}], "
                              f"{p_txt}")
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
        delta_lines.append(f"| {enc} | " + " | ".join(dcells) + " |")
    cohort = results.get("cohort", {})
    n = cohort.get("n_subjects") if isinstance(cohort, dict) else None
    foot = f"\n{n} subjects. " if n else "\n"
    foot += "Estimates with subject-level bootstrap 95% CIs, from `results.json` of the run.\n"
    return "\n".join(lines) + "\n\n" + "\n".join(delta_lines) + "\n" + foot


def _grid(rows: list[dict], corner: str, columns: list[str], headers: list[str]) -> list[str]:
    """Markdown lines: one row per set (``encoder``), one column per ``label``, estimate [95% CI]."""
    lines = [f"| {corner} | " + " | ".join(headers) + " |", "| --- |" + " --- |" * len(columns)]
    for name in dict.fromkeys(r["encoder"] for r in rows):
        cells = [next((f"{_fmt(r['estimate'], '')} [{_fmt(r['ci_low'], '')}, {_fmt(r['ci_high'], '')}]" for r in rows
                       if r["encoder"] == name and r["label"] == col), "—") for col in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def probe_tables(results: dict) -> str:
    """Markdown for the dense probes of a run (empty when it ran neither): segmentation Dice per
    structure (primary variant), anomaly measures per set (primary variant), and each encoder's
    paired gains over its random-init twin and the intensity control."""
    rows, paired = results.get("rows", []), results.get("paired", [])
    out = []
    seg_all = [r for r in rows if r["task"] == "segmentation"]
    if seg_all:
        primary = results.get("tasks", {}).get("segmentation", {}).get("primary_variant", "")
        for metric, corner in (("dice", "Dice, mean over subjects [95% CI]"),
                               ("hd95_mm", "HD95 mm, median over subjects [95% CI]")):
            chosen = [r for r in seg_all if r["metric"] == metric]
            # a row's variant reads 'multilayer (strides 2/4/8/16 at 128 px)': grouped by the name before
            # the set's own details; the primary variant first, then the others (DINOv2's `linear`)
            base = {id(r): str(r["variant"]).split(" (")[0] for r in chosen}
            variants = list(dict.fromkeys(base.values()))
            for variant in sorted(variants, key=lambda v: v != primary):
                part = [r for r in chosen if base[id(r)] == variant]
                structures = list(dict.fromkeys(r["label"] for r in part))
                out += _grid(part, f"segmentation {variant} ({corner})", structures, structures)
    ano = [r for r in rows if r["task"] == "anomaly"]
    if ano:
        primary = results.get("tasks", {}).get("anomaly", {}).get("primary_variant")
        ano = [r for r in ano if primary is None or r["variant"] == primary]
        metric = {r["label"]: r["metric"] for r in ano}
        levels = list(metric)
        out += _grid(ano, f"anomaly ({primary or ''})", levels, [f"{lv} ({metric[lv]})" for lv in levels])
        out += sweep_table(results.get("tasks", {}).get("anomaly", {}), primary)
    gains = [p for p in paired if p["task"] in ("segmentation", "anomaly") and p["metric"] in ("dice", "auroc")]
    if gains:
        out += ["| paired difference (same subjects) | measure | delta [95% CI] | p (Holm) |", "| --- | --- | --- | --- |"]
        for p in gains:
            ph = p.get("p_holm")
            p_txt = "—" if ph is None or ph != ph else (f"{ph:.3f}" if ph >= 0.001 else "<0.001")
            out.append(f"| {p['encoder']} − {p['reference']} | {p['task']} {p['label']} {p['metric']} | "
                       f"{p['delta']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | {p_txt} |")
        out.append("")
    return "\n".join(out)


def sweep_table(anomaly: dict, primary: str | None) -> list[str]:
    """Markdown lines of the anomaly difficulty sweep: one row per (set, contrast), one column per
    radius, ``pixel AUROC / fraction detected`` (empty when the run had no sweep)."""
    sweep, spec = anomaly.get("sweep") or {}, (anomaly.get("lesions") or {}).get("sweep") or {}
    contrasts, radii = spec.get("contrasts") or [], spec.get("radii_mm") or []
    if not sweep or not contrasts or not radii:
        return []
    lines = ["| sweep (pixel AUROC / detected) | " + " | ".join(f"radius {r:g} mm" for r in radii) + " |",
             "| --- |" + " --- |" * len(radii)]
    for name, per_variant in sweep.items():
        per = per_variant.get(primary) if primary in per_variant else next(iter(per_variant.values()), {})
        for c in contrasts:
            cells = []
            for r in radii:
                cell = per.get(f"c{c:.2f}-r{r:g}mm", {})
                cells.append(f"{cell.get('pixel_auroc', float('nan')):.2f} / {cell.get('detection_rate', float('nan')):.2f}")
            lines.append(f"| {name}, \\|c\\| {c:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a bench --out folder (holds results.json)")
    parser.add_argument("--labels", nargs="*", default=None, help="labels to show, in order (default: all)")
    parser.add_argument("--probes", action="store_true", help="also the dense probe tables (segmentation, anomaly)")
    args = parser.parse_args(argv)
    path = Path(args.run) / "results.json"
    if not path.is_file():
        print(f"readme_tables: {path}: no results.json (run slice2vol bench --out {args.run} first)", file=sys.stderr)
        return 2
    results = json.loads(path.read_text())
    print(tables(results, args.labels))
    if args.probes:
        print(probe_tables(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
