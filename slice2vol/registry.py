"""One small registry used for encoders, aggregators, SSL methods and probes."""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> builder mapping filled by a decorator.

    Example:
        >>> ENCODERS = Registry("encoder")
        >>> @ENCODERS.register("tv/mobilenet_v2")
        ... def build(**kwargs): ...
        >>> ENCODERS.get("tv/mobilenet_v2")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, dict] = {}

    def register(self, name: str, **meta) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``fn`` under ``name``; extra keywords are kept as metadata."""

        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """Returns the builder for ``name``; unknown names list the close matches."""
        try:
            return self._entries[name]
        except KeyError:
            close = [k for k in self._entries if name.split("/")[-1].lower() in k.lower()]
            hint = f" Did you mean: {', '.join(close[:5])}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}"
            ) from None

    def build(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def meta(self, name: str) -> dict:
        self.get(name)
        return dict(self._meta[name])

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in self._entries if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
