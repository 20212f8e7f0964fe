"""Reading the files of a training run's checkpoint (ours: JSON, safetensors, ``weights_only`` torch
files) with one line naming the file when it is damaged or not what it should be.

A run killed while writing, a truncated copy or a file from elsewhere otherwise ends in a traceback
from safetensors, torch's zip reader or json, none naming the file or saying what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: what to do about a damaged file of a run that is being resumed
RESUME_HINT = "use --no-resume (resume=False) or another output folder"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (the message names it)."""


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". ")[0] if len(text) > 160 else text)[:160] or type(err).__name__


def read_json(path: str | Path, hint: str = RESUME_HINT) -> Any:
    """A JSON file of a checkpoint; :class:`CheckpointError` if it is missing or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: damaged ({_short(err)}); {hint}") from None


def read_safetensors(path: str | Path, hint: str = RESUME_HINT) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of tensors; :class:`CheckpointError` if missing or damaged."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint; {hint}")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors: one line
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({_short(err)}); {hint}") from None


def read_torch_state(path: str | Path, map_location: Any = "cpu", hint: str = RESUME_HINT) -> Any:
    """A torch file saved by this package (tensors, numbers, plain containers), loaded with
    ``weights_only=True``: a pickle from elsewhere is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint; {hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip reader, unpickler refusals, OS errors: one line
        raise CheckpointError(f"{path}: damaged, or not a checkpoint this package wrote ({_short(err)}); "
                              f"{hint}") from None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str | Path,
               hint: str = RESUME_HINT, strict: bool = True) -> Any:
    """``module.load_state_dict(state)``, a shape or key mismatch reported as a run of another config."""
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(f"{where}: saved by a run with another configuration ({detail[:200]}); {hint}") from None
