"""Reading the files of a training run's checkpoint (ours: JSON, safetensors, ``weights_only`` torch
files) with one line naming the file when it is damaged or not what it should be.

A run killed while writing, a truncated copy or a file from elsewhere otherwise ends in a traceback
from safetensors, torch's zip reader or json, none naming the file or saying what to do.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

#: what to do about a damaged file of a run that is being resumed
RESUME_HINT = "use --no-resume (resume=False) or another output folder"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (the message names it)."""


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". ")[0] if len(text) > 160 else text)[:160] or type(err).__name__


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file to read, or None; None too when it is missing (callers word
    that themselves). A named pipe would block the reader for ever, a device never end."""
    from slice2vol.data.io import file_problem

    if not path.exists() and not path.is_symlink():
        return None
    if path.is_dir():
        return "a directory, not a file"
    return file_problem(path)


def _check_file(path: Path, hint: str) -> None:
    """:class:`CheckpointError` for a checkpoint file that is missing or not a regular file."""
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: missing from the checkpoint; {hint}")
    problem = _file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}; {hint}")


def read_json(path: str | Path, hint: str = RESUME_HINT) -> Any:
    """A JSON file of a checkpoint; :class:`CheckpointError` if it is missing, not a regular file or
    not valid JSON."""
    path = Path(path)
    _check_file(path, hint)
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
    _check_file(path, hint)
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors: one line
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({_short(err)}); {hint}") from None


def read_torch_state(path: str | Path, map_location: Any = "cpu", hint: str = RESUME_HINT) -> Any:
    """A torch file saved by this package (tensors, numbers, plain containers), loaded with
    ``weights_only=True``: a pickle from elsewhere is refused, never executed."""
    path = Path(path)
    _check_file(path, hint)
    try:
        with _no_pickle_protocol_warning():
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip reader, unpickler refusals, OS errors: one line
        raise CheckpointError(f"{path}: damaged, or not a checkpoint this package wrote ({_short(err)}); "
                              f"{hint}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@contextlib.contextmanager
def _no_pickle_protocol_warning() -> Iterator[None]:
    """Hides torch's "Detected pickle protocol N in the checkpoint" UserWarning (two lines on stderr,
    naming no file): the safe loader's refusal that follows is reported in one line by the caller."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
        yield


def _kind(path: Path) -> tuple[str, bytes]:
    """(what a weights file is by its first bytes: ``safetensors``, ``torchscript``, ``zip`` (torch's
    format since 1.6), ``pickle`` (torch's legacy format), ``empty`` or ``unknown``; those bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    return _kind_of(path, head), head


def _kind_of(path: Path, head: bytes) -> str:
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "zip"  # a damaged archive: torch's reader says how
        # torch.jit.save writes code/ and constants.pkl beside data.pkl; torch.save only data.pkl + data/
        return "torchscript" if any("/code/" in n or n.endswith("constants.pkl") for n in names) else "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 2 <= n <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


def _named_tensors(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in a checkpoint's (nested) dicts, lists and tuples,
    six levels deep at most (a checkpoint nests a state dict in one or two containers)."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "tensor", obj
    elif depth <= 6 and isinstance(obj, dict):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    elif depth <= 6 and isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{prefix}[{i}]", depth + 1)


def _nan_tensors(obj: Any) -> list[str]:
    """Names of the floating tensors holding NaN in a checkpoint's (nested) containers."""
    return [name for name, t in _named_tensors(obj) if t.is_floating_point() and bool(torch.isnan(t).any())]


def _weight_tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the floating tensors with 2+ dimensions and 2+ values (convolution kernels,
    linear and embedding matrices) in a checkpoint's (nested) containers."""
    return [(name, t) for name, t in _named_tensors(obj) if t.is_floating_point() and t.ndim >= 2 and t.numel() > 1]


def _constant_problem(obj: Any) -> str | None:
    """Why a checkpoint holds no trained weights, or None: every weight matrix and kernel is constant
    (all zeros, an unfilled template, a failed conversion). Such a network gives every slice the
    same features, which later reads as "one scan under several IDs" rather than as the file."""
    weights = _weight_tensors(obj)
    if not weights:
        return None
    values = []
    for _, tensor in weights:
        flat = tensor.detach().reshape(-1)
        first = flat[0]
        if not bool((flat == first).all()):  # NaN never equals itself: the NaN check words that
            return None
        values.append(float(first))
    if len(set(values)) == 1:
        return f"every weight tensor is constant (all {values[0]}): not trained weights"
    return (f"every weight tensor is constant ({len(weights)} tensors, each of a single value, e.g. "
            f"{weights[0][0]} all {values[0]}): not trained weights")


