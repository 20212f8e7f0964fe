"""Stage 1 of a benchmark: the cohort, its labels, and the shared subject-level splits per label."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from slice2vol.eval.experiment import ExperimentConfig, IntegrationError, expand
from slice2vol.eval.splits import (DegenerateGroupsError, SubjectSplits, definition_hash, load_or_make_splits,
                                   split_definition)

log = logging.getLogger(__name__)


def safe_name(name: str) -> str:
    """A file-name-safe version of a set or label name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def resolve_cohort(cfg: ExperimentConfig, base: Path, out: Path, source: str | Path | None = None):
    """Loads the manifest (or builds the synthetic cohort once) -> (Cohort, manifest path).

    ``source`` (the config file) starts the message of a config that names no cohort."""
    from slice2vol.data.manifest import load_manifest

    if cfg.cohort.manifest:
        manifest = Path(expand(cfg.cohort.manifest, base))
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest}: manifest not found (cohort.manifest={cfg.cohort.manifest!r}; "
                                    "set the environment variable it names or override cohort.manifest=PATH)")
    elif cfg.cohort.synthetic is not None:
        try:
            from slice2vol.data.synthetic import make_cohort
        except ImportError as err:
            raise IntegrationError(f"synthetic cohort unavailable: {err}") from None
        params = dict(cfg.cohort.synthetic)
        target = out / "cohort"
        manifest = target / "manifest.csv"
        stamp = target / "params.json"
        if not (manifest.exists() and stamp.exists() and json.loads(stamp.read_text()) == params):
            log.info("building the synthetic cohort in %s (%s)", target, params)
            manifest = Path(make_cohort(target, **params))
            stamp.write_text(json.dumps(params))
    else:
        # an empty config file was refused without naming the file
        raise ValueError(f"{source or 'the experiment config'}: no cohort: set cohort.manifest (a CSV, "
                         "e.g. cohort.manifest=cohort.csv) or cohort.synthetic (e.g. cohort.synthetic={n_subjects: 24})")
    cohort = load_manifest(manifest, label_types=dict(cfg.cohort.label_types) or None)
    if cfg.cohort.max_subjects:
        cohort = cohort.subset(cohort.ids[: cfg.cohort.max_subjects])
    if cohort.failures:
        log.warning("%s", cohort.failure_report())
    return cohort, manifest


def labels_of(cohort, cfg: ExperimentConfig):
    """(labels DataFrame indexed by subject ID, label -> categorical/continuous) of the evaluated labels."""
    labels = cohort.labels()
    types = dict(cohort.label_types)
    wanted = cfg.cohort.labels or [c for c in types]
    missing = [c for c in wanted if c not in labels.columns]
    if missing:
        where = getattr(cohort, "source", "") or "the manifest"
        raise ValueError(f"{where}: label(s) {missing} not in the manifest (columns: {list(labels.columns)})")
    return labels, {c: types[c] for c in wanted}


@dataclass
class LabelSplits:
    """The evaluation frame of one label, shared by every set and every probe task.

    Attributes:
        label, kind: the label column and ``categorical`` / ``continuous``.
        ids: (N,) subjects, in the order of ``splits.subject_ids``.
        y: (N,) targets (str for categorical, float64 for continuous).
        classes: sorted classes (categorical) or None.
        splits: the saved subject-level folds.
        path: the split file.
    """

    label: str
    kind: str
    ids: list[str]
    y: np.ndarray
    classes: np.ndarray | None
    splits: SubjectSplits
    path: Path


def _isnan(v) -> bool:
    return isinstance(v, float) and np.isnan(v)


def _without_rare_classes(label: str, ids: list[str], y: np.ndarray, n_folds: int) -> tuple[list[str], str]:
    """``ids`` without the subjects of classes smaller than ``n_folds``, and those classes as text
    (``'U' (1), '?' (1)``; empty when none). A class of one subject ('U' among M/F, free text, a date)
    cannot be in every test fold: it turned binary sex into a 3-class AUC, and a free-text column
    into a 16-class label scored at AUC 0.5 [0.5, 0.5]."""
    values, counts = np.unique(y, return_counts=True)
    rare = {str(v): int(c) for v, c in zip(values, counts) if c < n_folds}
    if not rare:
        return ids, ""
    shown = ", ".join(f"{v!r} ({c})" for v, c in list(rare.items())[:5]) + (" ..." if len(rare) > 5 else "")
    log.warning("label %s: class(es) %s have fewer than splits.n_folds = %d subjects; those subjects are left out "
                "of this label", label, shown, n_folds)
    return [i for i, v in zip(ids, y) if v not in rare], shown


def _warn_case_variants(label: str, classes: np.ndarray) -> None:
    """Warns about classes that differ only in case or spaces (``M`` and ``m``): almost always one class
    typed two ways, which the probes would score as two."""
    seen: dict[str, list[str]] = {}
    for c in classes:
        seen.setdefault(str(c).strip().casefold(), []).append(str(c))
    twins = [v for v in seen.values() if len(v) > 1]
    if twins:
        log.warning("label %s: classes %s differ only in case or spaces and are scored as different classes; "
                    "clean the manifest column", label, "; ".join(" / ".join(map(repr, v)) for v in twins))


