"""Embedding a new scan exactly like an indexed cohort: volume -> slices -> encoder -> aggregator.

The pipeline is rebuilt from the index provenance (see :mod:`slice2vol.retrieval.provenance`):
same :class:`~slice2vol.data.io.VolumeConfig`, :class:`~slice2vol.data.slicing.SliceConfig`,
encoder key, kwargs and weights (sha256 checked), the store's feature dtype (slice features are
rounded through it, as the cache does) and the same aggregator. Anything that cannot be rebuilt
exactly — random or changed weights, an aggregator with learned state that was not saved — is a
:class:`~slice2vol.retrieval.index.ProvenanceError`, never a silently different embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from slice2vol.config import from_dict
from slice2vol.retrieval.index import ProvenanceError

log = logging.getLogger(__name__)


def _weights_problem(pipeline: Mapping[str, Any], weights: str | None) -> tuple[str, str | None]:
    """Resolves the weights to load and checks the file's sha256 against the recorded one.

    Returns:
        (weights string for ``build_encoder``, problem message or None).
    """
    from slice2vol.encoders.base import parse_weights, sha256_file

    recorded = str(pipeline.get("weights") or "random")
    expected_sha = str(pipeline.get("weights_sha256") or "")
    key = pipeline.get("encoder")
    chosen = str(weights) if weights is not None else recorded
    kind, value = ("file", chosen) if Path(chosen).exists() else (None, None)
    if kind is None:
        if chosen in ("", "random", "none"):
            return chosen, (f"the indexed embeddings of {key} come from randomly initialised weights, which "
                            f"cannot be rebuilt; index embeddings of saved weights (a checkpoint file), "
                            f"or embed the scan with the same encoder object yourself")
        if chosen == "hub" or chosen.startswith("hub:"):
            return chosen, None
        return chosen, (f"weights file {chosen} (recorded for {key}) not found here; pass the same "
                        f"checkpoint with --weights PATH (its sha256 must be {expected_sha or 'recorded'})")
    kind, value = parse_weights(chosen)
    sha = sha256_file(value)
    if expected_sha and sha != expected_sha:
        return chosen, (f"weights file {value} has sha256 {sha[:16]}..., but the indexed embeddings were "
                        f"made with sha256 {expected_sha[:16]}... ({recorded}); these are different weights")
    return chosen, None


@dataclass
class VolumeEmbedder:
    """Turns one scan into one volume embedding like the indexed cohort.

    Attributes:
        encoder: the 2D encoder (eval mode).
        volume_cfg: how NIfTI files become arrays.
        slice_cfg: which slices are cut.
        aggregator: a fitted or parameter-free :class:`slice2vol.aggregate.base.Aggregator`.
        pipeline: the provenance record it was built from.
        feature_dtype: dtype the store keeps slice features in; features are rounded through it.
        batch_size: slices per encoder call.
        device: where slicing and encoding run.
    """

    encoder: Any
    volume_cfg: Any
    slice_cfg: Any
    aggregator: Any
    pipeline: dict[str, Any] = field(default_factory=dict)
    feature_dtype: str = "float16"
    batch_size: int = 32
    device: str = "cpu"

    @classmethod
    def from_provenance(
        cls,
        provenance: Mapping[str, Any],
        *,
        weights: str | Path | None = None,
        encoder: Any = None,
        aggregator: Any = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> "VolumeEmbedder":
        """Rebuilds the indexed set's pipeline from its provenance.

        Args:
            provenance: an index's (or store's) provenance with a ``pipeline`` record.
            weights: a local copy of the recorded weights file (its sha256 must match).
            encoder: an already built encoder (its key and weights sha256 must match).
            aggregator: an already fitted aggregator (for trained aggregators).
            device: where to run.
            batch_size: slices per encoder call.

        Raises:
            ProvenanceError: the pipeline cannot be rebuilt exactly.
        """
        from slice2vol.data.io import VolumeConfig
        from slice2vol.data.slicing import SliceConfig

        pipeline = dict(provenance.get("pipeline") or {})
        if not pipeline.get("encoder"):
            raise ProvenanceError("the index provenance records no encoder; it was built from raw arrays, "
                                  "so new scans cannot be embedded like its vectors")
        volume_cfg = from_dict(VolumeConfig, pipeline.get("volume_cfg") or {})
        slice_cfg = from_dict(SliceConfig, pipeline.get("slice_cfg") or {})
        if encoder is None:
            from slice2vol.encoders.base import build_encoder

            chosen, problem = _weights_problem(pipeline, None if weights is None else str(weights))
            if problem:
                raise ProvenanceError(problem)
            encoder = build_encoder(pipeline["encoder"], weights=chosen, **(pipeline.get("encoder_kwargs") or {}))
            encoder = encoder.to(device)
        if aggregator is None:
            aggregator = _build_aggregator(pipeline.get("aggregator") or {})
        embedder = cls(encoder, volume_cfg, slice_cfg, aggregator, pipeline,
                       str(pipeline.get("feature_dtype") or "float16"), batch_size, device)
        embedder.check_against(provenance)
        return embedder

    def check_against(self, provenance: Mapping[str, Any]) -> None:
        """Raises :class:`ProvenanceError` if this pipeline differs from ``provenance``'s."""
        pipeline = provenance.get("pipeline") or {}
        info = getattr(self.encoder, "info", None)
        problems = []
        if info is not None:
            if pipeline.get("encoder") and info.key != pipeline["encoder"]:
                problems.append(f"encoder {info.key!r} is not the indexed {pipeline['encoder']!r}")
            want = str(pipeline.get("weights_sha256") or "")
            if want and info.weights_sha256 and info.weights_sha256 != want:
                problems.append(f"encoder weights sha256 {info.weights_sha256[:16]}... differ from the "
                                f"indexed {want[:16]}...")
            if pipeline.get("embed_dim") and info.embed_dim != pipeline["embed_dim"]:
                problems.append(f"encoder dimension {info.embed_dim} is not the indexed {pipeline['embed_dim']}")
        if problems:
            raise ProvenanceError("cannot embed a scan like the indexed cohort: " + "; ".join(problems))

    # -- the pipeline --------------------------------------------------------------------------
    def load(self, images: str | Path | Sequence | dict, subject_id: str | None = None):
        """NIfTI file(s) -> :class:`~slice2vol.data.io.Volume` with the indexed VolumeConfig."""
        from slice2vol.data.io import load_volume

        return load_volume(images, self.volume_cfg, subject_id=subject_id)

    def slice_features(self, volume: Any) -> dict[str, Any]:
        """Volume -> ``plane -> PlaneBag`` of (S, D) slice features, rounded like the store's."""
        import torch

        from slice2vol.aggregate.base import PlaneBag
        from slice2vol.data.slicing import slice_volume

        bag = {}
        planes = slice_volume(volume, self.slice_cfg, device=self.device)
        with torch.inference_mode():
            for plane, ps in planes.items():
                chunks = [self.encoder.encode(ps.images[i:i + self.batch_size]).float().cpu()
                          for i in range(0, len(ps), self.batch_size)]
                feats = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
                # the store keeps features in feature_dtype; round the same way for identical vectors
                feats = feats.astype(self.feature_dtype).astype(np.float32)
                bag[plane] = PlaneBag(feats, positions=np.asarray(ps.positions, dtype=np.float64),
                                      indices=np.asarray(ps.indices))
        return bag

    def embed(self, images: str | Path | Sequence | dict) -> np.ndarray:
        """One scan -> its volume embedding (D',) float32."""
        volume = images if hasattr(images, "data") and hasattr(images, "affine") else self.load(images)
        bag = self.slice_features(volume)
        return np.asarray(self.aggregator.transform([bag])[0], dtype=np.float32)


def _build_aggregator(record: Mapping[str, Any]) -> Any:
    from slice2vol.aggregate.base import build_aggregator

    method = record.get("method")
    if not method:
        raise ProvenanceError("the index provenance records no aggregator method")
    params = dict(record.get("params") or {})
    if record.get("planes") is not None and "planes" not in params:
        params["planes"] = list(record["planes"])
    try:
        aggregator = build_aggregator(method, **params)
    except (KeyError, TypeError, ValueError) as err:
        raise ProvenanceError(f"cannot rebuild aggregator {method!r} with {params}: {err}") from None
    if getattr(aggregator, "requires_fit", False) or record.get("requires_fit"):
        raise ProvenanceError(
            f"aggregator {method!r} is trained and its fitted state is not in the index provenance; "
            f"pass the fitted aggregator (Index.search_nifti(..., aggregator=...)) or index a "
            f"parameter-free aggregation such as 'mean'")
    return aggregator
