"""slice2vol: 2D foundation models versus native-3D encoders on brain MRI.

The package owns the whole path from NIfTI volumes to benchmark tables: volume loading and slicing
(:mod:`slice2vol.data`), 2D encoders (:mod:`slice2vol.encoders`), the HDF5 feature store
(:mod:`slice2vol.cache`), slice-to-volume aggregation (:mod:`slice2vol.aggregate`), native-3D
self-supervised baselines (:mod:`slice2vol.ssl`), the benchmark (:mod:`slice2vol.eval`) and
retrieval (:mod:`slice2vol.retrieval`). Heavy libraries are imported lazily inside builders.

The public API (:mod:`slice2vol.api`, docs/api.md) is reachable from here and loaded on first use,
so ``import slice2vol`` imports nothing heavy::

    import slice2vol as s2v
    cohort = s2v.load_cohort("runs/cohort/manifest.csv")
    table = s2v.evaluate(X, cohort.labels()["lesion"])
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"

#: public names, each loaded from :mod:`slice2vol.api` on first attribute access (PEP 562)
_API = ("load_cohort", "build_encoder", "cache_cohort", "FeatureStore", "aggregate", "evaluate")

__all__ = ["__version__", *_API]


class _CallableAggregate(_types.ModuleType):
    """The subpackage :mod:`slice2vol.aggregate`, also callable as :func:`slice2vol.api.aggregate`.

    ``slice2vol.aggregate`` names both the aggregation subpackage and the API function; importing the
    subpackage makes Python bind the module to that attribute, so the module itself is made callable.
    """

    def __call__(self, *args, **kwargs):
        from slice2vol.api import aggregate

        return aggregate(*args, **kwargs)


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        # the import system binds a loaded subpackage to its parent with setattr: catch slice2vol.aggregate
        if name == "aggregate" and type(value) is _types.ModuleType:
            value.__class__ = _CallableAggregate
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "aggregate":
        import slice2vol.aggregate  # noqa: F401 - binds the (callable) subpackage to this attribute

        return _sys.modules["slice2vol.aggregate"]
    if name in _API:
        from slice2vol import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'slice2vol' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
