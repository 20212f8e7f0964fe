"""deepbet (``3d/deepbet``): the two 3D brain-extraction CNNs of the ``deepbet`` package as an encoder.

deepbet (Fisch et al. 2024, https://github.com/wwu-mmll/deepbet, MIT, ``pip install deepbet``) ships two
TorchScript LinkNet-style 3D CNNs (2.1 M parameters each) trained for brain extraction on thousands of
T1w scans: ``bbox_model.pt`` sees the whole head at 128^3 and finds the brain; ``model.pt`` sees the
brain's bounding box (+10% margin) resampled to 256^3 and segments it. Both are called exactly as
``deepbet.BrainExtraction.run_model`` calls them:

1. the volume in closest-canonical (RAS) orientation, NaN -> 0;
2. nearest-exact resize to 128^3; ``low, high`` = its 0.5 / 99.5% quantiles (all voxels);
3. intensity: ``clamp((x - low) / (high - low), 0, 1)``, z-scored over the whole input, then
   ``0.226 * z + 0.449`` (deepbet's ``normalize``);
4. ``bbox_model`` -> brain probability; largest 26-connected component of ``p > 0.5``; its bounding box
   (planes whose mean exceeds 0.02), scaled to the volume grid, enlarged by 10% per side;
5. that box of the original volume, nearest-exact resized to 256^3, same ``low, high`` and recipe ->
   ``model``.

Features: the five encoder stages of each network (``init`` 16 ch at stride 4, ``down0`` 16 at 4,
``down1`` 32 at 8, ``down2`` 64 at 16, ``down3`` 128 at 32), each average-pooled, concatenated: 256 per
network, 512 for both (``networks``). ``bbox`` features see the whole head (its size included);
``brain`` features see the brain only, scaled to a fixed box.

The networks are re-expressed as plain ``nn.Module`` s with the TorchScript files' parameter names
(``init.0.weight``, ``down1.block1.double_conv.0.weight``, ...), so the published files load strictly
and stage outputs are reachable; ``tests/encoders3d/test_deepbet.py`` checks outputs against the
package's TorchScript networks and its own ``run_model``.

Weights: ``package`` (the installed package's ``data/models/{bbox_model,model}.pt``), ``random``
(seeded), or a file: a directory holding the two TorchScript files as the package ships them, or a
``.safetensors`` / ``.pt`` state dict whose keys are the TorchScript names prefixed with the file stem
(``bbox_model.init.0.weight``, ``model.init.0.weight``, ...).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slice2vol.data.io import Volume
from slice2vol.encoders.base import WeightsUnavailable, sha256_file
from slice2vol.encoders3d.base import (
    ENCODERS3D,
    Encoder3D,
    Encoder3DInfo,
    FeatureLevel3D,
    load_strict,
    parse_weights3d,
    read_checkpoint,
    resolve_levels,
    seeded,
    unwrap,
)
from slice2vol.encoders3d.preprocess import select_channels, volume_tensor

log = logging.getLogger(__name__)

NETWORKS = {"bbox": "bbox_model", "brain": "model"}  # our name -> the package's file stem
STAGES = (("init", 16, 4), ("down0", 16, 4), ("down1", 32, 8), ("down2", 64, 16), ("down3", 128, 32))
INSTALL_HINT = "install the optional extra: pip install deepbet"


# -- the network, with the TorchScript files' module names -------------------------------------------
def _norm_relu(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm3d(channels), nn.ReLU(inplace=True)]


class _Block(nn.Module):
    """Residual block: conv3-IN-ReLU-conv3-IN (+ 1x1 conv-IN shortcut when shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, stride, 1, bias=False), *_norm_relu(cout),
            nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.InstanceNorm3d(cout))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.InstanceNorm3d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.double_conv(x) + shortcut)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block1 = _Block(cin, cout, stride)
        self.block2 = _Block(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class _Up(nn.Module):
    """LinkNet decoder block: 1x1 conv to cin/4, transposed conv (x ``stride``), 1x1 conv to cout."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cin // 4
        self.conv1 = nn.Sequential(nn.Conv3d(cin, mid, 1, bias=False), *_norm_relu(mid))
        self.tp_conv = nn.Sequential(
            nn.ConvTranspose3d(mid, mid, 3, stride, 1, output_padding=stride - 1, bias=False), *_norm_relu(mid))
        self.conv2 = nn.Sequential(nn.Conv3d(mid, cout, 1, bias=False), *_norm_relu(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class DeepBetNet(nn.Module):
    """deepbet's 3D LinkNet: (B, 1, X, Y, Z), sides multiples of 32 -> brain probabilities (B, 2, X, Y, Z)."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Sequential(nn.Conv3d(1, 16, 7, 2, 3, bias=False), *_norm_relu(16), nn.MaxPool3d(3, 2, 1))
        self.down0, self.down1 = _Down(16, 16, 1), _Down(16, 32, 2)
        self.down2, self.down3 = _Down(32, 64, 2), _Down(64, 128, 2)
        self.up0, self.up1 = _Up(128, 64, 2), _Up(64, 32, 2)
        self.up2, self.up3 = _Up(32, 16, 2), _Up(16, 16, 1)
        self.tp_conv1 = nn.Sequential(nn.ConvTranspose3d(16, 8, 3, 2, 1, output_padding=1), *_norm_relu(8))
        self.conv = nn.Sequential(nn.Conv3d(8, 8, 3, 1, 1), *_norm_relu(8))
        self.tp_conv2 = nn.ConvTranspose3d(8, 2, 2, 2)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, X, Y, Z) -> the five encoder outputs [(B, C_l, X / s_l, ...)] (see ``STAGES``)."""
        out = [self.init(x)]
        for down in (self.down0, self.down1, self.down2, self.down3):
            out.append(down(out[-1]))
        return out

    def decode(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """Encoder outputs -> brain probabilities (B, 2, X, Y, Z) (softmax over background/brain)."""
        s0, s1, s2, s3, s4 = stages
        y = self.up0(s4) + s3
        y = self.up1(y) + s2
        y = self.up2(y) + s1
        y = self.up3(y) + s0
        return torch.softmax(self.tp_conv2(self.conv(self.tp_conv1(y))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.stages(x))


# -- deepbet's own steps (utils.normalize, BrainExtraction.get_bbox*, keep_largest_connected_component) --
def normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """deepbet's intensity recipe: clip to [low, high] -> [0, 1], z-score, then 0.226 * z + 0.449."""
    x = ((x - low) / (high - low)).clamp(min=0, max=1)
    x = (x - x.mean()) / x.std()
    return 0.226 * x + 0.449


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component of a binary (X, Y, Z) array (as ``cc3d`` with its default
    connectivity); all-False when there is none."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(counts.argmax())


