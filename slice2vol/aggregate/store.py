"""Running an aggregator on a feature store: bags in, volume embeddings (+ attention) out.

Trainable aggregators are fitted on the *training* subjects only (``train_ids``); every subject is
then embedded with the fitted aggregator. The written provenance names the method, its parameters,
the planes, the label, and the sorted training ids with their hash, so a reader of the embeddings
can check which subjects the aggregator saw.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from slice2vol.aggregate.base import (
    PLANE_ORDER,
    Aggregator,
    BagError,
    PlaneBag,
    build_aggregator,
    check_bags,
    slice_coordinates,
)

log = logging.getLogger(__name__)

TASK_OF_LABEL_TYPE = {"categorical": "classification", "continuous": "regression"}


def open_store(store: Any, mode: str = "r"):
    """A FeatureStore for a path; objects with the store API are passed through (tests, callers)."""
    if isinstance(store, (str, Path)):
        from slice2vol.cache import FeatureStore, checked_store_path

        target = checked_store_path(store)  # a symbolic link: its target's parts count
        if not target.exists() and not target.with_name(target.name + ".parts").exists():
            raise FileNotFoundError(f"{store}: feature store not found")  # not "holds no completed subject"
        return FeatureStore(store, mode=mode)
    return store


def _first_damage(damaged: Sequence[str] | None, store: Any) -> str:
    """The first damage message, without the store's path and the advice the caller gives once."""
    if not damaged:
        return "?"
    return damaged[0].removeprefix(f"{getattr(store, 'path', '')}: ").split("; run `slice2vol cache verify")[0]


def load_bags(store: Any, subjects: Sequence[str] | None = None, planes: Sequence[str] | None = None,
              *, tokens: bool = False, damaged: list[str] | None = None
              ) -> tuple[list[str], list[dict[str, PlaneBag]]]:
    """Reads subjects' slice features (and positions, indices, optionally tokens) from a store.

    Args:
        store: a FeatureStore or a path to one.
        subjects: subject ids (default: every completed subject).
        planes: planes to read (default: all cached planes).
        tokens: also read patch tokens when cached (silently absent otherwise).
        damaged: given, a subject whose rows fail their checksum is left out and the error's message
            appended here (otherwise :class:`~slice2vol.cache.StoreCorrupt` is raised).

    Returns:
        (subject ids, bags) in the same order.
    """
    store = open_store(store)
    ids = list(store.subjects()) if subjects is None else list(subjects)
    planes = list(store.planes) if planes is None else list(planes)
    if damaged is not None:
        from slice2vol.cache import StoreCorrupt

        kept, bags = [], []
        for sid in ids:
            try:
                bags += load_bags(store, [sid], planes, tokens=tokens)[1]
                kept.append(sid)
            except StoreCorrupt as err:
                damaged.append(str(err))
        return kept, bags
    bags = []
    for sid in ids:
        bag = {}
        for plane in planes:
            meta = store.slice_meta(sid, plane)
            tok = grid = None
            if tokens:
                try:
                    tok, grid = store.slice_tokens(sid, plane)
                except (KeyError, LookupError, ValueError, RuntimeError):
                    tok = grid = None
            bag[plane] = PlaneBag(np.asarray(store.slice_features(sid, plane), np.float32),
                                  positions=meta.get("positions"), indices=meta.get("indices"),
                                  tokens=tok, token_grid=grid)
        bags.append(bag)
    return ids, bags


def slice_features_vary(store: Any, ids: Sequence[str], planes: Sequence[str] | None = None) -> bool:
    """Whether the cached slice features of ``ids`` (in ``planes``) differ between any two subjects.

    Reads subject by subject and stops at the first difference (usually the second subject).
    """
    store = open_store(store)
    planes = list(store.planes) if planes is None else list(planes)
    first = None
    for sid in ids:
        feats = [np.asarray(store.slice_features(sid, plane)) for plane in planes]
        if first is None:
            first = feats
        elif any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(first, feats)):
            return True
    return False


