"""Benchmark report v2: one self-contained HTML page, a Markdown twin and machine-readable results.

:func:`write_report` takes the ``results`` dict of a benchmark run (schema ``slice2vol.results/2``,
laid out in CONTRACTS section 3 and checked by :func:`validate_results`) and writes into the output
folder:

* ``report.html``: in this order: title and protocol notes; a box listing skipped or substituted
  entries (and a changed reference, which is never silent); the summary table (encoder x label:
  primary metric with its 95% CI, difference to the reference with its CI and the Holm-adjusted
  p-value); the figures by section, the cohort overview first (PNG embedded as base64 so the file
  can be mailed, each with a link to its SVG twin); the detailed tables (one per task and label,
  estimate, CI and fold sd in separate columns); the paired comparisons; the evaluated sets (kind,
  weights and their sha256, what was fitted where, pretraining overlap); provenance (git commit,
  command line, manifest and its sha256, library versions, timings) and the resolved config;
* ``report.md``: the same tables, figures linked by relative path;
* ``results.json``: exactly ``results``;
* ``results.csv`` (the rows), ``summary.csv`` and ``paired.csv``.

The older keyword call ``write_report(out, title=..., rows=..., paired=..., figures=..., config=...,
provenance=...)`` still works: :func:`results_from_legacy` turns it into a ``results`` dict first.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import hashlib
import html
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

SCHEMA = "slice2vol.results/2"

ROW_COLUMNS = ("task", "label", "encoder", "variant", "metric", "estimate", "estimate_kind", "ci_low", "ci_high",
               "pooled", "pooled_ci_low", "pooled_ci_high", "fold_mean", "fold_sd", "n_subjects", "n_folds",
               "n_repeats")
PAIRED_COLUMNS = ("task", "label", "variant", "metric", "encoder", "reference", "delta", "ci_low", "ci_high",
                  "p_value", "p_holm", "n_subjects")
SUMMARY_COLUMNS = ("encoder", "label", "task", "variant", "metric", "estimate", "ci_low", "ci_high",
                   "estimate_kind", "delta", "delta_ci_low", "delta_ci_high", "p_holm", "lower_is_better")
#: kept for callers of the first report version
RESULT_COLUMNS = ROW_COLUMNS

REQUIRED_KEYS = ("schema", "title", "config", "provenance", "cohort", "reference", "sets", "skipped", "summary",
                 "rows", "paired", "figures")
LOWER_IS_BETTER = frozenset({"mae", "rmse"})
_METRIC_NAMES = {"roc_auc": "ROC AUC", "auroc": "AUROC", "mae": "MAE", "rmse": "RMSE", "r2": "R²",
                 "pearson_r": "Pearson r", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                 "macro_f1": "macro F1", "dice": "Dice"}
_SECTION_ORDER = ("cohort", "probes", "embeddings", "segmentation", "anomaly")


# -- helpers for the producer of ``results`` -----------------------------------------------------
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order (NaN stays NaN).

    With the m finite p-values sorted ascending, p_(i) becomes max_{j<=i} min(1, (m - j + 1) p_(j)).
    """
    finite = [(p, i) for i, p in enumerate(p_values) if _is_num(p)]
    m = len(finite)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str | None:
    """sha256 of a file's bytes, or None when it cannot be read."""
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), ``+dirty`` when the
    work tree has changes; None outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect_provenance(*, command_line: str | None = None, manifest: str | Path | None = None,
                       started: str | None = None, timings_s: Mapping[str, float] | None = None,
                       **extra: Any) -> dict:
    """The ``provenance`` block of ``results``: git commit (or None), command line, manifest and its
    sha256, library versions, start time, timings, plus any ``extra`` keys."""
    from slice2vol import __version__

    try:
        from slice2vol.cache import library_versions

        versions = library_versions()
    except ImportError:  # pragma: no cover - cache is part of the package
        import platform

        versions = {"python": platform.python_version()}
    versions = {"slice2vol": __version__, **versions}
    return {
        "git_commit": git_commit(),
        "command_line": command_line,
        "manifest": str(manifest) if manifest is not None else None,
        "manifest_sha256": sha256_file(manifest) if manifest is not None else None,
        "versions": versions,
        "started": started or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timings_s": dict(timings_s or {}),
        **extra,
    }