def brain_box(mask_small: torch.Tensor, shape: Sequence[int], margin: float = 0.1,
              threshold: float = 0.02) -> tuple[slice, slice, slice] | None:
    """deepbet's bounding box of the brain found at low resolution, on a grid of ``shape``.

    Planes whose mean mask value exceeds ``threshold`` count as brain; the box is scaled to ``shape``
    and enlarged by ``margin`` of its size on each side. ``None`` when no plane passes.
    """
    rows = [torch.where(mask_small.mean(dims) > threshold)[0] for dims in ((1, 2), (0, 2), (0, 1))]
    if any(r.numel() == 0 for r in rows):
        return None
    center = torch.tensor([(r.max() + 1 + r.min()) / 2 for r in rows])
    size = torch.tensor([(r.max() + 1) - r.min() for r in rows])
    scale = torch.tensor(list(shape)) / torch.tensor(mask_small.shape)
    center, size = scale * center, scale * size
    size = (1 + 2 * margin * torch.ones(3)) * size
    center, size = center.round(), size.round()
    bounds = [[int(c - s / 2), int(c + s / 2)] for c, s in zip(center, size)]
    return tuple(slice(max(0, lo), min(n, hi), 1) for (lo, hi), n in zip(bounds, shape))  # type: ignore[return-value]