def collapsed(X: np.ndarray) -> bool:
    """Whether every row of (N, D) ``X`` is the same vector to float32 precision: no entry differs from
    the first row's by more than 1e-6 of the largest magnitude (mil on random-init features differed
    by 5e-7 of it, which an exact comparison let through)."""
    X = np.asarray(X, dtype=np.float64)
    return float(np.abs(X - X[0]).max()) <= 1e-6 * float(np.abs(X).max())


def check_not_collapsed(method: str, params: dict, store: Any, ids: Sequence[str], planes: Sequence[str],
                        X: np.ndarray) -> None:
    """Refuses a set in which every subject has the same embedding although their slice features differ.

    Raises:
        ValueError: naming the aggregator and its parameters (the aggregator collapsed the subjects).
    """
    if len(X) < 2 or not collapsed(X) or not slice_features_vary(store, ids, planes):
        return
    raise ValueError(
        f"aggregator {method!r} with params {params} gave all {len(X)} subjects the same volume embedding "
        f"(max |x| = {float(np.abs(X).max()):.3g}) although their cached slice features differ: it collapsed them, "
        "so nothing was written; check its parameters against the scale of the features")


def _source_sha256(store: Any, ids: Iterable[str], planes: Sequence[str]) -> str | None:
    digest = getattr(store, "slice_source_sha256", None)
    if digest is None:
        return None
    try:
        return digest(ids, planes)
    except (KeyError, LookupError):
        return None


def ids_sha256(ids: Iterable[str]) -> str:
    """Order-independent hash of a set of subject ids."""
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()


