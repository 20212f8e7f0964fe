"""2D encoders behind one interface; importing this package registers every family."""

from slice2vol.encoders.base import (
    ENCODERS,
    Encoder,
    EncoderConfig,
    EncoderInfo,
    FeatureLevel,
    WeightsUnavailable,
    build_encoder,
    load_state_dict,
    parse_weights,
    pick_batch_size,
    sha256_file,
)

# Families register themselves on import; each import is light (heavy libraries load in builders).
import importlib as _importlib

# ssl2d/<method>: 2D backbones pretrained by slice2vol.ssl, usable by the caching job like any family
for _module in ("slice2vol.encoders.torchvision", "slice2vol.encoders.timm", "slice2vol.encoders.hf",
                "slice2vol.encoders.openclip", "slice2vol.encoders.sam", "slice2vol.encoders.braindino",
                "slice2vol.ssl.encoder2d"):
    try:
        _importlib.import_module(_module)
    except ModuleNotFoundError as _err:
        if _err.name != _module:
            raise

_OPEN = ("slice2vol.encoders.timm", "slice2vol.encoders.openclip", "slice2vol.encoders.hf")


def open_builder(key: str):
    """A builder for a key outside the registry that a family library knows (``timm/<name>``,
    ``openclip/<arch>:<tag>``, ``hf/<repo_id>``), or ``None``."""
    for module_name in _OPEN:
        try:
            module = _importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        builder = module.open_builder(key)
        if builder is not None:
            return builder
    return None


__all__ = ["ENCODERS", "Encoder", "EncoderConfig", "EncoderInfo", "FeatureLevel", "WeightsUnavailable", "build_encoder",
           "load_state_dict", "open_builder", "parse_weights", "pick_batch_size", "sha256_file"]