def validate_results(results: Mapping) -> None:
    """Raises ValueError naming what is missing or malformed in a ``results`` dict."""
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a mapping, got {type(results).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise ValueError(f"results: missing key(s) {missing} (schema {SCHEMA}, see slice2vol.eval.report)")
    if results["schema"] != SCHEMA:
        raise ValueError(f"results: schema {results['schema']!r} is not {SCHEMA!r}")
    for key, columns in (("rows", ("task", "label", "encoder", "metric", "estimate", "ci_low", "ci_high")),
                         ("summary", ("encoder", "label", "metric", "estimate", "ci_low", "ci_high")),
                         ("paired", ("label", "encoder", "reference", "delta", "ci_low", "ci_high"))):
        for i, row in enumerate(results[key]):
            lacking = [c for c in columns if c not in row]
            if lacking:
                raise ValueError(f"results[{key!r}][{i}]: missing {lacking}")
    for i, fig in enumerate(results["figures"]):
        if "png" not in fig or "caption" not in fig:
            raise ValueError(f"results['figures'][{i}]: needs 'caption' and 'png'")
    for i, entry in enumerate(results["skipped"]):
        if "name" not in entry or "reason" not in entry:
            raise ValueError(f"results['skipped'][{i}]: needs 'name' and 'reason'")


# -- the old keyword call ------------------------------------------------------------------------
def _section_of(path: str | Path) -> str:
    stem = Path(path).stem
    for prefix, section in (("cohort", "cohort"), ("bars", "probes"), ("umap", "embeddings"),
                            ("tsne", "embeddings"), ("segmentation", "segmentation"), ("anomaly", "anomaly")):
        if stem.startswith(prefix):
            return section
    return "other"


def _primary_metric_of(metrics: Iterable[str]) -> str | None:
    metrics = list(metrics)
    for m in ("roc_auc", "mae", "auroc", "dice"):
        if m in metrics:
            return m
    return metrics[0] if metrics else None


def derive_summary(rows: Sequence[Mapping], paired: Sequence[Mapping], reference: str | None) -> list[dict]:
    """One summary row per (encoder, label): the primary metric of the primary task/variant.

    The primary task/variant of a label is the first one the paired comparisons use, preferring the
    linear probe; without paired rows it is the first row of that label with the primary metric.
    """
    out = []
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        sub = [r for r in rows if r["label"] == label]
        candidates = [p for p in paired if p["label"] == label]
        choice = next((p for p in candidates if p.get("task") == "linear"), candidates[0] if candidates else None)
        if choice is not None:
            task, variant, metric = choice.get("task"), choice.get("variant"), choice["metric"]
        else:
            metric = _primary_metric_of(dict.fromkeys(r["metric"] for r in sub))
            first = next(r for r in sub if r["metric"] == metric)
            task, variant = first.get("task"), first.get("variant")
        for r in sub:
            if r.get("task") != task or r.get("variant") != variant or r["metric"] != metric:
                continue
            test = next((p for p in paired if p["label"] == label and p.get("task") == task
                         and p.get("variant") == variant and p["encoder"] == r["encoder"]), None)
            is_ref = r["encoder"] == reference
            out.append({
                "encoder": r["encoder"], "label": label, "task": task, "variant": variant, "metric": metric,
                "estimate": r["estimate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                "estimate_kind": r.get("estimate_kind", "pooled"),
                "delta": 0.0 if is_ref else (test["delta"] if test else None),
                "delta_ci_low": None if is_ref or not test else test["ci_low"],
                "delta_ci_high": None if is_ref or not test else test["ci_high"],
                "p_holm": None if is_ref or not test else test.get("p_holm"),
                "lower_is_better": metric in LOWER_IS_BETTER,
            })
    return out


def results_from_legacy(*, title: str, rows: Sequence[Mapping], paired: Sequence[Mapping],
                        figures: Sequence[tuple[str, str | Path]], config: Mapping, provenance: Mapping,
                        notes: Sequence[str] = (), extra: Mapping | None = None, out_dir: str | Path = ".") -> dict:
    """The ``results`` dict (schema 2) of the first report version's keyword arguments.

    Rows with ``mean``/``sd``/``point`` become rows with ``fold_mean``/``fold_sd``/``estimate``
    (pooled); p-values get a Holm adjustment over all paired comparisons of the run; the summary
    is derived (:func:`derive_summary`); a reference other than the configured one is listed as a
    substitution. The old ``results.json`` keys (``results``, ``paired``, ``figures`` paths) stay
    readable through ``legacy_rows``.
    """
    out = Path(out_dir)
    new_rows = []
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("mean", "sd", "point")}
        point = r.get("estimate", r.get("point"))
        row.update({"estimate": point, "estimate_kind": r.get("estimate_kind", "pooled"), "pooled": point,
                    "pooled_ci_low": r.get("ci_low"), "pooled_ci_high": r.get("ci_high"),
                    "fold_mean": r.get("fold_mean", r.get("mean")), "fold_sd": r.get("fold_sd", r.get("sd"))})
        new_rows.append(row)
    adjusted = holm([p.get("p_value", math.nan) for p in paired])
    new_paired = [{**p, "p_holm": p.get("p_holm", adj)} for p, adj in zip(paired, adjusted)]
    reference = provenance.get("reference") or config.get("reference")
    skipped = []
    wanted = config.get("reference")
    if wanted and reference and wanted != reference:
        skipped.append({"name": wanted, "reason": "the configured reference was not evaluated",
                        "substitute": reference})
    sets = {}
    for name, info in (provenance.get("embedding_sets") or {}).items():
        info = dict(info)
        sets[name] = {"kind": info.pop("kind", None), "n": info.pop("n", None), "dim": info.pop("dim", None),
                      "encoder_key": info.get("encoder_key") or info.get("key"), "weights": info.get("weights"),
                      "weights_sha256": info.get("weights_sha256"), "fitted": None, "pretraining": None}
    manifest = provenance.get("manifest")
    prov = collect_provenance(manifest=manifest if manifest and Path(manifest).is_file() else None,
                              command_line=provenance.get("command_line"),
                              timings_s=provenance.get("timings_s"))
    prov.update({k: v for k, v in provenance.items() if k not in prov or prov[k] in (None, {}, "")})
    if manifest and not prov.get("manifest"):
        prov["manifest"] = str(manifest)
    labels: dict[str, str] = {}
    for r in rows:
        if r.get("task") in ("knn", "linear"):
            if r["metric"] == "roc_auc":
                labels[r["label"]] = "categorical"
            elif r["metric"] == "mae":
                labels.setdefault(r["label"], "continuous")
    figs = []
    for caption, path in figures:
        png = Path(path)
        svg = png.with_suffix(".svg")
        figs.append({"section": _section_of(png), "caption": caption, "png": os.path.relpath(png, out),
                     "svg": os.path.relpath(svg, out) if svg.exists() else None})
    results = {
        "schema": SCHEMA, "title": title, "config": dict(config), "notes": list(notes), "provenance": prov,
        "cohort": {"n_subjects": provenance.get("n_subjects"), "labels": labels,
                   "failures": list(provenance.get("cohort_failures") or [])},
        "reference": reference, "sets": sets, "skipped": skipped,
        "summary": derive_summary(new_rows, new_paired, reference),
        "rows": new_rows, "paired": new_paired, "figures": figs, "tasks": {},
        # the first version's results.json keys, read by older tooling and tests
        "results": [dict(r) for r in rows],
    }
    if extra:
        for key, value in extra.items():
            results["tasks" if key == "tasks" else key] = value
    return results


# -- formatting ----------------------------------------------------------------------------------
def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):  # an HD95 whose structure the prediction missed: not the same as absent
            return "∞" if v > 0 else "−∞"
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_p(p: Any) -> str:
    if not _is_num(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_ci(lo: Any, hi: Any, digits: int = 3) -> str:
    def known(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

    if not (known(lo) and known(hi)):
        return "–"
    return f"[{_fmt(float(lo), digits)}, {_fmt(float(hi), digits)}]"


def _fmt_delta(v: Any, digits: int = 3) -> str:
    return f"{v:+.{digits}f}" if _is_num(v) else "–"


def metric_name(metric: str) -> str:
    return _METRIC_NAMES.get(metric, metric)


def _separated(row: Mapping) -> int:
    """+1 when the difference's CI lies wholly on the better side of 0, -1 on the worse side, else 0."""
    lo, hi = row.get("delta_ci_low", row.get("ci_low")), row.get("delta_ci_high", row.get("ci_high"))
    if not (_is_num(lo) and _is_num(hi)):
        return 0
    sign = -1 if row.get("lower_is_better", row.get("metric") in LOWER_IS_BETTER) else 1
    if lo > 0:
        return sign
    if hi < 0:
        return -sign
    return 0


def _esc(v: Any) -> str:
    return html.escape(str(v))


class _Cell:
    """A table cell with an optional CSS class (numbers are right-aligned)."""

    def __init__(self, text: str, cls: str = "") -> None:
        self.text, self.cls = text, cls

    def __str__(self) -> str:
        return self.text


def _num(text: str, extra: str = "") -> _Cell:
    return _Cell(text, ("num " + extra).strip())


def _html_table(header: Sequence[Any], body: Sequence[Sequence[Any]], *, group_header: Sequence[tuple[str, int]]
                | None = None, cls: str = "") -> str:
    parts = [f"<table class='{cls}'>" if cls else "<table>", "<thead>"]
    if group_header:
        parts.append("<tr>" + "".join(f"<th colspan='{span}' class='group'>{_esc(text)}</th>" if span > 1 else
                                      f"<th class='group'>{_esc(text)}</th>" for text, span in group_header) + "</tr>")
    parts.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for row in body:
        cells = []
        for c in row:
            cls_attr = f" class='{c.cls}'" if isinstance(c, _Cell) and c.cls else ""
            cells.append(f"<td{cls_attr}>{_esc(c)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _md_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in body]
    return "\n".join(lines)


# -- the report's parts --------------------------------------------------------------------------
def _set_order(results: Mapping) -> list[str]:
    names = list(results.get("sets") or {})
    for r in list(results["summary"]) + list(results["rows"]):
        if r["encoder"] not in names:
            names.append(r["encoder"])
    return names


def summary_grid(results: Mapping) -> tuple[list[tuple[str, int]], list[str], list[list[_Cell]], list[str]]:
    """The summary as an encoder x label grid: group header, header, body and footnotes."""
    summary = results["summary"]
    labels = list(dict.fromkeys(s["label"] for s in summary))
    reference = results.get("reference")
    group = [("", 1), ("", 1)]
    header = ["encoder", "kind"]
    notes = []
    for label in labels:
        first = next(s for s in summary if s["label"] == label)
        arrow = " ↓" if first.get("lower_is_better") else " ↑"
        how = " ".join(str(x) for x in (first.get("task"), first.get("variant")) if x)
        group.append((f"{label}: {metric_name(first['metric'])}{arrow}" + (f" ({how})" if how else ""), 5))
        header += [metric_name(first["metric"]), "95% CI", "Δ vs ref", "95% CI of Δ", "p (Holm)"]
        if first.get("estimate_kind") == "fold_mean":
            notes.append(f"{label}: {metric_name(first['metric'])} is the mean over test folds, not the pooled value.")
    kinds = {n: (info or {}).get("kind", "") for n, info in (results.get("sets") or {}).items()}
    body = []
    for name in _set_order(results):
        if not any(s["encoder"] == name for s in summary):
            continue
        row: list[_Cell] = [_Cell(name + (" (reference)" if name == reference else ""), "name"),
                            _Cell(kinds.get(name) or "")]
        for label in labels:
            s = next((s for s in summary if s["encoder"] == name and s["label"] == label), None)
            if s is None:
                row += [_num("–")] * 5
                continue
            row += [_num(_fmt(s["estimate"])), _num(_fmt_ci(s["ci_low"], s["ci_high"]), "ci")]
            if name == reference:
                row += [_num("ref", "muted"), _num("", "ci"), _num("")]
                continue
            sep = _separated(s)
            cls = {1: "better", -1: "worse", 0: ""}[sep]
            row += [_num(_fmt_delta(s.get("delta")), cls), _num(_fmt_ci(s.get("delta_ci_low"), s.get("delta_ci_high")),
                                                                "ci " + cls),
                    _num(_fmt_p(s.get("p_holm")))]
        body.append(row)
    return group, header, body, notes


#: above this many labels the summary is a long table (label, encoder) instead of an encoder x label grid
GRID_MAX_LABELS = 3


def summary_long(results: Mapping) -> tuple[list[str], list[list[_Cell]]]:
    """The summary as one row per (label, encoder), for runs with many labels (a grid would not fit)."""
    reference = results.get("reference")
    kinds = {n: (info or {}).get("kind", "") for n, info in (results.get("sets") or {}).items()}
    order = {name: i for i, name in enumerate(_set_order(results))}
    header = ["label", "metric", "encoder", "kind", "estimate", "95% CI", "Δ vs ref", "95% CI of Δ", "p (Holm)"]
    body = []
    for label in dict.fromkeys(s["label"] for s in results["summary"]):
        rows = sorted((s for s in results["summary"] if s["label"] == label), key=lambda s: order.get(s["encoder"], 0))
        for i, s in enumerate(rows):
            how = " ".join(str(x) for x in (s.get("task"), s.get("variant")) if x)
            metric = metric_name(s["metric"]) + (" ↓" if s.get("lower_is_better") else " ↑") + (f" ({how})" if how else "")
            line = [_Cell(label if i == 0 else "", "name"), _Cell(metric if i == 0 else ""),
                    _Cell(s["encoder"] + (" (reference)" if s["encoder"] == reference else ""), "name"),
                    _Cell(kinds.get(s["encoder"]) or ""), _num(_fmt(s["estimate"])),
                    _num(_fmt_ci(s["ci_low"], s["ci_high"]), "ci")]
            if s["encoder"] == reference:
                line += [_num("ref", "muted"), _num("", "ci"), _num("")]
            else:
                cls = {1: "better", -1: "worse", 0: ""}[_separated(s)]
                line += [_num(_fmt_delta(s.get("delta")), cls),
                         _num(_fmt_ci(s.get("delta_ci_low"), s.get("delta_ci_high")), "ci " + cls),
                         _num(_fmt_p(s.get("p_holm")))]
            body.append(line)
    return header, body


def detail_tables(rows: Sequence[Mapping]) -> list[tuple[str, list[tuple[str, int]], list[str], list[list[_Cell]]]]:
    """One table per (task, label): encoders x variants as rows; per metric its estimate, 95% CI and
    fold sd in three columns."""
    tables = []
    for task, label in dict.fromkeys((r["task"], r["label"]) for r in rows):
        sub = [r for r in rows if r["task"] == task and r["label"] == label]
        metrics = list(dict.fromkeys(r["metric"] for r in sub))
        group = [("", 1), ("", 1)] + [(metric_name(m) + (" ↓" if m in LOWER_IS_BETTER else ""), 3) for m in metrics]
        header = ["encoder", "variant"] + ["estimate", "95% CI", "fold sd"] * len(metrics)
        body = []
        for enc, var in dict.fromkeys((r["encoder"], r.get("variant")) for r in sub):
            line: list[_Cell] = [_Cell(enc, "name"), _Cell(str(var if var is not None else ""))]
            for m in metrics:
                r = next((r for r in sub if r["encoder"] == enc and r.get("variant") == var and r["metric"] == m), None)
                if r is None:
                    line += [_num("–"), _num("–"), _num("–")]
                else:
                    line += [_num(_fmt(r["estimate"])), _num(_fmt_ci(r["ci_low"], r["ci_high"]), "ci"),
                             _num(_fmt(r.get("fold_sd")), "muted")]
            body.append(line)
        n = sub[0].get("n_subjects", "")
        folds = sub[0].get("n_folds")
        reps = sub[0].get("n_repeats")
        design = f", {folds} folds x {reps} repeats" if folds and reps else ""
        tables.append((f"{task} — {label} (n = {n}{design})", group, header, body))
    return tables


def paired_table(paired: Sequence[Mapping]) -> tuple[list[str], list[list[_Cell]]]:
    header = ["task", "label", "variant", "metric", "encoder", "reference", "Δ (encoder − ref)", "95% CI", "p",
              "p (Holm)", "n"]
    body = []
    for p in paired:
        row = {**p, "lower_is_better": p.get("metric") in LOWER_IS_BETTER}
        cls = {1: "better", -1: "worse", 0: ""}[_separated(row)]
        body.append([_Cell(str(p.get("task", ""))), _Cell(str(p["label"])), _Cell(str(p.get("variant", ""))),
                     _Cell(metric_name(str(p.get("metric", "")))), _Cell(str(p["encoder"]), "name"),
                     _Cell(str(p["reference"])), _num(_fmt_delta(p["delta"]), cls),
                     _num(_fmt_ci(p["ci_low"], p["ci_high"]), "ci " + cls), _num(_fmt_p(p.get("p_value"))),
                     _num(_fmt_p(p.get("p_holm"))), _num(str(p.get("n_subjects", "")))])
    return header, body


def _describe_fitted(fitted: Mapping | None) -> str:
    if not fitted:
        return "nothing"
    what = fitted.get("what", "")
    scope = fitted.get("scope")
    labels = fitted.get("labels")
    text = str(what)
    if labels:
        text += f" on {', '.join(map(str, labels))}"
    if scope:
        text += f" ({scope})"
    collapsed = fitted.get("collapsed_folds")
    if collapsed:
        text += (f"; COLLAPSED in {len(collapsed)} fold(s) ({', '.join(map(str, collapsed[:3]))}"
                 f"{', ...' if len(collapsed) > 3 else ''}): every subject the same embedding, scored at chance")
    return text


def _describe_pretraining(pre: Mapping | None) -> str:
    if not pre:
        return "–"
    parts = []
    if pre.get("source"):
        parts.append(str(pre["source"]))
    if pre.get("n_subjects") is not None:
        parts.append(f"{pre['n_subjects']} subjects")
    if pre.get("n_in_test_folds") is not None:
        parts.append(f"{pre['n_in_test_folds']} of them in test folds")
    if pre.get("labels") is not None:
        parts.append("with labels" if pre["labels"] else "no labels")
    return ", ".join(parts) or "–"


def sets_table(results: Mapping) -> tuple[list[str], list[list[_Cell]]]:
    header = ["set", "kind", "n", "dim", "encoder", "weights", "weights sha256", "fitted", "pretraining", "note"]
    body = []
    for name, info in (results.get("sets") or {}).items():
        info = info or {}
        sha = info.get("weights_sha256") or ""
        body.append([_Cell(name, "name"), _Cell(str(info.get("kind") or "")), _num(_fmt(info.get("n"))),
                     _num(_fmt(info.get("dim"))), _Cell(str(info.get("encoder_key") or "")),
                     _Cell(str(info.get("weights") or ""), "path"), _Cell(sha[:12], "mono"),
                     _Cell(_describe_fitted(info.get("fitted"))), _Cell(_describe_pretraining(info.get("pretraining"))),
                     _Cell(str(info.get("note") or ""))])
    return header, body


def notices(results: Mapping) -> list[str]:
    """Sentences for the box of skipped or substituted entries (empty when nothing was left out)."""
    lines = []
    for entry in results.get("skipped") or []:
        text = f"{entry['name']}: skipped — {entry['reason']}"
        if entry.get("substitute"):
            text += f"; replaced by {entry['substitute']}"
        lines.append(text)
    wanted = (results.get("config") or {}).get("reference")
    used = results.get("reference")
    # a producer that lists the substitution itself (name "X" or "reference X") is not repeated
    listed = any(wanted and wanted in str(e.get("name", "")).split() for e in results.get("skipped") or [])
    if wanted and wanted != used and not listed:
        lines.append(f"reference: the config names {wanted}, the comparisons use {used}")
    for failure in (results.get("cohort") or {}).get("failures") or []:
        lines.append(f"cohort: {failure}")
    return lines


def _figures_by_section(figures: Sequence[Mapping]) -> list[tuple[str, list[Mapping]]]:
    sections: dict[str, list[Mapping]] = {}
    for fig in figures:
        sections.setdefault(str(fig.get("section") or "other"), []).append(fig)
    order = [s for s in _SECTION_ORDER if s in sections] + [s for s in sections if s not in _SECTION_ORDER]
    return [(s, sections[s]) for s in order]


_PROVENANCE_MAIN = ("git_commit", "command_line", "manifest", "manifest_sha256", "started")


def provenance_rows(prov: Mapping) -> list[tuple[str, str]]:
    rows = [(key.replace("_", " "), _fmt(prov.get(key)) if prov.get(key) is not None else "none")
            for key in _PROVENANCE_MAIN]
    timings = prov.get("timings_s") or {}
    if timings:
        rows.append(("timings", ", ".join(f"{k} {_fmt(float(v), 1)} s" for k, v in timings.items() if _is_num(v))))
    versions = prov.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows


# -- writing -------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1440px;margin:1.5em auto;padding:0 1em;
color:#1d1d1f;line-height:1.4}
h1{font-size:1.5em;margin-bottom:0.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;
padding-bottom:0.15em}h3{font-size:1em;margin:1.2em 0 0.3em}
table{border-collapse:collapse;margin:0.4em 0 1.2em;font-size:12.5px}
th,td{border:1px solid #d4d4d4;padding:3px 7px;vertical-align:top}
th{background:#f2f2f2;font-weight:600;text-align:center}th.group{background:#e8eef6}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.ci{color:#444}td.muted{color:#888}td.name{font-weight:600;white-space:nowrap}
td.better{background:#e3f4e3}td.worse{background:#fbe5e5}td.mono{font-family:ui-monospace,monospace;font-size:11.5px}
td.path{font-family:ui-monospace,monospace;font-size:11.5px;word-break:break-all;max-width:28em}
.scroll{overflow-x:auto}
.box{border:1px solid #e0b400;background:#fff8db;padding:0.6em 1em;margin:1em 0;border-radius:4px}
.box.ok{border-color:#9cc69c;background:#eff8ef}.box h2{border:none;margin:0 0 0.3em;font-size:1.05em}
.box ul{margin:0.2em 0;padding-left:1.3em}
.note{color:#444;font-size:13px;margin:0.3em 0}.legend{color:#555;font-size:12.5px}
figure{margin:0.8em 0 1.4em;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #e4e4e4}
figcaption{font-size:12.5px;color:#444;max-width:60em}
dl.prov{display:grid;grid-template-columns:max-content auto;gap:0.2em 1em;font-size:13px}
dl.prov dt{font-weight:600}dl.prov dd{margin:0;font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
pre{background:#f6f6f6;padding:0.8em;font-size:12px;overflow-x:auto}
"""

_LEGEND = ("Each estimate comes with its 95% CI (how each is computed: see the notes above). Δ = metric(encoder) "
           "− metric(reference) on the same subjects and splits, with its paired 95% CI; p: paired test, "
           "Holm-adjusted within each table (one task, label, variant and metric). ↑ higher is better, ↓ lower is better. Green: the CI of "
           "Δ lies wholly on the better side of 0; red: wholly on the worse side.")


def _img_tag(out: Path, fig: Mapping) -> str:
    png = out / fig["png"]
    caption = _esc(fig["caption"])
    if not png.exists():
        return f"<p class='note'>missing figure: {_esc(fig['png'])}</p>"
    data = base64.b64encode(png.read_bytes()).decode()
    width = ""
    try:  # show the PNG at its CSS size for 150 dpi (sharp on high-density screens, not blown up)
        from PIL import Image

        with Image.open(png) as im:
            w = im.size[0]
            dpi = (im.info.get("dpi") or (150, 150))[0] or 150
        width = f" width='{round(w * 96 / max(float(dpi), 96))}'"
    except Exception:  # noqa: BLE001 - the size is cosmetic
        width = ""
    svg = fig.get("svg")
    link = f" <a href='{_esc(svg)}'>SVG</a>" if svg and (out / svg).exists() else ""
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{caption}'{width}>"
            f"<figcaption>{caption}{link}</figcaption></figure>")


def _render_html(results: Mapping, out: Path) -> str:
    title = str(results["title"])
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>",
             f"<h1>{_esc(title)}</h1>"]
    cohort = results.get("cohort") or {}
    notes = [str(n) for n in results.get("notes") or []]
    if cohort.get("n_subjects") is not None and not any(n.startswith("Cohort") for n in notes):
        labels = cohort.get("labels") or {}
        parts.append(f"<p class='note'>Cohort: {_esc(cohort['n_subjects'])} subjects; labels "
                     + _esc(", ".join(f"{k} ({v})" for k, v in labels.items()) or "–")
                     + f". Reference for Δ: <b>{_esc(results.get('reference') or 'none')}</b>.</p>")
    box = notices(results)
    # the box below lists skipped entries; a producer's note repeating them is left out
    parts += [f"<p class='note'>{_esc(n)}</p>" for n in notes if not (box and n.startswith("Skipped"))]
    if box:
        parts.append("<div class='box' id='skipped'><h2>Skipped or substituted</h2><ul>"
                     + "".join(f"<li>{_esc(line)}</li>" for line in box) + "</ul></div>")
    else:
        parts.append("<div class='box ok' id='skipped'>Every configured entry was evaluated; nothing was skipped "
                     "or substituted.</div>")
    if results["summary"]:
        group, header, body, foot = summary_grid(results)
        if len(group) - 2 > GRID_MAX_LABELS:
            header, body = summary_long(results)
            group = None
        parts.append("<h2 id='summary'>Summary</h2><div class='scroll'>"
                     + _html_table(header, body, group_header=group, cls="summary") + "</div>")
        parts += [f"<p class='legend'>{_esc(n)}</p>" for n in foot]
        parts.append(f"<p class='legend'>{_esc(_LEGEND)}</p>")
    if results["figures"]:
        parts.append("<h2 id='figures'>Figures</h2>")
        for section, figs in _figures_by_section(results["figures"]):
            parts.append(f"<h3>{_esc(section.capitalize())}</h3>")
            parts += [_img_tag(out, fig) for fig in figs]
    if results["rows"]:
        parts.append("<h2 id='results'>Results by task and label</h2>")
        for t, group, header, body in detail_tables(results["rows"]):
            parts.append(f"<h3>{_esc(t)}</h3><div class='scroll'>" + _html_table(header, body, group_header=group)
                         + "</div>")
    if results["paired"]:
        header, body = paired_table(results["paired"])
        parts.append("<h2 id='paired'>Paired comparisons</h2><div class='scroll'>" + _html_table(header, body)
                     + "</div>")
    if results.get("sets"):
        header, body = sets_table(results)
        parts.append("<h2 id='sets'>Evaluated sets</h2><div class='scroll'>" + _html_table(header, body) + "</div>")
    prov = results.get("provenance") or {}
    parts.append("<h2 id='provenance'>Provenance</h2><dl class='prov'>"
                 + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in provenance_rows(prov)) + "</dl>")
    rest = {k: v for k, v in prov.items() if k not in (*_PROVENANCE_MAIN, "timings_s", "versions")}
    if rest:
        parts.append("<details><summary>more provenance</summary><pre>"
                     + _esc(json.dumps(rest, indent=1, default=_json_default)) + "</pre></details>")
    parts.append("<details><summary>resolved config</summary><pre>"
                 + _esc(_yaml(results.get("config") or {})) + "</pre></details></body></html>")
    return "".join(parts)


def _render_md(results: Mapping, out: Path) -> str:
    md = [f"# {results['title']}", ""]
    md += [f"{n}  " for n in results.get("notes") or []]
    box = notices(results)
    md += ["", "## Skipped or substituted", ""]
    md += [f"- {line}" for line in box] if box else ["Nothing was skipped or substituted."]
    md += ["", "## Summary", "", f"Reference: {results.get('reference') or 'none'}", ""]
    body = [[s["encoder"], s["label"], metric_name(s["metric"]) + (" ↓" if s.get("lower_is_better") else " ↑"),
             _fmt(s["estimate"]), _fmt_ci(s["ci_low"], s["ci_high"]), _fmt_delta(s.get("delta")),
             _fmt_ci(s.get("delta_ci_low"), s.get("delta_ci_high")), _fmt_p(s.get("p_holm"))]
            for s in results["summary"]]
    md += [_md_table(["encoder", "label", "metric", "estimate", "95% CI", "Δ vs ref", "95% CI of Δ", "p (Holm)"],
                     body), "", _LEGEND, "", "## Figures", ""]
    for section, figs in _figures_by_section(results["figures"]):
        md += [f"### {section.capitalize()}", ""]
        for fig in figs:
            md += [f"![{fig['caption']}]({fig['png']})", "", f"*{fig['caption']}*"
                   + (f" ([SVG]({fig['svg']}))" if fig.get("svg") else ""), ""]
    md += ["## Results by task and label", ""]
    for t, group, header, body in detail_tables(results["rows"]):
        flat = header[:2] + [f"{g} {h}" for (g, span) in group[2:] for h in header[2:2 + span]]
        md += [f"### {t}", "", _md_table(flat, body), ""]
    if results["paired"]:
        header, body = paired_table(results["paired"])
        md += ["## Paired comparisons", "", _md_table(header, body), ""]
    if results.get("sets"):
        header, body = sets_table(results)
        md += ["## Evaluated sets", "", _md_table(header, body), ""]
    md += ["## Provenance", ""] + [f"- {k}: `{v}`" for k, v in provenance_rows(results.get("provenance") or {})]
    md += ["", "## Resolved config", "", "```yaml", _yaml(results.get("config") or {}), "```", ""]
    return "\n".join(md)


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(data, default=_json_default)), sort_keys=False, width=110).rstrip()


def write_report(out_dir: str | Path, results: Mapping | None = None, **legacy: Any) -> dict[str, Path]:
    """Writes report.html, report.md, results.json, results.csv, summary.csv and paired.csv.

    Args:
        out_dir: the run folder; figure paths in ``results`` are relative to it.
        results: the results of a run (schema ``slice2vol.results/2``, see the module docstring).
        **legacy: instead of ``results``, the first version's keywords (``title``, ``rows``,
            ``paired``, ``figures`` as (caption, path), ``config``, ``provenance``, ``notes``,
            ``extra``); converted by :func:`results_from_legacy`.

    Returns:
        name -> path of every file written.

    Raises:
        ValueError: ``results`` misses a key or has malformed rows (the message names it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if results is None:
        if not legacy:
            raise TypeError("write_report(out_dir, results): results missing")
        results = results_from_legacy(out_dir=out, **legacy)
    elif legacy:
        raise TypeError(f"write_report: pass results or the old keywords, not both (got {sorted(legacy)})")
    validate_results(results)
    names = ("report.html", "report.md", "results.json", "results.csv", "summary.csv", "paired.csv")
    paths = {name: out / name for name in names}
    # NaN/inf become null: browsers and strict JSON readers refuse them
    paths["results.json"].write_text(json.dumps(_finite_json(results), indent=1, allow_nan=False))
    for name, columns, data in (("results.csv", ROW_COLUMNS, results["rows"]),
                                ("summary.csv", SUMMARY_COLUMNS, results["summary"]),
                                ("paired.csv", PAIRED_COLUMNS, results["paired"])):
        with open(paths[name], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(data)
    paths["report.html"].write_text(_render_html(results, out))
    paths["report.md"].write_text(_render_md(results, out))
    return paths


def _finite_json(obj: Any) -> Any:
    """A JSON-able copy of ``obj``: numpy scalars/arrays as Python values, NaN as None (not measured)
    and +-inf as the strings "inf"/"-inf" (JSON has no infinity; an HD95 of a missed structure is
    infinite, which must not read like a value that is absent)."""
    if isinstance(obj, Mapping):
        return {str(k): _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    if isinstance(obj, float):
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return _finite_json(_json_default(obj))


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
