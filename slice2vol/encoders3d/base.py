"""The interface every native-3D encoder family implements, plus weight and pooling helpers.

An :class:`Encoder3D` turns one loaded :class:`~slice2vol.data.io.Volume` into one vector, the way the
network's authors prepare their inputs:

* :meth:`Encoder3D.preprocess` — ``Volume`` (raw intensities, RAS) -> network input ``(1, C, X, Y, Z)``:
  the authors' orientation, spacing, crop and intensity recipe (documented per family in
  :attr:`Encoder3D.info`);
* :meth:`Encoder3D.feature_maps` — ``(B, C, X, Y, Z)`` -> one map per encoder stage
  ``[(B, C_l, x_l, y_l, z_l)]``;
* :meth:`Encoder3D.encode` — ``(B, C, X, Y, Z)`` -> ``(B, D)``: the pooled stages of ``info.levels``,
  concatenated;
* :meth:`Encoder3D.embed_volume` — both, whole volume in one pass or tiled with MONAI's
  ``sliding_window_inference`` (the stage maps of the windows are stitched, then pooled).

Families register a builder in :data:`ENCODERS3D` under ``3d/<model>`` keys. Weights are a string, as
for 2D encoders (:mod:`slice2vol.encoders.base`): ``random`` (seeded, always works), ``hub`` /
``hub:<tag>`` (the published download; offline it fails in seconds naming the file to supply),
``package`` (weights shipped inside an installed PyPI package, e.g. ``deepbet``) or a local file in the
family's published checkpoint layout (``.safetensors``, or ``.pt``/``.pth``/``.ckpt`` read with
``torch.load(weights_only=True)``). Published layouts are loaded strictly: every tensor of the network
must come from the file and every tensor of the file must be used (SSL heads shipped with a
checkpoint are built and loaded too, so nothing is silently dropped).
"""

from __future__ import annotations

import logging
import numbers
from collections import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn as nn

from slice2vol.checkpoint_io import check_dtypes
from slice2vol.data.io import Volume, VolumeConfig
from slice2vol.encoders.base import WeightsUnavailable, gem_pool, parse_weights, sha256_file
from slice2vol.encoders3d.preprocess import Recipe, select_channels
from slice2vol.registry import Registry

log = logging.getLogger(__name__)

ENCODERS3D: Registry["Encoder3D"] = Registry("3D encoder")

WeightsKind = Literal["random", "hub", "file", "package"]


@dataclass
class FeatureLevel3D:
    """One encoder stage of a 3D network.

    Attributes:
        index: 0 = shallowest.
        name: the module's name in the network (e.g. ``layer3``, ``down2``, ``swinViT.layers2``).
        channels: C_l.
        stride: input voxels per feature-map cell along each axis.
    """

    index: int
    name: str
    channels: int
    stride: int


