"""slice2vol: 2D foundation models versus native-3D encoders on brain MRI.

The package owns the whole path from NIfTI volumes to benchmark tables: volume loading and slicing
(:mod:`slice2vol.data`), 2D encoders (:mod:`slice2vol.encoders`), the HDF5 feature store
(:mod:`slice2vol.cache`), slice-to-volume aggregation (:mod:`slice2vol.aggregate`), native-3D
self-supervised baselines (:mod:`slice2vol.ssl`), the benchmark (:mod:`slice2vol.eval`) and
retrieval (:mod:`slice2vol.retrieval`). Heavy libraries are imported lazily inside builders.
"""

__version__ = "0.1.0"
