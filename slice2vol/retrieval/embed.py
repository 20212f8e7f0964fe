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


def resolve_weights(pipeline: Mapping[str, Any], weights: str | None) -> str:
    """The weights string to rebuild the indexed encoder with; a local file's sha256 is checked.

    Raises:
        ProvenanceError: the recorded file is missing here, or the given file is another checkpoint.
    """
    from slice2vol.encoders.base import PRETRAINED_WORDS, sha256_file

    kind = str(pipeline.get("weights") or "random")
    key = pipeline.get("encoder")
    if kind == "random" or kind.startswith("hub"):
        if weights is not None:
            raise ProvenanceError(f"the indexed embeddings of {key} use {kind!r} weights, not a file; "
                                  f"drop --weights {weights}")
        return kind
    expected = str(pipeline.get("weights_sha256") or "")
    recorded = str(pipeline.get("weights_path") or "")
    if weights in PRETRAINED_WORDS or (weights is None and recorded in PRETRAINED_WORDS):
        # published weights found on this machine (`--weights imagenet` at caching time records the
        # word, not where the file was): looked up again the same way, and the rebuilt parameters'
        # sha256 (rebuild_encoder) proves they are the indexed ones
        return str(weights or recorded)
    path = Path(weights if weights is not None else str(pipeline.get("weights_path") or ""))
    if not path.exists():
        raise ProvenanceError(f"weights file {path} (recorded for {key}) not found here; pass the same "
                              f"checkpoint with --weights PATH (sha256 {expected[:16]}...)")
    if not path.is_dir():  # a folder of weight files (Hugging Face layout) is hashed file by file
        from slice2vol.data.io import file_problem

        problem = file_problem(path)
        if problem:  # hashing a named pipe would wait for a writer for ever
            raise ValueError(f"{path}: {problem}")
    sha = sha256_file(path)
    if expected and sha != expected:
        raise ProvenanceError(f"weights file {path} has sha256 {sha[:16]}..., but the indexed embeddings "
                              f"were made with sha256 {expected[:16]}...: these are different weights")
    return str(path)


