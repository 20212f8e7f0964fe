"""2D encoders behind one interface; importing this package registers every family."""

from slice2vol.encoders.base import (
    ENCODERS,
    Encoder,
    EncoderConfig,
    EncoderInfo,
    WeightsUnavailable,
    build_encoder,
    load_state_dict,
    parse_weights,
    pick_batch_size,
    sha256_file,
)

# Families register themselves on import; each import is light (heavy libraries load in builders).
import importlib as _importlib

for _family in ("torchvision", "timm", "hf", "openclip", "sam"):
    try:
        _importlib.import_module(f"slice2vol.encoders.{_family}")
    except ModuleNotFoundError as _err:
        if _err.name != f"slice2vol.encoders.{_family}":
            raise

__all__ = ["ENCODERS", "Encoder", "EncoderConfig", "EncoderInfo", "WeightsUnavailable", "build_encoder",
           "load_state_dict", "parse_weights", "pick_batch_size", "sha256_file"]