# -- the encoder -----------------------------------------------------------------------------------
class DeepBetEncoder(Encoder3D):
    """Pooled encoder stages of deepbet's networks (see the module docstring).

    Args:
        nets: ``{"bbox": DeepBetNet, "brain": DeepBetNet}``.
        info: resolved facts (weights, sha256, levels).
        networks: which networks' stages to use, in order (``bbox``, ``brain``).
        small_shape: grid of the whole-head pass (deepbet: 128^3).
        shape: grid of the brain-box pass (deepbet: 256^3).
        threshold: brain probability threshold of the low-resolution mask (deepbet: 0.5).
        bbox_margin: box enlargement per side, fraction of its size (deepbet: 0.1).
        channel: which volume channel is the T1 (default the first).
    """

    supports_sliding_window = False

    def __init__(self, nets: dict[str, DeepBetNet], info: Encoder3DInfo, networks: Sequence[str],
                 small_shape: Sequence[int] = (128, 128, 128), shape: Sequence[int] = (256, 256, 256),
                 threshold: float = 0.5, bbox_margin: float = 0.1, channel: int | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)
        self.info = info
        self.networks = tuple(networks)
        self.small_shape = tuple(int(s) for s in small_shape)
        self.shape = tuple(int(s) for s in shape)
        self.threshold = float(threshold)
        self.bbox_margin = float(bbox_margin)
        self.channel = channel
        self.last_box: tuple[slice, ...] | None = None  # brain box of the last volume (for inspection)

    def preprocess(self, volume: Volume) -> torch.Tensor:
        """Volume -> (1, 1, X, Y, Z): the T1 in RAS (deepbet's ``as_closest_canonical``), raw intensities,
        NaN -> 0; resizing and intensity happen in :meth:`feature_maps`, as in ``run_model``."""
        return volume_tensor(volume, select_channels(volume, 1, self.channel))[None]

    def feature_info(self) -> list[FeatureLevel3D]:
        out = []
        for net in self.networks:
            for name, channels, stride in STAGES:
                out.append(FeatureLevel3D(len(out), f"{net}.{name}", channels, stride))
        return out

    def _stage_maps(self, raw: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """One raw (X, Y, Z) volume -> {network: its five stage maps (1, C_l, ...)}, run as deepbet does."""
        x = torch.nan_to_num(raw.float())
        small = F.interpolate(x[None, None], self.small_shape, mode="nearest-exact")[0, 0]
        low, high = small.quantile(0.005), small.quantile(0.995)
        if not high > low:  # normalize() would divide 0 by 0: NaN embeddings
            lo, hi = float(x.amin()), float(x.amax())
            if lo == hi:
                raise ValueError(f"{self.info.key}: constant volume (all voxels = {lo:g}): nothing to embed")
            raise ValueError(f"{self.info.key}: the 0.5% and 99.5% intensity quantiles are equal ({float(low):g}; "
                             f"intensities {lo:g} to {hi:g}): almost every voxel has one value, nothing to embed")
        maps: dict[str, list[torch.Tensor]] = {}
        bbox_stages = self.nets["bbox"].stages(normalize(small, low, high)[None, None])
        maps["bbox"] = bbox_stages
        if "brain" in self.networks:
            prob = self.nets["bbox"].decode(bbox_stages)[0, 1]
            mask_small = largest_component((prob > self.threshold).cpu().numpy())
            box = brain_box(torch.from_numpy(mask_small.astype(np.float32)), x.shape, self.bbox_margin)
            if box is None:
                log.warning("%s: deepbet found no brain in the whole-head pass; using the whole volume", self.info.key)
                box = tuple(slice(0, n, 1) for n in x.shape)
            self.last_box = box
            crop = F.interpolate(x[box][None, None], self.shape, mode="nearest-exact")[0, 0]
            maps["brain"] = self.nets["brain"].stages(normalize(crop, low, high)[None, None])
        return maps

    def feature_maps(self, x: torch.Tensor, levels: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Raw (B, 1, X, Y, Z) -> stage maps of the chosen networks [(B, C_l, ...)], level order of
        :meth:`feature_info` (each volume goes through deepbet's own resize/normalise/box steps)."""
        wanted = range(len(self.feature_info())) if levels is None else levels
        per_volume = []
        for raw in x[:, 0]:
            maps = self._stage_maps(raw)
            flat = [m for net in self.networks for m in maps[net]]
            per_volume.append([flat[i] for i in wanted])
        return [torch.cat(parts) for parts in zip(*per_volume)]


def _package_models_dir() -> Path:
    try:
        from deepbet.utils import DATA_PATH
    except ImportError as err:
        raise WeightsUnavailable(f"3d/deepbet: weights=package needs the deepbet package ({err}); {INSTALL_HINT}") from None
    return Path(DATA_PATH) / "models"


def _torchscript_states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    states = {}
    for ours, stem in NETWORKS.items():
        path = folder / f"{stem}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: deepbet network file not found (expected {stem}.pt next to "
                                    f"{'/'.join(f'{s}.pt' for s in NETWORKS.values())})")
        with warnings.catch_warnings():  # torch >= 2.10 deprecates jit.load; deepbet ships TorchScript only
            warnings.simplefilter("ignore", FutureWarning)
            states[ours] = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    return states


@ENCODERS3D.register("3d/deepbet", embed_dim=512, params_m=4.25, source="deepbet (PyPI, MIT)",
                     weights=("package", "random", "file"))
def build_deepbet(weights: str | Path | None = "random", *, networks: Sequence[str] = ("bbox", "brain"),
                  levels: Sequence[int] | int | str | None = None, pooling: str = "avg",
                  small_shape: Sequence[int] = (128, 128, 128), shape: Sequence[int] = (256, 256, 256),
                  threshold: float = 0.5, bbox_margin: float = 0.1, channel: int | None = None,
                  seed: int = 0) -> DeepBetEncoder:
    """deepbet's two networks as a 3D encoder (see the module docstring).

    Args:
        weights: ``package`` (installed deepbet), ``random`` (seeded), a folder with ``bbox_model.pt``
            and ``model.pt``, or a state-dict file with ``bbox_model.*`` / ``model.*`` keys.
        networks: ``bbox`` (whole head, 128^3) and/or ``brain`` (brain box, 256^3), in this order.
        levels: pooled stages, indices into :meth:`DeepBetEncoder.feature_info` (default all).
        pooling: ``avg``, ``max`` or ``gem``.
        small_shape, shape, threshold, bbox_margin: deepbet's ``run_model`` settings (``threshold`` in
            [0, 1), ``bbox_margin`` >= 0; checked here, not per volume).
        channel: the T1 channel of multi-modality volumes.
        seed: random-init seed.
    """
    networks = tuple(networks)
    if not networks or any(n not in NETWORKS for n in networks) or len(set(networks)) != len(networks):
        raise ValueError(f"3d/deepbet: networks must be a non-empty subset of {list(NETWORKS)}, got {list(networks)}")
    for name, size in (("small_shape", small_shape), ("shape", shape)):
        # the deepest stage is 1/32 of the input and instance norm needs more than one voxel there
        if len(size) != 3 or any(int(s) % 32 or int(s) < 32 for s in size) or max(size) < 64:
            raise ValueError(f"3d/deepbet: {name} {tuple(size)} must be three multiples of 32, one at least 64")
    _check_options(pooling, threshold, bbox_margin, channel)
    kind, detail = parse_weights3d(weights)
    nets = {name: seeded(seed + i, DeepBetNet) for i, name in enumerate(NETWORKS)}
    shown, digest = "random", ""
    if kind == "hub":
        raise WeightsUnavailable("3d/deepbet: its weights ship inside the deepbet package, not on a hub; use "
                                 f"weights=package ({INSTALL_HINT}) or a folder with bbox_model.pt and model.pt")
    if kind == "package":
        folder = _package_models_dir()
        states = _torchscript_states(folder)
        shown, digest = f"package:deepbet=={_version()}", sha256_file(folder)
        source_path: Path = folder
    elif kind == "file":
        source_path = Path(detail)
        if source_path.is_dir():
            states = _torchscript_states(source_path)
        else:
            flat = unwrap(read_checkpoint(source_path), ("state_dict",), source_path, "3d/deepbet")
            states = {ours: {k[len(stem) + 1:]: v for k, v in flat.items() if k.startswith(stem + ".")}
                      for ours, stem in NETWORKS.items()}
            stray = [k for k in flat if not k.startswith(tuple(f"{s}." for s in NETWORKS.values()))]
            if stray:
                raise ValueError(f"{source_path}: not the 3d/deepbet layout: keys {stray[:4]} do not start with "
                                 f"'bbox_model.' or 'model.'")
        shown, digest = str(source_path), sha256_file(source_path)
    if kind in ("package", "file"):
        for name, state in states.items():
            load_strict(nets[name], state, source_path, f"3d/deepbet {NETWORKS[name]}",
                        "keys as in deepbet's TorchScript files, e.g. init.0.weight")
    n_levels = 5 * len(networks)
    chosen = resolve_levels(levels, n_levels, "3d/deepbet")
    channels = [c for _ in networks for _, c, _ in STAGES]
    info = Encoder3DInfo(
        key="3d/deepbet", embed_dim=sum(channels[i] for i in chosen), source="deepbet (wwu-mmll, PyPI, MIT)",
        weights=shown, weights_sha256=digest, in_chans=1, spacing=None, input_size=None, size_divisor=32,
        axes="RAS",
        crop=(f"whole head nearest-exact resized to {tuple(small_shape)} (bbox network); brain box from that "
              f"network (+{bbox_margin:.0%} per side) nearest-exact resized to {tuple(shape)} (brain network)"),
        intensity="0.5/99.5% quantiles of the whole-head input to [0, 1], clipped, z-scored, then 0.226*z + 0.449",
        pooling=pooling, levels=chosen,
        checkpoint="deepbet/data/models/{bbox_model,model}.pt (TorchScript); file: bbox_model.* / model.* keys",
        reference="Fisch et al. 2024, deepbet: fast brain extraction of T1-weighted MRI using CNNs",
        extra={"networks": list(networks), "small_shape": list(small_shape), "shape": list(shape),
               "threshold": threshold, "bbox_margin": bbox_margin},
    )
    encoder = DeepBetEncoder({n: nets[n] for n in NETWORKS if n in networks or n == "bbox"}, info, networks,
                             small_shape, shape, threshold, bbox_margin, channel)
    return encoder


def _check_options(pooling: str, threshold: float, bbox_margin: float, channel: int | None) -> None:
    """Refuses, when the encoder is built, the options that would fail (or find no brain) on every volume."""
    if pooling not in ("avg", "max", "gem"):
        raise ValueError(f"3d/deepbet: pooling must be avg, max or gem, got {pooling!r}")
    for name, value, ok, want in (
            ("threshold", threshold, lambda v: 0 <= v < 1, "a brain probability in [0, 1)"),
            # a negative margin shrinks the box, to nothing at -0.5
            ("bbox_margin", bbox_margin, lambda v: 0 <= v < float("inf"), "a fraction >= 0 of the box per side")):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not ok(number):
            raise ValueError(f"3d/deepbet: {name} must be {want}, got {value!r}")
    chosen = [channel] if isinstance(channel, (int, np.integer)) else channel
    if channel is not None and (not isinstance(chosen, (list, tuple)) or len(chosen) != 1 or any(
            isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in chosen)):
        raise ValueError(f"3d/deepbet: channel must be the T1's channel index (>= 0) or null, got {channel!r}")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("deepbet")
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"


def deepbet_available() -> bool:
    """True when the deepbet package (the ``package`` weights) is importable."""
    try:
        import deepbet.utils  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["DeepBetEncoder", "DeepBetNet", "build_deepbet", "brain_box", "deepbet_available", "largest_component",
           "normalize"]