def rebuild_encoder(pipeline: Mapping[str, Any], weights: str | None = None, device: str = "cpu") -> Any:
    """Builds the indexed encoder exactly as the cache job did, and proves it by state sha256.

    Random weights are rebuilt with the recorded seed (the cache seeds them for this reason); the
    parameters' sha256 must equal the recorded ``state_sha256``.
    """
    import torch

    from slice2vol.encoders.base import WeightsUnavailable, build_encoder, state_sha256

    key = pipeline["encoder"]
    chosen = resolve_weights(pipeline, weights)
    kwargs = dict(pipeline.get("encoder_kwargs") or {})
    seed = int(kwargs.pop("random_seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as cache_cohort does, so random weights come out identical
        try:
            encoder = build_encoder(key, weights=chosen, **kwargs)
        except WeightsUnavailable as err:
            raise ProvenanceError(f"cannot rebuild the indexed encoder: {err}") from None
    encoder.eval()
    if hasattr(encoder, "optimize"):
        amp = pipeline.get("amp")
        encoder.optimize(amp=amp if str(device).startswith("cuda") and amp not in (None, "none") else None,
                         fold_bn=True)
    expected = str(pipeline.get("state_sha256") or "")
    if expected:
        got = state_sha256(encoder)  # of the weights as built: folding records it, so it is hashed once
        if got != expected:
            raise ProvenanceError(f"the rebuilt {key} ({chosen}) has parameters with sha256 {got[:16]}..., "
                                  f"not the indexed {expected[:16]}...: the model or its weights changed")
    return encoder.to(device)


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
    _state_sha256: str | None = field(default=None, repr=False)

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
            raise ProvenanceError("the index provenance records no 2D slice-encoder pipeline (embeddings "
                                  "given as arrays, or made by a 3D encoder), so a new scan cannot be "
                                  "embedded automatically; embed it yourself and call Index.search(vector)")
        volume_cfg = from_dict(VolumeConfig, pipeline.get("volume_cfg") or {})
        slice_cfg = from_dict(SliceConfig, pipeline.get("slice_cfg") or {})
        state = None
        if encoder is None:
            encoder = rebuild_encoder(pipeline, None if weights is None else str(weights), device)
            state = pipeline.get("state_sha256") or None  # verified by rebuild_encoder
        if aggregator is None:
            aggregator = _build_aggregator(pipeline.get("aggregator") or {})
        embedder = cls(encoder, volume_cfg, slice_cfg, aggregator, pipeline,
                       str(pipeline.get("feature_dtype") or "float16"), batch_size, device, state)
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
        want_state = str(pipeline.get("state_sha256") or "")
        if want_state and self._state_sha256 is None:
            from slice2vol.encoders.base import state_sha256

            self._state_sha256 = state_sha256(self.encoder)
        if want_state and self._state_sha256 != want_state:
            problems.append(f"encoder parameters have sha256 {self._state_sha256[:16]}..., not the "
                            f"indexed {want_state[:16]}...")
        if problems:
            raise ProvenanceError("cannot embed a scan like the indexed cohort: " + "; ".join(problems))

    # -- the pipeline --------------------------------------------------------------------------
    @property
    def planes(self) -> tuple[str, ...]:
        """Planes the aggregator uses (those of the embedding set, else every cached plane)."""
        agg = self.pipeline.get("aggregator") or {}
        planes = agg.get("planes") or self.pipeline.get("store_planes") or self.slice_cfg.planes
        return tuple(planes)

    def load_slices(self, images: str | Path | Sequence | dict, subject_id: str = "query") -> dict:
        """NIfTI file(s) -> ``plane -> (images (S, C*k, H, W), indices (S,), positions (S, 3))``.

        Uses the cache job's own dataset (:class:`slice2vol.extract.VolumeSlicesDataset`), so
        loading and slicing are the code that made the indexed features.
        """
        from slice2vol.data.io import VolumeError, named_images
        from slice2vol.data.manifest import Subject
        from slice2vol.extract import VolumeSlicesDataset

        named = named_images(images)
        want = self.pipeline.get("modalities")
        if want and isinstance(images, Mapping) and set(named) == set(want):
            named = {m: named[m] for m in want}  # named modalities go in the indexed channel order
        if want and (len(named) != len(want) or (isinstance(images, Mapping) and list(named) != list(want))):
            # another channel count would be sliced and encoded without complaint (3 files pass
            # through a 3-channel network) or fail deep in the encoder: say what the index needs
            got = ", ".join(f"{k}={Path(v).name}" for k, v in named.items()) if isinstance(images, Mapping) \
                else ", ".join(Path(v).name for v in named.values())
            raise ProvenanceError(
                f"the indexed cohort has {len(want)} image(s) per subject ({', '.join(want)}), the query "
                f"has {len(named)} ({got}): give one file per modality, in the order {' '.join(want)}")
        dataset = VolumeSlicesDataset([(Subject(subject_id, named), self.planes)], self.volume_cfg, self.slice_cfg)
        item = dataset[0]
        if item.error:
            raise VolumeError(item.path or next(iter(named.values())), item.error.split(": ", 1)[-1])
        return item.planes

    def slice_features(self, planes: Mapping[str, Any]) -> dict[str, Any]:
        """Sliced planes -> ``plane -> PlaneBag`` of (S, D) features, rounded through the store dtype."""
        import torch

        from slice2vol.aggregate.base import PlaneBag

        bag = {}
        with torch.inference_mode():
            for plane, (images, indices, positions) in planes.items():
                chunks = [self.encoder.encode(images[i:i + self.batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(indices), self.batch_size)]
                feats = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
                # the store keeps features in feature_dtype: round the same way for the same vectors
                feats = feats.astype(self.feature_dtype).astype(np.float32)
                bag[plane] = PlaneBag(feats, positions=np.asarray(positions), indices=np.asarray(indices))
        return bag

    def embed(self, images: str | Path | Sequence | dict) -> np.ndarray:
        """One scan -> its volume embedding (D',) float32."""
        return self.embed_with_extent(images)[0]

    def embed_with_extent(self, images: str | Path | Sequence | dict) -> tuple[np.ndarray, dict[str, float]]:
        """One scan -> (its volume embedding (D',) float32, plane -> mm spanned by its kept slices)."""
        planes = self.load_slices(images)
        bag = self.slice_features(planes)
        extent = {plane: slice_extent_mm(positions) for plane, (_, _, positions) in planes.items()}
        return np.asarray(self.aggregator.transform([bag])[0], dtype=np.float32), extent


def slice_extent_mm(positions: Any) -> float:
    """Distance in mm between the outermost kept slices of a plane ((S, 3) world positions): the
    foreground's extent across that plane, 0 for fewer than two slices."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    return float(np.linalg.norm(pos.max(0) - pos.min(0))) if len(pos) > 1 else 0.0


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
