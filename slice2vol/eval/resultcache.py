"""Cached evaluation results under ``<out>/cache``: JSON plus ``.npz``, never pickle.

A cached value is a tree of dicts (string keys), lists, strings, numbers, booleans, ``None`` and
numpy arrays. The tree is written as JSON with every array replaced by a reference into one ``.npz``
file beside it; reading parses JSON and loads the arrays with ``allow_pickle=False``, so a file
placed in a results folder by someone else can at worst be a wrong number (a miss is recomputed),
never code. Tuples come back as lists.

Keys are content hashes (:func:`content_key`): the inputs themselves (arrays, resolved configs,
weights sha256) plus :func:`code_version`, derived from the package version and the source of the
evaluation modules, so a code change invalidates results without anyone bumping a constant.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_ARRAY = "__ndarray__"
# modules whose source decides the numbers of a benchmark; report/plot rendering is not cached here
_CODE_DIRS = ("eval", "aggregate")
_NOT_NUMBERS = {"report.py", "plots.py"}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<sha256 prefix of the evaluation and aggregation sources>``."""
    import slice2vol

    root = Path(slice2vol.__file__).resolve().parent
    h = hashlib.sha256()
    for sub in _CODE_DIRS:
        for path in sorted((root / sub).rglob("*.py")):
            if path.name in _NOT_NUMBERS:
                continue
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return f"{getattr(slice2vol, '__version__', '0')}+{h.hexdigest()[:12]}"


def content_key(*parts: Any) -> str:
    """Hash of the parts (arrays by their bytes, dtype and shape; anything else as sorted JSON) and the code."""
    h = hashlib.sha256(code_version().encode())
    for part in parts:
        if isinstance(part, np.ndarray):
            arr = np.ascontiguousarray(part)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=_json_default).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"dtype": obj.dtype.str, "shape": list(obj.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot hash a {type(obj).__name__} in a cache key")


def _encode(value: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OV":
            raise TypeError(f"{where}: object arrays cannot be cached (no pickle)")
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {_ARRAY: name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: cache dict keys must be strings, got {bad[:3]}")
        if _ARRAY in value:
            raise TypeError(f"{where}: the key {_ARRAY!r} is reserved")
        return {k: _encode(v, arrays, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} cannot be cached (plain data and arrays only)")


def _decode(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return arrays[value[_ARRAY]]
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


class ResultCache:
    """Results under ``root`` as ``<kind>-<key>.json`` (+ ``.npz``), keyed by :func:`content_key`.

    ``get`` returns ``None`` for a miss, and also for an unreadable or malformed file (logged, then
    recomputed and overwritten); nothing in a cache file is ever executed.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        return self.root / f"{kind}-{key}.json", self.root / f"{kind}-{key}.npz"

    def get(self, kind: str, key: str) -> Any:
        path, npz = self._paths(kind, key)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("schema") != "slice2vol.cache/1" or "value" not in doc:
                raise ValueError("not a slice2vol cache file")
            if doc.get("arrays"):
                with np.load(npz, allow_pickle=False) as data:
                    arrays = {name: data[name] for name in doc["arrays"]}
            else:
                arrays = {}
            return _decode(doc["value"], arrays)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            log.warning("ignoring cache file %s (%s); recomputing", path, err)
            return None

    def put(self, kind: str, key: str, value: Any) -> None:
        path, npz = self._paths(kind, key)
        arrays: dict[str, np.ndarray] = {}
        encoded = _encode(value, arrays, kind)
        if arrays:
            tmp_npz = npz.with_name(npz.name + ".tmp.npz")
            np.savez(tmp_npz, **arrays)
            os.replace(tmp_npz, npz)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"schema": "slice2vol.cache/1", "kind": kind, "key": key,
                                   "arrays": sorted(arrays), "value": encoded}, allow_nan=True))
        os.replace(tmp, path)


def finite_or_none(v: Any) -> Any:
    """NaN/inf -> None (for strict JSON consumers); anything else unchanged."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