def default_name(agg: Aggregator, method: str, label: str | None, planes: Sequence[str] | None,
                 all_planes: Sequence[str]) -> str:
    """``mean``, ``fusion-mean``, ``fusion-mil-attn``, ``mil-sex``, ``mil-ssl``, ``mean-axial``..."""
    parts = [method]
    if method == "fusion":
        parts.append(agg.base)
        if agg.mode == "attention":
            parts.append("attn")
    if agg.requires_fit:
        parts.append(label if label else "ssl")
    if planes is not None and set(planes) != set(all_planes):
        parts.append("+".join(p for p in PLANE_ORDER if p in set(planes)))
    return "-".join(parts)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def save_attention(path: Path, ids: Sequence[str], attention: Sequence[dict[str, np.ndarray]],
                   bags: Sequence[dict[str, PlaneBag]], planes: Sequence[str]) -> Path:
    """Writes attention as flat arrays (no pickles): per plane ``weights_<plane>`` (sum S,),
    ``offsets_<plane>`` (N + 1,), ``indices_<plane>``, ``coords_<plane>`` (mm, centred), and
    ``plane_weights`` (N, P) when the aggregator attends across planes."""
    arrays: dict[str, np.ndarray] = {"subjects": np.asarray(ids, dtype=str), "planes": np.asarray(planes, dtype=str)}
    for plane in planes:
        if plane not in attention[0]:
            continue
        w = [a[plane] for a in attention]
        arrays[f"weights_{plane}"] = np.concatenate(w).astype(np.float32)
        arrays[f"offsets_{plane}"] = np.concatenate([[0], np.cumsum([len(x) for x in w])]).astype(np.int64)
        arrays[f"coords_{plane}"] = np.concatenate([slice_coordinates(b[plane], plane) for b in bags])
        arrays[f"indices_{plane}"] = np.concatenate(
            [b[plane].indices if b[plane].indices is not None else np.arange(len(b[plane])) for b in bags])
    if "planes" in attention[0]:
        arrays["plane_weights"] = np.stack([a["planes"] for a in attention]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_attention(path: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Inverse of :func:`save_attention`: subject -> plane -> {weights, indices, coords}."""
    with np.load(path) as data:
        ids = data["subjects"].tolist()
        out: dict = {sid: {} for sid in ids}
        for plane in data["planes"].tolist():
            if f"weights_{plane}" not in data:
                continue
            off = data[f"offsets_{plane}"]
            for i, sid in enumerate(ids):
                sl = slice(off[i], off[i + 1])
                out[sid][plane] = {k: data[f"{k}_{plane}"][sl] for k in ("weights", "indices", "coords")}
        if "plane_weights" in data:
            for i, sid in enumerate(ids):
                out[sid]["planes"] = {"weights": data["plane_weights"][i]}
    return out


def aggregate_store(store_path: Any, method: str, **kwargs: Any) -> str:
    """Aggregates every subject of a feature store and writes the volume embeddings back.

    The arguments are those of :func:`aggregate_embeddings`, which computes the set; this writes it
    into the store (``FeatureStore.write_volume_embeddings``) and returns its name.
    """
    name, ids, X, provenance = aggregate_embeddings(store_path, method, **kwargs)
    store = open_store(store_path, mode="a")
    if name in store.volume_embedding_names():  # replacing another method's set is most likely a slip
        try:
            before = store.volume_embeddings(name, check_fresh=False)[2].get("aggregator")
        except Exception:  # noqa: BLE001 - a damaged set is replaced anyway
            before = None
        if before and before != method:
            log.warning("%s: replacing the volume embeddings %r, made by %s, with %s", getattr(store, "path", ""),
                        name, before, method)
    store.write_volume_embeddings(name, ids, X, provenance)
    log.info("wrote volume embeddings %r: %d subjects x %d", name, X.shape[0], X.shape[1])
    return name


def aggregate_embeddings(
    store_path: Any,
    method: str,
    *,
    planes: Sequence[str] | None = None,
    name: str | None = None,
    train_ids: Sequence[str] | str | None = None,
    label: str | None = None,
    out_dir: str | Path | None = None,
    plot: bool = True,
    chunk: int = 64,
    damaged: list[str] | None = None,
    train_ids_name: str | None = None,
    **params,
) -> tuple[str, list[str], np.ndarray, dict]:
    """Aggregates every subject of a feature store (read only; :func:`aggregate_store` also writes).

    Args:
        store_path: the FeatureStore path (or an open store).
        method: registered aggregator name (``mean``, ``mil``, ``fusion``, ...).
        planes: planes to aggregate (default: all cached planes).
        name: name of the written embedding set (default from method/label/planes).
        train_ids: subjects a trainable aggregator is fitted on: the training split, never the
            evaluation subjects; ``"all"`` fits on every subject (only for label-free use you
            will not evaluate on the same subjects). Ignored by parameter-free aggregators.
        label: label column for supervised fitting (none: label-free objective).
        out_dir: where attention arrays and plots go (default ``<store>_aggregate/<name>/``
            beside the store).
        plot: write attention PNGs.
        chunk: subjects read at a time when embedding.
        damaged: given, subjects whose cached rows fail their checksum are left out of fitting and of
            the written set, each with its message appended here (``slice2vol cache verify`` lists
            them; recaching repairs them); otherwise the first one raises StoreCorrupt.
        train_ids_name: where ``train_ids`` came from (e.g. the ids file), named in errors.
        **params: the aggregator's constructor parameters.

    Returns:
        (name of the set, subject ids (N,), embeddings (N, D) float32, provenance).

    Raises:
        ValueError: a trainable method without ``train_ids``, unknown subjects/label/planes.
    """
    store = open_store(store_path, mode="r")
    all_planes = list(store.planes)
    if planes is not None:
        planes = [planes] if isinstance(planes, str) else list(planes)
        unknown = [p for p in planes if p not in all_planes]
        if unknown:
            raise ValueError(f"{getattr(store, 'path', store_path)}: plane(s) {unknown} are not cached in this store "
                             f"(cached: {all_planes})")
    use_planes = planes or all_planes
    agg = build_aggregator(method, planes=planes, **params)
    ids = list(store.subjects())
    if not ids:
        where = getattr(store, "path", store_path)
        sets = store.volume_embedding_names() if hasattr(store, "volume_embedding_names") else []
        raise ValueError(f"{where}: the store holds no cached slice features" + (
            f" (only volume embeddings {sets}, from slice2vol embed: nothing to aggregate)" if sets else ""))
    wants_tokens = bool(getattr(agg, "wants_tokens", False))

    fit_ids: list[str] = []
    task = None
    if agg.requires_fit:
        if train_ids is None:
            raise ValueError(
                f"aggregator {method!r} is trainable: pass train_ids (the training subjects, the only "
                "ones it will be fitted on), or train_ids='all' to knowingly fit on every subject")
        fit_ids = ids if isinstance(train_ids, str) and train_ids == "all" else [str(s) for s in train_ids]
        missing = sorted(set(fit_ids) - set(ids))
        if missing:
            raise ValueError(f"{len(missing)} train id(s) not in the store, e.g. {missing[:5]}")
        y = None
        if label is not None:
            labels = store.labels()
            if label not in labels.columns:
                raise ValueError(f"label {label!r} not in the store's labels {list(labels.columns)}")
            values = labels.reindex(fit_ids)[label]
            keep = values.notna().to_numpy()
            if not keep.all():
                log.warning("%d training subject(s) lack %r and are not used for fitting", int((~keep).sum()), label)
            fit_ids = [s for s, k in zip(fit_ids, keep) if k]
            y = values.to_numpy()[keep]
            ltype = getattr(store, "label_types", {}).get(label)
            if "task" in agg.get_params() and agg.task == "auto" and ltype in TASK_OF_LABEL_TYPE:
                agg.set_params(task=TASK_OF_LABEL_TYPE[ltype])
        kept, train_bags = load_bags(store, fit_ids, use_planes, tokens=wants_tokens, damaged=damaged)
        if fit_ids and not kept:
            raise ValueError(f"{getattr(store, 'path', store_path)}: every training subject's cached features are "
                             f"damaged (e.g. {_first_damage(damaged, store)}); nothing to fit (slice2vol cache verify "
                             "lists them)")
        if len(kept) < len(fit_ids):
            keep = set(kept)
            y = None if y is None else y[[i for i, s in enumerate(fit_ids) if s in keep]]
            fit_ids = kept
        if y is not None:
            _check_training_classes(agg, label, y, train_ids_name)
        agg.fit(train_bags, y)
        del train_bags
        task = getattr(agg, "task_", None)
    else:
        if train_ids is not None or label is not None:
            log.info("%s is parameter-free: train_ids/label are not used", method)

    if name is not None and (not str(name).strip() or str(name) != str(name).strip()):
        raise ValueError(f"the name of the embedding set must be non-empty without surrounding spaces, got {name!r}")
    name = name or default_name(agg, method, label, planes, all_planes)
    out_dir = Path(out_dir) if out_dir is not None else _default_out_dir(store, store_path, name)
    rows, attention, coords, att_bags = [], [], [], []
    done: list[str] = []
    reported = set(damaged or [])
    for start in range(0, len(ids), chunk):
        chunk_ids, bags = load_bags(store, ids[start:start + chunk], use_planes, tokens=wants_tokens,
                                    damaged=damaged)
        done += chunk_ids
        if not chunk_ids:  # every subject of this chunk damaged: reported below
            continue
        try:
            rows.append(agg.transform(bags))
        except BagError as err:
            for sid, bag in zip(chunk_ids, bags):  # name the subject, not its index in the chunk
                try:
                    check_bags([bag], use_planes)
                except BagError as one:
                    raise BagError(f"subject {sid}{str(one).removeprefix('bag 0')}") from None
            raise err
        if agg.has_attention:
            attention.extend(agg.attention(bags))
            coords.extend({p: slice_coordinates(b[p], p) for p in b} for b in bags)
            att_bags.extend({p: PlaneBag(b[p].features[:, :0], b[p].positions, b[p].indices) for p in b}
                            for b in bags)  # keep geometry, drop features
    if damaged is not None:
        for message in dict.fromkeys(m for m in damaged if m not in reported):
            log.warning("left out: %s", message)
        damaged[:] = list(dict.fromkeys(damaged))  # a training subject is read twice: reported once
        ids = done
    if not ids:
        raise ValueError(f"{getattr(store, 'path', store_path)}: every subject's cached features are damaged "
                         f"(e.g. {_first_damage(damaged, store)}); nothing to aggregate (slice2vol cache verify "
                         "lists them)")
    X = np.concatenate(rows).astype(np.float32)
    if not np.isfinite(X).all():
        bad = [ids[i] for i in np.where(~np.isfinite(X).all(1))[0][:5]]
        raise ValueError(f"non-finite volume embeddings for e.g. {bad}; check the cached features")
    check_not_collapsed(method, _json_safe(agg.get_params()), store, ids, use_planes, X)

    fitted_planes = list(getattr(agg, "planes_", None) or use_planes)
    provenance = {
        "kind": "aggregate",
        "aggregator": method,
        "params": _json_safe(agg.get_params()),
        "planes": fitted_planes,
        "label": label,
        "task": task,
        "objective": getattr(agg, "objective_", None) if agg.requires_fit else None,
        "trainable": bool(agg.requires_fit),
        "n_train": len(fit_ids),
        "train_ids": sorted(fit_ids),
        "train_ids_sha256": ids_sha256(fit_ids) if fit_ids else None,
        "out_dim": int(X.shape[1]),
        "source_feature_set": getattr(store, "feature_set", None),
        # the rows it was made from: a later recompute of any subject makes the set stale (FeatureStore)
        "source_planes": list(use_planes),
        "source_slices_sha256": _source_sha256(store, set(ids) | set(fit_ids), use_planes),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    from slice2vol import __version__

    provenance["slice2vol"] = __version__
    if attention:
        # the plots of an earlier run of this set would sit beside this run's weights as if made from them
        for old in out_dir.glob("attention*.png") if out_dir.is_dir() else ():
            old.unlink()
        att_path = save_attention(out_dir / "attention.npz", ids, attention, att_bags, fitted_planes)
        provenance["attention_file"] = str(att_path)
        if plot:
            labels = None
            if label is not None and task == "classification":
                labels = store.labels().reindex(ids)[label].astype(str).tolist()
            pngs = _plot_attention(attention, coords, out_dir, labels, f"{name}:", fitted_planes)
            provenance["attention_plots"] = [str(p) for p in pngs]
        (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return name, ids, X, provenance


def _check_training_classes(agg: Aggregator, label: str, y: np.ndarray, train_ids_name: str | None) -> None:
    """Refuses a supervised classification fit whose training subjects hold fewer than 2 classes."""
    from slice2vol.aggregate.trainer import resolve_task

    where = f"the training subjects listed in {train_ids_name}" if train_ids_name else "the training subjects"
    if len(y) == 0:
        raise ValueError(f"label {label!r}: none of {where} has a value; nothing to fit on")
    task = getattr(agg, "task", "auto")
    if getattr(agg, "objective", "auto") == "contrastive" or task not in ("auto", "classification", "regression"):
        return
    if resolve_task(np.asarray(y), task) != "classification":
        return
    classes = np.unique(np.asarray(y).astype(str))
    if len(classes) < 2:
        raise ValueError(f"label {label!r} has one class only ({classes[0]}) among {where} ({len(y)} with a value): "
                         "a supervised aggregator needs >= 2 classes to fit on; list subjects of every class")


def _plot_attention(attention, coords, out_dir, labels, title, plane_names) -> list[Path]:
    from slice2vol.aggregate.plots import plot_attention

    return plot_attention(attention, coords, out_dir, labels=labels, title=title, plane_names=plane_names)


def _default_out_dir(store: Any, store_path: Any, name: str) -> Path:
    # the open store's path first: a store given through a symbolic link is its target, and its
    # attention folder sits beside the target like its parts folder and lock
    path = getattr(store, "path", None) or (store_path if isinstance(store_path, (str, Path)) else None)
    if path is None:
        return Path("aggregate") / name
    path = Path(path)
    return path.parent / f"{path.stem}_aggregate" / name