@dataclass
class Encoder3DInfo:
    """What a caller needs to know about a 3D encoder, recorded as provenance in the store.

    Attributes:
        key: registry key, e.g. ``3d/deepbet``.
        embed_dim: D of :meth:`Encoder3D.encode` output (B, D).
        source: who publishes the network and its weights (package, repository, paper).
        weights: ``random``, ``hub[:tag]``, ``package`` or the local file used.
        weights_sha256: sha256 of the weights file(s) read, ``""`` for random weights.
        in_chans: channels the network takes.
        spacing: voxel size (mm) the volume is resampled to; ``None`` keeps the volume's grid.
        input_size: network input (X, Y, Z) for a whole volume (or window size for sliding windows);
            ``None`` means the preprocessed volume as it is (padded to ``size_divisor``).
        size_divisor: spatial sizes must be multiples of this (total stride of the network).
        axes: order of the voxel axes fed to the network, as RAS letters: ``RAS`` = (X, Y, Z);
            ``SAR`` = (Z, Y, X), e.g. MedicalNet's (D, H, W).
        crop: the spatial recipe in words (foreground crop, brain bounding box, resize, pad).
        intensity: the intensity recipe in words.
        pooling: how stage maps become vectors (``avg``, ``max``, ``gem``).
        levels: indices of the pooled stages (see :meth:`Encoder3D.feature_info`).
        checkpoint: the published checkpoint file(s) and key layout.
        reference: paper or repository of the weights.
        extra: family-specific facts.
    """

    key: str
    embed_dim: int
    source: str = ""
    weights: str = "random"
    weights_sha256: str = ""
    in_chans: int = 1
    spacing: tuple[float, float, float] | None = None
    input_size: tuple[int, int, int] | None = None
    size_divisor: int = 1
    axes: str = "RAS"
    crop: str = ""
    intensity: str = ""
    pooling: str = "avg"
    levels: tuple[int, ...] = ()
    checkpoint: str = ""
    reference: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("spacing", "input_size", "levels"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d


@dataclass
class SlidingWindow:
    """Options of :func:`monai.inferers.sliding_window_inference` for embedding.

    Attributes:
        roi_size: window (X, Y, Z); default the encoder's ``input_size``.
        overlap: fraction of overlap between neighbouring windows.
        sw_batch_size: windows per forward pass.
        mode: ``constant`` (plain mean of overlapping windows) or ``gaussian`` (centre-weighted).
    """

    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 2
    mode: Literal["constant", "gaussian"] = "constant"

    def __post_init__(self) -> None:
        # checked here: MONAI takes roi_size 0 or overlap 1 and fails deep inside, or loops forever
        if self.roi_size is not None:
            try:
                roi = tuple(int(s) for s in self.roi_size)
                whole = all(float(s) == int(s) for s in self.roi_size)
            except (TypeError, ValueError):
                roi, whole = (), False
            if len(roi) != 3 or not whole or min(roi) < 1:
                raise ValueError(f"sliding_window.roi_size must be 3 window sizes >= 1 voxel (X, Y, Z), "
                                 f"got {self.roi_size!r}")
            self.roi_size = roi  # type: ignore[assignment]
        try:
            overlap, batch = float(self.overlap), float(self.sw_batch_size)
        except (TypeError, ValueError):
            overlap, batch = float("nan"), float("nan")
        if not 0 <= overlap < 1:
            raise ValueError(f"sliding_window.overlap must be a fraction in [0, 1), got {self.overlap!r}")
        if not (batch >= 1 and batch == int(batch)):
            raise ValueError(f"sliding_window.sw_batch_size must be a whole number >= 1, got {self.sw_batch_size!r}")
        self.overlap, self.sw_batch_size = overlap, int(batch)
        if self.mode not in ("constant", "gaussian"):
            raise ValueError(f"sliding_window.mode must be constant or gaussian, got {self.mode!r}")

    @classmethod
    def parse(cls, value: "SlidingWindow | Mapping[str, Any] | bool | None") -> "SlidingWindow | None":
        """``None``/``False`` -> None (whole volume); ``True`` -> defaults; a mapping -> its fields."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"roi_size", "overlap", "sw_batch_size", "mode"}
            if unknown:
                raise ValueError(f"sliding_window: unknown option(s) {sorted(unknown)} "
                                 "(roi_size, overlap, sw_batch_size, mode)")
            return cls(**dict(value))
        raise TypeError(f"sliding_window must be a mapping, a bool or None, got {type(value).__name__}")


class Encoder3D(nn.Module):
    """Base class: subclasses set ``self.info`` and implement ``preprocess``, ``feature_info`` and
    ``feature_maps``."""

    info: Encoder3DInfo
    #: families whose preprocessing needs the whole volume (e.g. a detection stage) set this False
    supports_sliding_window: bool = True

    # -- what to load ------------------------------------------------------------------------------
    def volume_config(self) -> VolumeConfig:
        """How :func:`embed_cohort3d` loads a subject for this encoder: raw intensities in RAS on the
        file's grid (the family's :meth:`preprocess` does spacing, crop and intensity itself)."""
        return VolumeConfig(normalize="none")

    def preprocess(self, volume: Volume) -> torch.Tensor:
        """Volume (C, X, Y, Z) in RAS -> network input (1, in_chans, *spatial) float32 on CPU."""
        raise NotImplementedError

    # -- the network -------------------------------------------------------------------------------
    def feature_info(self) -> list[FeatureLevel3D]:
        """The encoder stages, shallowest first."""
        raise NotImplementedError

    def feature_maps(self, x: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Preprocessed input (B, in_chans, X, Y, Z) -> stage maps [(B, C_l, x_l, y_l, z_l)] for
        ``levels`` (default: all), via the network's own forward."""
        raise NotImplementedError

    def pool(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stage maps [(B, C_l, ...)] -> (B, sum C_l) by ``info.pooling``, concatenated in order."""
        return torch.cat([pool3d(m, self.info.pooling) for m in maps], dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, in_chans, X, Y, Z) -> embeddings (B, embed_dim) float32."""
        return self.pool(self.feature_maps(x, self.info.levels)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    @torch.inference_mode()
    def embed_volume(self, volume: Volume, sliding_window: SlidingWindow | Mapping | bool | None = None
                     ) -> torch.Tensor:
        """One volume -> its embedding (embed_dim,) float32 on CPU.

        Args:
            volume: loaded as :meth:`volume_config` says (any ``Volume`` works; raw intensities are
                what the recipes expect).
            sliding_window: ``None`` for one pass over the whole preprocessed volume, else the
                options of MONAI's ``sliding_window_inference`` (:class:`SlidingWindow`): the stage maps
                of the windows are stitched into whole-volume maps, which are then pooled.
        """
        x = self.preprocess(volume).to(self.device)
        window = SlidingWindow.parse(sliding_window)
        if window is None:
            return self.encode(x)[0].float().cpu()
        return self.encode_sliding(x, window)[0].float().cpu()

    def encode_sliding(self, x: torch.Tensor, window: SlidingWindow) -> torch.Tensor:
        """Preprocessed (B, C, X, Y, Z) -> (B, embed_dim) from stitched sliding-window stage maps."""
        if not self.supports_sliding_window:
            raise ValueError(f"{self.info.key}: sliding windows are not supported (its preprocessing needs "
                             "the whole volume); embed whole volumes")
        from monai.inferers import sliding_window_inference

        roi = window.roi_size or self.info.input_size
        if roi is None:
            raise ValueError(f"{self.info.key}: give sliding_window.roi_size (the encoder has no fixed input size)")
        roi = tuple(int(s) for s in roi)
        div = self.info.size_divisor
        if any(s % div for s in roi):
            raise ValueError(f"{self.info.key}: sliding-window roi_size {roi} must be a multiple of {div}")
        levels = list(self.info.levels)

        def predictor(windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(self.feature_maps(windows, levels))

        # windows past the volume's border are padded with its background level (its minimum)
        maps = sliding_window_inference(x, roi, window.sw_batch_size, predictor, overlap=window.overlap,
                                        mode=window.mode, padding_mode="constant", cval=float(x.amin()),
                                        progress=False)
        maps = list(maps) if isinstance(maps, (tuple, list)) else [maps]
        return self.pool([m.as_subclass(torch.Tensor) for m in maps]).float()

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class RecipeEncoder(Encoder3D):
    """A 3D encoder whose input follows a :class:`Recipe`, with stage maps from ``stages_fn``.

    Args:
        network: the module holding the weights (saved/loaded as a whole).
        stages_fn: (B, C, X, Y, Z) -> list of stage maps, shallowest first.
        levels: :class:`FeatureLevel3D` of every stage.
        info: resolved facts.
        recipe: spatial + intensity preprocessing.
        channel: volume channel(s) fed to the network (default the first ``in_chans``).
    """

    def __init__(self, network: nn.Module, stages_fn: Callable[[torch.Tensor], list[torch.Tensor]],
                 levels: list[FeatureLevel3D], info: Encoder3DInfo, recipe: Recipe,
                 channel: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.network = network
        self._stages_fn = stages_fn
        self._levels = levels
        self.info = info
        self.recipe = recipe
        self.channel = channel

    def preprocess(self, volume: Volume) -> torch.Tensor:
        """Volume -> (1, in_chans, X, Y, Z) by :attr:`recipe` (see ``info.crop`` / ``info.intensity``)."""
        return self.recipe.apply(volume, select_channels(volume, self.info.in_chans, self.channel))

    def feature_info(self) -> list[FeatureLevel3D]:
        return list(self._levels)

    def feature_maps(self, x: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        maps = self._stages_fn(x)
        return maps if levels is None else [maps[i] for i in levels]


# -- pooling ---------------------------------------------------------------------------------------
def pool3d(feature_map: torch.Tensor, pooling: str = "avg", gem_p: float = 3.0) -> torch.Tensor:
    """(B, C, x, y, z) -> (B, C) by ``avg``, ``max`` or ``gem`` (generalised mean, p = ``gem_p``)."""
    dims = tuple(range(2, feature_map.ndim))
    if pooling == "avg":
        return feature_map.mean(dims)
    if pooling == "max":
        return feature_map.amax(dims)
    if pooling == "gem":
        return gem_pool(feature_map, gem_p, dims=dims)
    raise ValueError(f"pooling must be avg, max or gem, got {pooling!r}")


def resolve_levels(levels: Iterable[int] | int | str | None, n_levels: int, key: str) -> tuple[int, ...]:
    """``None``/``all`` -> every stage; ``-1`` -> the last; a list -> those (negative from the end).

    Raises:
        ValueError: anything else (a string such as ``foo`` from ``kwargs.levels=foo``, a float, a bool),
            or a stage out of range, naming ``key``.
    """
    if levels is None or levels == "all":
        return tuple(range(n_levels))
    if isinstance(levels, numbers.Integral) and not isinstance(levels, bool):
        levels = [levels]
    # a string is iterable too: 'foo' or '12' must not be read character by character
    items = list(levels) if isinstance(levels, abc.Sequence) and not isinstance(levels, (str, bytes)) else None
    if not items or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{key}: levels must be 'all', a stage index or a list of stage indices (0 to "
                         f"{n_levels - 1}, negative from the end), got {levels!r}")
    out = []
    for level in items:
        idx = int(level) + (n_levels if int(level) < 0 else 0)
        if not 0 <= idx < n_levels:
            raise ValueError(f"{key}: level {level} out of range (the encoder has {n_levels} stages)")
        out.append(idx)
    return tuple(out)


# -- weights ---------------------------------------------------------------------------------------
def parse_weights3d(weights: str | Path | None) -> tuple[WeightsKind, str]:
    """``random`` | ``hub[:tag]`` | ``package[:name]`` | path -> (kind, tag-or-path).

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    text = "" if weights is None else str(weights)
    if text == "package" or text.startswith("package:"):
        return "package", text[len("package:"):]
    return parse_weights(weights)  # type: ignore[return-value]


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint as published, without unwrapping: safetensors -> dict of tensors; other files ->
    ``torch.load(weights_only=True)`` (plain containers of tensors and numbers only, never pickle)."""
    from slice2vol.checkpoint_io import read_weights

    return read_weights(path)


def unwrap(checkpoint: Any, containers: Sequence[str], path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: the first of ``containers`` present (e.g. ``state_dict``),
    else the checkpoint itself when it is a flat mapping of tensors."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: {key} expects a mapping of tensors, got {type(checkpoint).__name__}")
    for name in containers:
        inner = checkpoint.get(name)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors found for {key} (looked in {list(containers) or 'the top level'}; "
                         f"top-level keys {sorted(map(str, checkpoint))[:6]})")
    return tensors


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Removes ``prefix`` from every key when all keys carry it (e.g. ``module.`` of DataParallel)."""
    if prefix and state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, key: str,
                hint: str = "") -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error naming the file.

    Raises:
        ValueError: missing or unexpected tensors, or shapes that differ, listing the first ones.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: not the {key} checkpoint layout: {len(missing)} missing tensors "
                         f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}" + (f" ({hint})" if hint else ""))
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        name, got, want = bad[0]
        raise ValueError(f"{path}: {len(bad)} tensors of {key} have the wrong shape, first {name!r} {got} where the "
                         f"network has {want}" + (f" ({hint})" if hint else ""))
    check_dtypes(model, dict(state), path)  # load_state_dict would cast int weights silently
    model.load_state_dict(dict(state), strict=True)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Builds a module under a fixed torch seed (random-init weights are reproducible), leaving the
    global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def missing_weights(key: str, filename: str, where: str, layout: str) -> WeightsUnavailable:
    """The error for published weights that are not here: names the file to supply and its layout."""
    return WeightsUnavailable(
        f"{key}: the published weights are not available offline. Download {filename} ({where}) and pass it "
        f"as --weights /path/to/{filename} (layout: {layout})")


def published_weights(key: str, weights: str | Path | None, *, filename: str, where: str, layout: str,
                      hub: Callable[[str], str] | None = None) -> tuple[WeightsKind, Path | None]:
    """Resolves the weights string of a family with a published checkpoint.

    Returns:
        (kind, path): ``("random", None)``, or ``("hub" | "file", local checkpoint path)``.

    Raises:
        WeightsUnavailable: ``hub`` without a downloadable source or offline, naming the file to supply.
        ValueError: ``package`` (these weights are not shipped in a PyPI package).
    """
    kind, detail = parse_weights3d(weights)
    if kind == "random":
        return "random", None
    if kind == "package":
        raise ValueError(f"{key}: no PyPI package ships these weights; use a local file ({filename}) or 'random'")
    if kind == "hub":
        if hub is None:
            raise missing_weights(key, filename, where, layout)
        return "hub", Path(hub(detail))
    return "file", Path(detail)


def file_weights(weights: str) -> tuple[str, str]:
    """(shown weights string, sha256) of a local weights file."""
    return str(weights), sha256_file(weights)


def build_encoder3d(key: str, weights: str | Path | None = "random", **kwargs: Any) -> Encoder3D:
    """Builds a registered 3D encoder in eval mode.

    Args:
        key: registry key such as ``3d/deepbet`` or ``3d/medicalnet_resnet18`` (``ENCODERS3D.names()``).
        weights: ``random``, ``hub[:tag]``, ``package`` or a local checkpoint in the published layout.
        **kwargs: family options (``levels``, ``pooling``, ``input_size``, ``spacing``, ...).
    """
    import slice2vol.encoders3d  # noqa: F401 - fills the registry

    check_options(key, ENCODERS3D.get(key), kwargs)
    encoder = ENCODERS3D.build(key, weights=weights, **kwargs)
    return encoder.eval()


class UnknownOptions(ValueError, TypeError):
    """Options a 3D builder does not take: a ``TypeError`` like Python's own for an unexpected keyword,
    and a ``ValueError`` (of this package) so that the command line prints it as one line."""


def check_options(key: str, builder: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Refuses options the builder of ``key`` does not take, before anything is built.

    A builder's options are its keyword parameters (a builder that takes ``**kwargs`` without a
    ``__signature__`` checks its own, raising :class:`UnknownOptions` too).

    Raises:
        UnknownOptions: ``<key>: unknown option(s) [...] (known: ...)``.
    """
    import inspect

    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if n != "weights" and p.kind in (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UnknownOptions(f"{key}: unknown option(s) {unknown} (known: {', '.join(sorted(known))})")
