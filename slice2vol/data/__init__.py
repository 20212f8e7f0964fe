"""Volume loading, slicing, cohorts (manifests, BIDS globs) and the synthetic default cohort."""

from slice2vol.data.io import Volume, VolumeConfig, VolumeError, load_volume, read_nifti
from slice2vol.data.manifest import (
    Cohort,
    Failure,
    ManifestError,
    Subject,
    cohort_from_glob,
    load_manifest,
    load_subject,
)
from slice2vol.data.slicing import PLANES, PlaneSlices, SliceConfig, slice_volume, slices_to_grid

__all__ = [
    "PLANES", "Cohort", "Failure", "ManifestError", "PlaneSlices", "SliceConfig", "Subject", "Volume",
    "VolumeConfig", "VolumeError", "cohort_from_glob", "load_manifest", "load_subject", "load_volume",
    "read_nifti", "slice_volume", "slices_to_grid",
]