def dtype_problem(module: torch.nn.Module, state: dict[str, Any]) -> str | None:
    """Why ``state`` cannot be copied into ``module`` value for value, or None: tensors that are not
    floating point (integers, booleans, complex) where the module's parameter or buffer is.

    ``load_state_dict`` casts them silently: int32 copies of trained weights lose everything after
    the decimal point (a random init becomes all zeros). Integer buffers of the module itself (e.g.
    BatchNorm's ``num_batches_tracked``) are compared with their own dtype, so they pass.
    """
    own = module.state_dict()
    bad = [(name, state[name].dtype, ref.dtype) for name, ref in own.items()  # in the model's order
           if isinstance(state.get(name), torch.Tensor) and ref.is_floating_point()
           and not state[name].is_floating_point()]
    if not bad:
        return None

    def names(dtypes: set[torch.dtype]) -> str:
        return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))

    return (f"{len(bad)} tensor(s) are {names({b[1] for b in bad})} where the model has "
            f"{names({b[2] for b in bad})} (first: {bad[0][0]})")


def check_dtypes(module: torch.nn.Module, state: dict[str, Any], where: str | Path) -> None:
    """Raises :class:`CheckpointError` (a ``ValueError``) ``"{where}: {dtype_problem}"`` before
    ``state`` is loaded into ``module``; returns silently when every tensor keeps its values."""
    problem = dtype_problem(module, state)
    if problem:
        raise CheckpointError(f"{where}: {problem}")


def read_weights(path: str | Path) -> Any:
    """A published or user weights file, loaded without running any pickled code: safetensors (by its
    content, whatever the suffix), else ``torch.load(weights_only=True)``. Every failure is one
    :class:`ValueError` line naming the file and what it is instead (empty, TorchScript, a pickle of
    Python objects, a damaged archive, no checkpoint at all), without the library's multi-line text.

    A file whose tensors hold NaN (a run that diverged, a damaged conversion) is refused too: every
    slice would fail at the end of its forward pass, one subject after another, with no file named.
    So is one whose every weight matrix and kernel is constant (all zeros): it gives every slice the
    same features. Tensors of the wrong dtype for the model are :func:`check_dtypes`'s business.

    Returns:
        What the file holds (a dict of tensors, or torch's plain containers of tensors and numbers).
    """
    state = _read_weights(Path(path))
    bad = _nan_tensors(state)
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) hold NaN values (first: {bad[0]}); a diverged or damaged "
                         "checkpoint cannot give features")
    problem = _constant_problem(state)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return state


def _read_weights(path: Path) -> Any:
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give the checkpoint file itself")
    problem = _file_problem(path)
    if problem:  # opening a named pipe would wait for a writer for ever
        raise ValueError(f"{path}: {problem}")
    try:
        kind, head = _kind(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or _short(err)})") from None
    if kind == "empty":
        raise ValueError(f"{path}: empty file (0 bytes); not a checkpoint")
    if kind == "torchscript":
        raise ValueError(f"{path}: a TorchScript archive (compiled code, not a state dict); refused, since loading "
                         "it runs its code: save the model's state_dict with torch.save or as safetensors")
    if kind == "safetensors" or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors' own errors: one line
            raise ValueError(f"{path}: not a readable safetensors file ({_short(err)})") from None
    if kind == "unknown":
        raise ValueError(f"{path}: not a checkpoint (neither safetensors, a PyTorch zip archive nor a pickle; "
                         f"it starts with {head[:12]!r})")
    try:
        with _no_pickle_protocol_warning():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip reader, unpickler refusals, OS errors: one line
        text = _ANSI.sub("", " ".join(str(err).split()))
        objects = sorted(set(re.findall(r"(?:Unsupported global|GLOBAL|global) ?:? ?([A-Za-z_][\w.]*\.[A-Za-z_]\w*)",
                                        text)))
        if objects:
            raise ValueError(f"{path}: holds Python objects other than tensors ({', '.join(objects[:3])}); refused, "
                             "since loading them would run pickled code: save its state_dict with torch.save, or "
                             "as safetensors") from None
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        if refused:
            raise ValueError(f"{path}: a pickle that the safe loader refuses ({refused.group(1).strip()[:120]}): not "
                             "written by torch.save, or holding more than tensors; save its state_dict with "
                             "torch.save, or as safetensors") from None
        what = "PyTorch zip archive" if kind == "zip" else "pickle checkpoint"
        reason = text.split(". ")[0][:160] or type(err).__name__
        raise ValueError(f"{path}: damaged {what}, truncated or cut ({reason})") from None


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str | Path,
               hint: str = RESUME_HINT, strict: bool = True) -> Any:
    """``module.load_state_dict(state)``, a shape or key mismatch reported as a run of another config,
    tensors of a non-floating dtype where the module's are floating refused (:func:`check_dtypes`)
    rather than cast."""
    problem = dtype_problem(module, state)
    if problem:
        raise CheckpointError(f"{where}: {problem}; {hint}")
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(f"{where}: saved by a run with another configuration ({detail[:200]}); {hint}") from None
