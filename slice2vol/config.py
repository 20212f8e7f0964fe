"""Typed dataclass configs: defaults in code, YAML files override them, dotted CLI overrides last.

Example:
    >>> cfg = load_config(SliceConfig, "configs/data/default.yaml", ["stride=2", "planes=[axial]"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from slice2vol.inputs import InputFileError, read_input_bytes

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading YAML 1.2 floats too: PyYAML follows YAML 1.1, whose floats need a
    dot and a signed exponent, so ``lr: 1e-3`` or ``p=1e6`` came through as the strings '1e-3', '1e6'.
    A key given twice in one mapping is refused: PyYAML keeps the last silently, so a second
    ``encoders:`` block replaced the first without a word (YAML 1.2 requires unique keys)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            # plain keys only: a merge key (<<) may repeat what it merges, and complex keys are PyYAML's
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (line {first.line + 1} and line "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# only values with an exponent: the ones with a dot (1.5, .5, 1.) are YAML 1.1 floats already
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """The YAML document ``text`` as plain Python values (safe loading; ``1e-3`` is a float).

    Every config file and ``KEY=VALUE`` override is read through it.
    """
    return yaml.load(text, Loader=_ConfigLoader)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except (ConfigError, TypeError, ValueError) as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if tp in (int, float) and isinstance(value, bool):  # `n_folds: true` was read as 1
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[C], data: dict, where: str = "") -> C:
    """Builds dataclass ``cls`` from a (nested) mapping, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:  # was a TypeError traceback naming __init__ ("missing 1 required positional argument")
        raise ConfigError(f"{where or cls.__name__}: missing key(s) {required}")
    kwargs = {k: _coerce(v, hints[k], f"{where or cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def check_whole(where: str, value: Any, low: int, *, none_ok: bool = False) -> None:
    """Refuses ``value`` unless it is a whole number >= ``low`` (or None with ``none_ok``).

    Raises:
        ValueError: ``<where> must be a whole number >= <low>, got <value>``.
    """
    if value is None and none_ok:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        extra = " or null" if none_ok else ""
        raise ValueError(f"{where} must be a whole number >= {low}{extra}, got {value!r}")


def check_real(where: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False) -> None:
    """Refuses ``value`` unless it is a finite real number in the interval (bounds closed unless *_open).

    Raises:
        ValueError: ``<where> must be a number in [low, high], got <value>``.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        if high == math.inf:
            interval = f"{'>' if low_open else '>='} {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{where} must be a finite number {interval}, got {value!r}")


def to_dict(cfg: Any) -> dict:
    """Plain, JSON-able dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(*cfgs: Any, length: int = 12) -> str:
    """Stable short hash of one or more configs (dataclasses or dicts)."""
    parts = [to_dict(c) if dataclasses.is_dataclass(c) else c for c in cfgs]
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Sets ``a.b.0.c = value`` in nested dicts/lists (Hydra-style dotted keys with list indices).

    A numeric part indexes a list that already exists (from the YAML file); a mapping part that does
    not exist yet is created. Indexing past the end of a list, or into a scalar, is refused.
    """
    node: Any = data
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {key!r}: empty key part")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not re.fullmatch(r"-?\d+", part):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i]) or key!r} is a list; "
                                  f"use an index (e.g. {'.'.join(parts[:i] + ['0'] + parts[i:])})")
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"override {key!r}: index {idx} out of range (the list has {len(node)} item(s))")
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = {}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override {key!r}: {where.rsplit('.', 1)[0]!r} is a {type(node).__name__}, "
                              "not a mapping or list")


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[x,y]"]`` -> ``[("a.b", 1), ("c", ["x", "y"])]`` (values parsed as YAML)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. splits.n_folds=5 or encoders.0.weights=hub)")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({one_line(err)})") from None
        out.append((key.strip(), value))
    return out


def blame_override(err: ConfigError, overrides: Sequence[str]) -> ConfigError:
    """``err`` naming the ``KEY=VALUE`` override that caused it, when one did: an unknown key the
    override brought in (``splits.n_fold=3``), or a bad value at the override's key. Otherwise ``err``."""
    text = str(err)
    found = re.search(r"unknown key\(s\) \[([^\]]*)\]", text)
    unknown = set(re.findall(r"'([^']*)'", found.group(1))) if found else set()
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if unknown & set(key.split(".")) or f".{key}:" in text:
            return ConfigError(f"override {item!r}: {text}")
    return err


def config_error(err: ValueError, where: str, overrides: Sequence[str]) -> ConfigError:
    """The error of building a config from ``where`` (a file, or the class name): a type or key error
    (:class:`ConfigError`, already located) names the override that caused it; a section's own range
    check (``train.steps must be a whole number >= 1, got 0``) also names the file, which it cannot know."""
    if isinstance(err, ConfigError):
        return blame_override(err, overrides)
    text = str(err)
    blamed = next((item for item in overrides if text.startswith(item.split("=", 1)[0].strip() + " ")), None)
    return ConfigError(f"{where}: " + (f"override {blamed!r}: " if blamed else "") + text)


def one_line(err: BaseException) -> str:
    """An error's text on one line (YAML parse errors span several, with a caret under the spot)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and line.strip() != "^"]
    return " ".join(lines)[:300] or type(err).__name__


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``key.sub.0=value`` overrides to a plain (YAML-loaded) dict in place and returns it."""
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return data


#: the package-data copy of the repository's ``configs/`` folder (a link to it in a checkout)
PACKAGED_CONFIGS = "_configs"


def packaged_configs() -> Path:
    """The folder of configs shipped inside the installed package (``slice2vol/_configs``).

    In a checkout (or an editable install) it is a link to the top-level ``configs/`` folder that users
    edit; a wheel holds a copy of it, so ``slice2vol demo`` works from any folder after ``pip install``.
    """
    from importlib import resources

    root = resources.files("slice2vol").joinpath(PACKAGED_CONFIGS)
    path = Path(str(root))
    if not path.is_dir():
        raise ConfigError(f"{path}: the packaged configs are missing (reinstall slice2vol)")
    return path


def resolve_config_path(value: str | Path) -> Path:
    """A config named on the command line -> its file.

    In order: an existing file (absolute, or relative to the working directory); then the packaged
    configs, by path relative to ``configs/`` with or without that prefix and ``.yaml``
    (``experiments/demo``, ``experiments/demo.yaml`` and ``configs/experiments/demo.yaml`` all work
    from any folder).

    Raises:
        ConfigError: nothing matches; the message lists where it looked.
    """
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        return path  # a file, or a pipe (<(...)): load_config reads it once, or says why it cannot
    rel = Path(*[p for p in path.parts if p not in ("/",)])
    if rel.parts and rel.parts[0] == "configs":
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    try:
        root = packaged_configs()
    except ConfigError:
        root = None
    if root is not None and not path.is_absolute() and rel.parts:
        for candidate in (root / rel, root / rel.with_suffix(rel.suffix or ".yaml")):
            if candidate.is_file():
                return candidate
    where = f"; nor under the packaged configs {root}" if root is not None else ""
    raise ConfigError(f"{value}: config file not found (looked in {Path.cwd()}{where})")


def read_yaml(path: Path) -> Any:
    """The YAML document of the config file (or pipe) ``path``, read once; every problem is a one-line
    :class:`ConfigError` naming the file (a named pipe without a writer is refused, not waited on)."""
    try:
        doc = load_yaml(read_input_bytes(path, "config").decode("utf-8-sig"))
    except InputFileError as err:
        raise ConfigError(str(err)) from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config ({one_line(err)})") from None
    if doc is None:  # a truncated or wrong file ran silently on every default; `{}` still says "defaults"
        raise ConfigError(f"{path}: the config file is empty (no YAML document, only blanks or comments); "
                          "write `{}` to mean every default")
    return doc


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), section: str | None = None
) -> C:
    """Dataclass defaults <- YAML file (optionally one top-level ``section``) <- ``key.sub=value`` overrides.

    Overrides follow Hydra's syntax: dotted keys, list indices (``encoders.0.weights=hub``), YAML values
    (``tasks=[knn,linear]``). This is the one override syntax of every ``slice2vol`` command.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml(path) or {}
        if section is not None:
            loaded = loaded.get(section, {}) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data.update(loaded)
    apply_overrides(data, overrides)
    where = str(path) if path is not None else cls.__name__
    try:
        return from_dict(cls, data, where)
    except ValueError as err:
        raise config_error(err, where, overrides) from None
