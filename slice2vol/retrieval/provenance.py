"""Provenance of indexed embeddings: what is recorded, how pipelines are compared.

The index keeps the store's provenance verbatim and, next to it, a normalised ``pipeline`` record
(volume and slice configs, encoder key/kwargs/weights/sha256, feature dtype, aggregator method and
params) — everything needed to embed a new scan exactly like the indexed ones, and to compare two
sources of embeddings. Only :func:`pipeline_from_store` knows the store's provenance schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from slice2vol.retrieval.index import ProvenanceError

# provenance keys that describe when/where a job ran, not what it computed
VOLATILE_KEYS = frozenset({
    "created", "host", "versions", "package_version", "slice2vol", "weights_path", "argv", "history",
    "inference",
})
# keys of a volume-embedding set's provenance that say what was computed (aggregate_store)
EMBEDDING_IDENTITY_KEYS = ("kind", "aggregator", "method", "params", "planes", "label", "task", "objective",
                           "trainable", "train_ids_sha256", "out_dim", "encoder", "weights_sha256",
                           "input_size")


def _first(mapping: Mapping[str, Any] | None, *keys: str, default: Any = None) -> Any:
    """First present key of ``mapping`` (dotted keys descend into nested mappings)."""
    for key in keys:
        node: Any = mapping
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return default


def pipeline_from_store(store_prov: Mapping[str, Any], embedding_prov: Mapping[str, Any],
                        embeddings: str) -> dict[str, Any]:
    """Normalises a store's provenance and an embedding set's into one pipeline record."""
    encoder = _first(store_prov, "encoder_info", "encoder", default={})
    if isinstance(encoder, str):
        encoder = {"key": encoder}
    key = _first(store_prov, "encoder_key", "encoder.key", "encoder_info.key")
    weights = _first(store_prov, "weights", "encoder.weights", "encoder_info.weights", default="random")
    weights_path = _first(store_prov, "weights_path", "encoder.weights_path")
    sha = _first(store_prov, "weights_sha256", "encoder.weights_sha256", "encoder_info.weights_sha256",
                 default="")
    aggregator = {
        "method": _first(embedding_prov, "method", "aggregator.method", "aggregator", default=embeddings),
        "params": dict(_first(embedding_prov, "params", "aggregator.params", default={}) or {}),
        "planes": _first(embedding_prov, "planes", "aggregator.planes"),
        "requires_fit": bool(_first(embedding_prov, "trainable", "requires_fit", default=False)),
    }
    if isinstance(aggregator["method"], Mapping):
        aggregator["method"] = aggregator["method"].get("method", embeddings)
    return {
        "encoder": key,
        "encoder_kwargs": dict(_first(store_prov, "encoder_kwargs", "encoder.kwargs", default={}) or {}),
        "weights": str(weights),
        "weights_path": str(weights_path) if weights_path else None,
        "state_sha256": str(_first(store_prov, "state_sha256", default="") or ""),
        "amp": _first(store_prov, "amp", default="none"),
        "weights_sha256": str(sha or ""),
        "embed_dim": _first(encoder, "embed_dim"),
        "volume_cfg": dict(_first(store_prov, "volume_cfg", "volume_config", "volume", default={}) or {}),
        "slice_cfg": dict(_first(store_prov, "slice_cfg", "slice_config", "slicing", default={}) or {}),
        "feature_dtype": str(_first(store_prov, "feature_dtype", "dtype", default="float16")),
        "aggregator": aggregator,
    }


def store_provenance(store: Any, embeddings: str) -> dict[str, Any]:
    """The provenance record an index keeps for embedding set ``embeddings`` of ``store``."""
    store_prov = dict(store.provenance or {})
    _, _, emb_prov = store.volume_embeddings(embeddings)
    path = getattr(store, "path", None)
    pipeline = pipeline_from_store(store_prov, emb_prov or {}, embeddings)
    pipeline["store_planes"] = list(getattr(store, "planes", []) or [])
    modalities = _store_modalities(store)
    if modalities:
        pipeline["modalities"] = modalities
    return {
        "store": {"path": str(Path(path).resolve()) if path else None,
                  "feature_set": str(store.feature_set), "provenance": store_prov},
        "embeddings": {"name": embeddings, "provenance": dict(emb_prov or {})},
        "pipeline": pipeline,
    }


def _store_modalities(store: Any) -> list[str] | None:
    """The image modalities (channel order) the store's slice features were made from, as its first
    subject's input fingerprint records them; None when unknown (a 3D-only or pre-format-2 store)."""
    try:
        plane = store.planes[0]
        inputs = store.subject_inputs(store.subjects(plane)[0], plane) or {}
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    files = inputs.get("files")
    return [str(m) for m in files] if isinstance(files, Mapping) and files else None


def stable(value: Any) -> Any:
    """``value`` with run-specific keys removed (recursively), for comparing what was computed."""
    if isinstance(value, Mapping):
        return {k: stable(v) for k, v in sorted(value.items()) if k not in VOLATILE_KEYS}
    if isinstance(value, (list, tuple)):
        return [stable(v) for v in value]
    return value


def embedding_identity(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a volume-embedding set's provenance that determines the vectors."""
    return {k: stable(provenance[k]) for k in EMBEDDING_IDENTITY_KEYS if k in provenance}


def provenance_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two index/store provenance records (empty = same)."""
    problems: list[str] = []
    fs_a = _first(expected, "store.feature_set")
    fs_b = _first(actual, "store.feature_set")
    if fs_a != fs_b:
        problems.append(f"feature set {fs_b!r} differs from the index's {fs_a!r}")
    pa, pb = expected.get("pipeline") or {}, actual.get("pipeline") or {}
    for key in ("encoder", "weights_sha256", "state_sha256", "encoder_kwargs", "volume_cfg", "slice_cfg",
                "feature_dtype", "embed_dim"):
        if stable(pa.get(key)) != stable(pb.get(key)):
            problems.append(f"{key}: {pb.get(key)!r} differs from the index's {pa.get(key)!r}")
    agg_a, agg_b = pa.get("aggregator") or {}, pb.get("aggregator") or {}
    for key in ("method", "params", "planes"):
        if stable(agg_a.get(key)) != stable(agg_b.get(key)):
            problems.append(f"aggregator {key}: {agg_b.get(key)!r} differs from the index's {agg_a.get(key)!r}")
    emb_a = embedding_identity(_first(expected, "embeddings.provenance", default={}))
    emb_b = embedding_identity(_first(actual, "embeddings.provenance", default={}))
    if emb_a != emb_b and not any(p.startswith("aggregator") for p in problems):
        keys = sorted(k for k in set(emb_a) | set(emb_b) if emb_a.get(k) != emb_b.get(k))
        problems.append(f"volume-embedding provenance differs in {keys}")
    return problems


def check_compatible(expected: Mapping[str, Any], actual: Mapping[str, Any], what: str = "store") -> None:
    """Raises :class:`ProvenanceError` listing every difference, or returns silently."""
    problems = provenance_differences(expected, actual)
    if problems:
        src = _first(actual, "store.path", default=what)
        raise ProvenanceError(
            f"{src}: embeddings were not made like the indexed ones, so similarities would be "
            f"meaningless: " + "; ".join(problems)
            + ". Query with the store/pipeline the index was built from, or build an index of this one.")