def make_label_splits(labels, label_types: Mapping[str, str], subject_sets: list[set[str]],
                      cfg: ExperimentConfig, split_dir: Path, skipped: list[dict] | None = None
                      ) -> dict[str, LabelSplits]:
    """Subjects with a value and a row in every set -> saved (or reused) folds, per label.

    Labels with too few subjects or a single class are skipped with a warning and, when ``skipped`` is
    given, an entry ``{name, reason, substitute}`` for the report.
    """
    out: dict[str, LabelSplits] = {}
    if cfg.splits.group and cfg.splits.group not in labels.columns:
        raise ValueError(f"splits.group={cfg.splits.group!r} is not a column of the manifest (columns: "
                         f"{', '.join(map(str, labels.columns))})")
    everywhere = [s for s in labels.index.astype(str) if all(s in ids for ids in subject_sets)]
    n_labelled = {label: int(labels[label].notna().sum()) for label in label_types}

    def skip(label: str, reason: str) -> None:
        log.warning("label %s: %s; skipped", label, reason)
        if skipped is not None:
            skipped.append({"name": f"label {label}", "reason": reason, "substitute": None})

    n_folds = cfg.splits.n_folds
    for label, kind in label_types.items():
        if label == cfg.splits.group:
            # grouped folds never test a group seen in training: the label cannot be predicted by design
            skip(label, "it is the splits.group column: every test fold holds groups that no training fold has")
            continue
        column = labels[label]
        common = [s for s in everywhere if column.get(s) is not None and not _isnan(column.get(s))]
        # where the subjects went: a set covering part of the cohort restricts every label to its subjects
        where = (f"{len(common)} subjects have a value and an embedding in every set ({n_labelled[label]} have "
                 f"a value, {len(everywhere)} are in every set)")
        if cfg.splits.group:
            group = labels[cfg.splits.group]
            ungrouped = [s for s in common if group.get(s) is None or _isnan(group.get(s))
                         or str(group.get(s)).strip() == ""]
            if ungrouped:
                # astype(str) made every empty cell the one group "nan": unrelated subjects kept together
                log.warning("label %s: %d subject(s) have no %s value (e.g. %s) and are left out of it (grouped folds)",
                            label, len(ungrouped), cfg.splits.group, ", ".join(ungrouped[:3]))
                common = [s for s in common if s not in set(ungrouped)]
                where += f", {len(ungrouped)} without a {cfg.splits.group} value left out"
        if len(common) < 2 * n_folds:
            skip(label, f"{where}: fewer than 2 x splits.n_folds = {2 * n_folds}")
            continue
        y = column.reindex(common).to_numpy()
        y = y.astype(np.float64) if kind == "continuous" else y.astype(str)
        if kind == "continuous" and np.ptp(y) == 0:
            # every error would be 0 for every encoder and for chance: an MAE of 0 [0, 0] says nothing
            skip(label, f"constant ({y[0]:g} for all {where})")
            continue
        if kind == "categorical":
            common, rare = _without_rare_classes(label, common, y, n_folds)
            if rare:
                where = f"{len(common)} subjects in classes of at least splits.n_folds = {n_folds} subjects"
                if skipped is not None:
                    skipped.append({"name": f"label {label}: class(es) {rare}", "substitute": None,
                                    "reason": f"fewer than splits.n_folds = {n_folds} subjects each; those subjects "
                                              "are left out of this label (a class no test fold can hold is no class "
                                              "the probes can be scored on: a stray code, a typo, free text)"})
                y = column.reindex(common).to_numpy().astype(str)
            classes = np.unique(y)
            if len(classes) < 2:
                skip(label, f"one class ({classes[0] if len(classes) else 'none'!s}) among the {where}")
                continue
            # (two classes of at least n_folds subjects each hold 2 x n_folds: the size rule above still holds)
            _warn_case_variants(label, classes)
        groups = None
        if cfg.splits.group:
            groups = labels[cfg.splits.group].reindex(common).astype(str).to_numpy()
        # the file name carries the definition: another group/bins/label/values never reuses old folds
        definition = split_definition(common, y, kind, groups, cfg.splits, label)
        path = split_dir / f"{safe_name(label)}-{definition_hash(definition)}.json"
        try:
            splits = load_or_make_splits(path, common, y, kind, groups=groups, cfg=cfg.splits, label=label)
        except DegenerateGroupsError as err:  # a group so large that a training part holds one subject
            skip(label, str(err))
            continue
        ids = splits.subject_ids
        y = column.reindex(ids).to_numpy()
        y = y.astype(np.float64) if kind == "continuous" else y.astype(str)
        out[label] = LabelSplits(label, kind, list(ids), y, np.unique(y) if kind == "categorical" else None,
                                 splits, path)
    return out
