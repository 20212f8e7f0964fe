"""Volume loading: NIfTI -> checked, RAS-oriented, resampled, intensity-normalised arrays.

Every problem with an input file raises :class:`VolumeError` whose message is one line that starts
with the file path, so cohort-level jobs can record it and go on with the other subjects.

Array convention: ``Volume.data`` has shape ``(C, X, Y, Z)`` in RAS+ voxel order (index increases
towards patient Right, Anterior, Superior), ``C`` being the modalities in manifest order.

Oblique acquisitions (voxel axes rotated away from the scanner axes, common in clinical MRI) are
resliced by default onto the nearest RAS-aligned grid (:func:`nearest_ras_grid`) with
:func:`nibabel.processing.resample_from_to`, so that axial, coronal and sagittal slices are truly
axial, coronal and sagittal; ``VolumeConfig.oblique`` chooses ``snap`` (permute/flip only, the old
behaviour) or ``refuse`` instead. See ``docs/data.md`` for every rule and bad-input message.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import errno
import hashlib
import logging
import math
import os
import stat
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Sequence

import nibabel as nib
from nibabel.tripwire import TripWireError
import numpy as np

ORIENTATION = ("R", "A", "S")
ObliquePolicy = Literal["reslice", "snap", "refuse"]
OBLIQUE_POLICIES = ("reslice", "snap", "refuse")


class VolumeError(ValueError):
    """A volume file that cannot be used; the message is ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{printable_path(path)}: {problem}")


def printable_path(path: str | Path) -> str:
    """``path`` for a one-line message: as it is, unless it holds control characters (a newline, tab
    or CR is legal in a Linux file name), which are escaped as Python writes them (``bad\\nname``) so
    that the message stays one line and a CR does not overwrite it on a terminal."""
    text = str(path)
    if not any(ord(c) < 32 or ord(c) == 127 for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in text)


@dataclass
class VolumeConfig:
    """How a NIfTI file becomes a normalised array.

    Attributes:
        spacing: target voxel size in mm (x, y, z); ``None`` keeps the file's grid.
        clip_percentiles: intensities are clipped to these percentiles of the non-zero voxels
            (to the channel's minimum and maximum when those percentiles coincide).
        normalize: ``minmax`` scales the clipped range to [0, 1]; ``zscore`` additionally
            standardises with the mean/std inside the foreground mask; ``none`` keeps raw values.
        crop_foreground: crop to the foreground bounding box plus ``crop_margin`` voxels.
        oblique: what to do with a volume whose voxel axes are more than ``max_obliquity_deg`` off
            the nearest scanner axes: ``reslice`` (default) interpolates it (``reslice_order``; label
            maps nearest-neighbour) onto the nearest RAS-aligned grid with the same voxel sizes,
            covering the whole rotated field of view; ``snap`` only permutes/flips the axes, so slices
            are cut along the tilted voxel axes (their world positions stay exact); ``refuse`` raises
            :class:`VolumeError`.
        reslice_order: spline order of that interpolation: 3 (cubic B-spline, nibabel's default;
            keeps edges sharper) or 1 (trilinear, about 4x faster).
        max_obliquity_deg: obliquity below this is treated as axis-aligned (float rounding in
            headers); the volume is then only permuted/flipped.
        min_spacing, max_spacing: voxel sizes (mm) outside this range are refused as absurd.
        min_fov_mm, max_fov_mm: the field of view (voxels x voxel size per axis) must reach
            ``min_fov_mm`` along its longest axis and stay within ``max_fov_mm`` along every axis: a
            head is 100-250 mm; 2 x 2 x 2 voxels of noise or a scan whose header says 0.05 mm voxels
            (6 mm across) is no head, and would be embedded and retrieved like one.
        min_voxels: a file with fewer voxels than this along an axis is refused (0 or 1 turns the
            check off): a 2 x 2 x 2 block of 20 mm voxels spans 40 mm, a cube, and passed every
            other check to be upsampled and embedded like a head; a whole head has >= 8 slices along
            every axis at any spacing a scanner writes (the slab check refuses thin stacks first).
        min_foreground_fraction: a volume whose foreground mask covers less of its grid than this is
            refused (0 turns the check off): a head covers 10-60% of its grid; a few specks in a blank
            volume are no head.
        max_foreground_fraction: a volume whose foreground mask covers more of its grid than this is
            refused (1 turns the check off): a head leaves air around it (IXI T1s 29-45%,
            ``scripts/reproduce/label_maps.py``); uniform noise or an image stored inverted (the air
            brightest) fill the grid.
        refuse_label_maps: refuse an image that is piecewise constant on 1 to 1,024 integer values
            (:func:`label_map_problem`): a segmentation (DLMUSE, FreeSurfer aseg), a tissue map or a
            binary brain mask put in an image column passed every other check and was embedded as a head.
        min_extent_ratio: the field of view's shortest axis must reach this fraction of its longest
            (0 turns the check off): a localizer/scout of 3 slices (230 x 230 x 30 mm, 0.13) or a
            thin slab is no whole head, yet fills every plane like one; a whole-head scan is 0.5-1,
            a high-resolution partial-coverage slab 0.2-0.4.
        allow_oblique: deprecated (init only): ``True`` means ``oblique="snap"``, ``False``
            ``oblique="refuse"``.
    """

    spacing: tuple[float, float, float] | None = None
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    normalize: Literal["minmax", "zscore", "none"] = "minmax"
    crop_foreground: bool = False
    crop_margin: int = 4
    oblique: ObliquePolicy = "reslice"
    reslice_order: int = 3
    max_obliquity_deg: float = 1.0
    min_spacing: float = 0.05
    max_spacing: float = 20.0
    min_fov_mm: float = 10.0
    max_fov_mm: float = 1000.0
    min_extent_ratio: float = 0.2
    min_voxels: int = 8
    min_foreground_fraction: float = 0.01
    max_foreground_fraction: float = 0.9
    refuse_label_maps: bool = True
    allow_oblique: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, allow_oblique: bool | None) -> None:
        if allow_oblique is not None:
            warnings.warn("VolumeConfig(allow_oblique=...) is deprecated; use oblique='snap' | 'refuse' | "
                          "'reslice'", DeprecationWarning, stacklevel=3)
            self.oblique = "snap" if allow_oblique else "refuse"
        # every field is checked here: YAML and ``--volume`` hand over strings for numbers it does not
        # read as such ('1e9', 'inf'), and an unknown ``normalize`` used to fall through to min-max
        if self.oblique not in OBLIQUE_POLICIES:
            raise ValueError(f"oblique must be one of {OBLIQUE_POLICIES}, got {self.oblique!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        for name in ("crop_foreground", "refuse_label_maps"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        self.reslice_order = _number("reslice_order", self.reslice_order, whole=True)
        if self.reslice_order not in (1, 3):
            raise ValueError(f"reslice_order must be 1 (trilinear) or 3 (cubic), got {self.reslice_order!r}")
        for name in ("min_spacing", "max_spacing", "min_fov_mm", "max_fov_mm", "max_obliquity_deg",
                     "min_extent_ratio", "min_foreground_fraction", "max_foreground_fraction"):
            setattr(self, name, _number(name, getattr(self, name)))
        for name in ("crop_margin", "min_voxels"):
            setattr(self, name, _number(name, getattr(self, name), whole=True))
        for name in ("min_spacing", "max_spacing", "crop_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not self.min_spacing < self.max_spacing:
            raise ValueError(f"min_spacing ({self.min_spacing:g} mm) must be below max_spacing ({self.max_spacing:g} mm)")
        if not 0 < self.min_fov_mm < self.max_fov_mm:
            raise ValueError(f"min_fov_mm and max_fov_mm must satisfy 0 < min_fov_mm < max_fov_mm, got "
                             f"{self.min_fov_mm:g} and {self.max_fov_mm:g}")
        if not 0 <= self.max_obliquity_deg < 90:
            # below 0 every straight scan was resliced with a cubic spline
            raise ValueError(f"max_obliquity_deg must be in [0, 90), got {self.max_obliquity_deg:g}")
        if self.spacing is not None:
            if isinstance(self.spacing, (int, float, str)) and not isinstance(self.spacing, bool):
                self.spacing = (self.spacing,) * 3  # one number: isotropic (``spacing: 2`` in a config)
            try:
                spacing = tuple(_number("spacing", v) for v in self.spacing)
            except (TypeError, ValueError):
                raise ValueError(f"spacing must be 3 voxel sizes of {self.min_spacing:g}-{self.max_spacing:g} mm "
                                 f"(or one, isotropic), got {self.spacing!r}") from None
            # the range a loaded file's own spacing must lie in: anything else is a typo (0.01 mm would
            # resample a head into 10^10 voxels, -1 into one voxel, 0 used to be ignored)
            if len(spacing) != 3 or not all(self.min_spacing <= v <= self.max_spacing for v in spacing):
                raise ValueError(f"spacing must be 3 voxel sizes of {self.min_spacing:g}-{self.max_spacing:g} mm, "
                                 f"got {self.spacing}")
            self.spacing = spacing
        if self.min_voxels < 0:
            raise ValueError(f"min_voxels must be a whole number >= 0, got {self.min_voxels!r}")
        if not 0 <= self.min_foreground_fraction <= 1:
            raise ValueError(f"min_foreground_fraction must be a number in [0, 1], got {self.min_foreground_fraction!r}")
        top = self.max_foreground_fraction
        if not self.min_foreground_fraction < top <= 1:
            raise ValueError(f"max_foreground_fraction must be a number in (min_foreground_fraction, 1], got {top!r}")
        if not 0 <= self.min_extent_ratio <= 1:
            raise ValueError(f"min_extent_ratio must be a number in [0, 1], got {self.min_extent_ratio!r}")
        try:
            lo, hi = (_number("clip_percentiles", v) for v in self.clip_percentiles)
        except (TypeError, ValueError):
            raise ValueError(f"clip_percentiles must be two numbers, low and high, got {self.clip_percentiles!r}") from None
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")
        self.clip_percentiles = (lo, hi)


#: ``VolumeConfig.normalize`` values
NORMALIZATIONS = ("minmax", "zscore", "none")


def _number(name: str, value: Any, whole: bool = False) -> float | int:
    """``value`` as a finite number (a numeric string such as ``'1e9'``, which YAML leaves a string,
    included); ``whole``: an int. Raises ValueError naming the setting ``name``."""
    what = "a whole number" if whole else "a finite number"
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if not math.isfinite(number) or (whole and number != int(number)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(number) if whole else number


@dataclass
class Volume:
    """One subject's image(s) on a common RAS grid.

    Attributes:
        subject_id: identifier from the manifest (file stem for a bare file).
        data: float32 array of shape (C, X, Y, Z).
        affine: (4, 4) voxel -> world (mm, RAS) matrix of ``data``.
        mask: bool array of shape (X, Y, Z), the foreground (head) mask.
        seg: optional integer label map of shape (X, Y, Z), aligned with ``data``.
        modalities: names of the C channels.
        sources: the files read, in channel order.
        original_orientation: axis codes of the file before reorientation, e.g. ``("P", "S", "R")``.
        original_shape: spatial shape of the file before any transform.
        maps: other aligned label maps (e.g. a lesion mask), name -> (X, Y, Z) array.
        obliquity_deg: how far the file's voxel axes were from the nearest scanner axes.
        oblique_action: ``none`` (within ``max_obliquity_deg``), ``resliced`` or ``snapped``.
    """

    subject_id: str
    data: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None = None
    modalities: tuple[str, ...] = ("image",)
    sources: tuple[str, ...] = ()
    original_orientation: tuple[str, ...] = ORIENTATION
    original_shape: tuple[int, ...] = ()
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    obliquity_deg: float = 0.0
    oblique_action: str = "none"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore

    @property
    def orientation(self) -> tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.affine))


def read_nifti(path: str | Path, *, check_values: bool = True) -> nib.Nifti1Image:
    """Opens a NIfTI file and checks that it is one usable 3D volume.

    Returns an image whose data is 3D (a 4D file holding one volume is squeezed) and whose affine is
    in mm (a header in meters or microns, ``xyzt_units``, is converted: :func:`_in_mm`). Raises
    :class:`VolumeError` for a missing, truncated or non-NIfTI file, 2D or multi-volume 4D data,
    broken spacing, and (with ``check_values``) NaN/Inf, empty or constant data.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise VolumeError(path, problem)
    if path.name.lower().endswith((".hdr", ".img", ".hdr.gz", ".img.gz")):
        raise VolumeError(path, "a NIfTI-1/Analyze .hdr/.img pair: convert it to one .nii.gz file first, e.g. "
                                "nibabel.save(nibabel.load('x.hdr'), 'x.nii.gz')")
    problem = _raw_header_problem(path)
    if problem:
        raise VolumeError(path, problem)
    try:
        # nibabel logs the header fields it repairs (to stderr, several lines); what matters is checked here
        with _quiet_nibabel():
            img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError as err:
        raise VolumeError(path, _cut_header(path) or f"not a NIfTI image ({_short(err)})") from None
    except nib.spatialimages.HeaderDataError as err:  # e.g. an unknown datatype or dim[0] code
        raise VolumeError(path, f"invalid NIfTI header ({_short(err)})") from None
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise VolumeError(path, _qform_problem(err) or _cut_header(path) or f"unreadable ({_short(err)})") from None
    except TripWireError:  # nibabel's stand-in for an optional package it lacks (zstd)
        raise VolumeError(path, "a .zst file needs the package backports.zstd to be read "
                                "(pip install backports.zstd), or decompress it") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        hint = (": convert it first, e.g. mri_convert x.mgz x.nii.gz, or nibabel.save(nibabel.Nifti1Image("
                "img.get_fdata(), img.affine), 'x.nii.gz')" if isinstance(img, nib.MGHImage) else "")
        raise VolumeError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__}){hint}")
    problem = _header_problem(path, img) or _memory_problem(img)
    if problem:
        raise VolumeError(path, problem)
    try:
        img = _whole_stream(path, img)
    except VolumeError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise VolumeError(path, _qform_problem(err) or f"truncated or corrupt data ({_short(err)})") from None
    shape = img.shape
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):  # one volume stored as 4D (x, y, z, 1), or 5D
        # the file's own class: a NIfTI-2 header under Nifti1Image printed two header repairs that named no file
        img = type(img)(np.asanyarray(img.dataobj)[(...,) + (0,) * (len(shape) - 3)], img.affine, img.header)
        shape = img.shape
    if len(shape) == 4:
        raise VolumeError(path, f"4D data with {shape[3]} volumes (shape {_fmt_shape(shape)}); "
                                "expected one 3D volume")
    if len(shape) != 3:
        raise VolumeError(path, f"{len(shape)}D data of shape {_fmt_shape(shape)}; expected a 3D volume")
    if min(shape) < 2:
        flat = [axis for axis, n in zip("xyz", shape) if n < 2]
        raise VolumeError(path, f"a single slice, not a volume (shape {_fmt_shape(shape)}: one voxel along "
                                f"{', '.join(flat)}); expected a 3D volume with at least 2 voxels per axis")
    # the file's own codes and qform: _in_mm rebuilds the image from its affine, which nibabel stores
    # as an sform (code 2) and so hides a file without one
    qcode, scode = int(img.header["qform_code"]), int(img.header["sform_code"])
    qform, q_broken = _usable_qform(img) if qcode > 0 else (None, None)
    with np.errstate(all="ignore"):
        sform = img.get_sform()
    img = _in_mm(img)
    try:
        _check_affine(path, img.affine, _unit_of(img))
    except VolumeError as err:
        if scode > 0 and qform is not None and _affine_ok(path, _to_mm(qform, _unit_of(img)), _unit_of(img)):
            raise VolumeError(path, f"the sform (code {scode}) is broken: {err.problem}; the qform is usable: "
                                    "drop the sform (nibabel: img.set_sform(None, code=0))") from None
        raise
    if scode == 0:
        raw = _raw_pixdim(path, img)
        if raw is not None and np.any(raw == 0):
            # nibabel replaces a zero voxel size by 1 mm, and without an sform the affine is built from
            # pixdim (the qform's scales, or all there is): a 2 mm scan would be read as 1 mm
            raise VolumeError(path, f"voxel size {_fmt_mm(raw)} mm in pixdim, and "
                                    + ("no sform (the qform's voxel sizes are pixdim)" if qcode else "no qform or sform")
                                    + ": the voxel spacing is unknown")
    if qcode == 0 and scode == 0:
        # the NIfTI standard's "method 1": voxel indices only. nibabel then guesses LAS from pixdim, so
        # a scan stored in another order gets its planes mislabelled; said once per file, not refused
        # (old converters wrote such files for correctly ordered data)
        _warn_once(path, "no-xform", "%s: no qform or sform (both codes 0): the orientation is unknown and read as "
                   "nibabel's default (LAS, from pixdim); axial/coronal/sagittal are wrong unless the voxels are "
                   "stored in that order: set the sform (nibabel: img.set_sform(affine, code=1))")
    elif qcode > 0 and scode > 0 and q_broken:
        # nibabel reads the sform and ignores the qform, so the file loads; a tool that prefers the
        # qform would fail on it or show garbage
        _warn_once(path, "q-broken", f"%s: the qform (code {qcode}) is broken ({q_broken}); read with the sform, "
                   "as nibabel does: fix the qform or set qform_code 0")
    elif qcode > 0 and scode > 0:
        with np.errstate(all="ignore"):
            q_axes, s_axes = (nib.aff2axcodes(a) for a in (qform, sform))
        if q_axes != s_axes:
            # nibabel (and so this package) reads the sform; a tool that prefers the qform (ITK's older
            # readers, some viewers) shows the other hemisphere or plane: worth a line, not a refusal
            _warn_once(path, "q-s", f"%s: the qform ({''.join(q_axes)}) and sform ({''.join(s_axes)}) disagree "
                       "on the orientation; read with the sform, as nibabel does: check the left-right and set "
                       "both to the same affine")
        else:
            gap = _xform_gap(qform, sform)
            if gap:
                # same orientation letters, but other voxel sizes or axes rotated: a tool that prefers the
                # qform reads another scale or tilt (fuzz round 23: 2 mm vs 1 mm was read as 1 mm unsaid)
                _warn_once(path, "q-s-gap", f"%s: the qform and sform disagree ({gap}); read with the sform, as "
                           "nibabel does: check which is right and set both to the same affine")
    if check_values:
        try:
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # reported below, in one line
                data = img.get_fdata(dtype=np.float32)
        except (OSError, EOFError, zlib.error, ValueError) as err:
            raise VolumeError(path, f"truncated or corrupt data ({_short(err)})") from None
        except MemoryError:
            raise VolumeError(path, f"too large to load: shape {_fmt_shape(img.shape)} needs "
                                    f"{_fmt_bytes(4 * np.prod(img.shape, dtype=np.float64))} as float32") from None
        problem = _float32_range_problem(img, data)
        if problem:
            raise VolumeError(path, problem)
        try:
            check_values_ok(path, data)
        except VolumeError:
            # only then: whether the header's scaling made the NaN/Inf (no second pass on good volumes)
            problem = _scaling_problem(img, data)
            if problem:
                raise VolumeError(path, problem) from None
            raise
    return img


#: NIfTI ``xyzt_units`` spatial codes (its low 3 bits) other than mm (2): name and factor to mm. Unknown
#: (0), the code many writers leave, and undefined codes are read as mm, as nibabel and most tools do
_XYZ_UNITS = {1: ("meters", 1000.0), 3: ("microns", 1e-3)}


def _in_mm(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """``img`` with its affine (voxel sizes and origin) in mm, when its header gives them in meters or
    microns; ``img.extra["xyz_unit"]`` then holds ``(unit name, factor)`` for messages.

    nibabel ignores ``xyzt_units``: a legal 2 mm scan stored in meters read as 0.002 mm voxels (and
    was refused as absurd), one saying 2 µm voxels as 2 mm (and was embedded like a head). Every
    reader of a file goes through :func:`read_nifti`, so converting here puts the spacing checks,
    reorientation, reslicing and resampling on the physical grid.
    """
    code = int(img.header["xyzt_units"])
    if code & 0x07 not in _XYZ_UNITS:
        return img
    name, factor = _XYZ_UNITS[code & 0x07]
    affine = _to_mm(img.affine, (name, factor))
    header = img.header.copy()
    header["xyzt_units"] = (code & ~0x07) | 2  # mm, the time unit kept
    return type(img)(img.dataobj, affine, header, extra={**img.extra, "xyz_unit": (name, factor)})


def _unit_of(img: nib.Nifti1Image) -> tuple[str, float] | None:
    """``(unit name, factor to mm)`` of a file :func:`_in_mm` converted, else None."""
    return img.extra.get("xyz_unit")


def _unit_note(spacing: Sequence[float], unit: tuple[str, float] | None) -> str:
    """``"pixdim 2 in microns, xyzt_units"``: the header's own voxel size, for a spacing converted to
    mm (empty for a file in mm), so that a message about it names what the file says."""
    if unit is None:
        return ""
    name, factor = unit
    stored = [f"{float(v) / factor:.4g}" for v in spacing]
    shown = stored[0] if len(set(stored)) == 1 else f"({', '.join(stored)})"
    return f"pixdim {shown} in {name}, xyzt_units"


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be opened as a volume file, or None: missing (a dangling link names its
    target), a link loop, a directory, or not a regular file (a named pipe would block the reader
    forever, a device or socket never end)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        return "file not found"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop (the link points back at itself)"
        return f"unreadable ({err.strerror or _short(err)})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a NIfTI file"
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"{kind}, not a regular file"
    if not os.access(path, os.R_OK):
        # nibabel's words were "Could not read file", and `info` called the file "not a NIfTI image"
        return "unreadable (Permission denied)"
    return None


def _scaling_problem(img: nib.Nifti1Image, data: np.ndarray) -> str | None:
    """NaN/Inf voxels made by the header's scaling (``scl_slope``/``scl_inter``) from finite stored values."""
    # nibabel moves the scaling from the header into the array proxy when it loads a file
    slope, inter = (float(np.asarray(getattr(img.dataobj, name, default)).ravel()[0])
                    for name, default in (("slope", 1.0), ("inter", 0.0)))
    if slope == 1 and not inter:
        return None
    stored = np.asanyarray(img.dataobj.get_unscaled()) if hasattr(img.dataobj, "get_unscaled") else None
    if stored is None or (stored.dtype.kind == "f" and not np.isfinite(stored).all()):
        return None  # NaN/Inf stored as such: check_values_ok says so
    if np.isfinite(data).all():
        if data.size and data.min() == data.max() and stored.min() != stored.max():
            # e.g. scl_inter 3e38: float32 has no room left for the stored values' differences
            return (f"the header's scaling (scl_slope {slope:g}, scl_inter {inter:g}) turns the stored values "
                    f"({stored.min():g} to {stored.max():g}) into one constant ({float(data.flat[0]):g}) in float32: "
                    "fix scl_slope/scl_inter")
        return None
    bad = int((~np.isfinite(data)).sum())
    return (f"{bad} NaN/Inf voxels ({_percent(bad / data.size)} of the volume) made by the header's scaling "
            f"(scl_slope {slope:g}, scl_inter {inter:g}) of finite stored values: fix scl_slope/scl_inter")


def _float32_range_problem(img: nib.Nifti1Image, data: np.ndarray) -> str | None:
    """Finite float64 voxels that float32 (what everything computes in) turns into Inf or 0."""
    if img.get_data_dtype().itemsize < 8 or img.get_data_dtype().kind != "f":
        return None
    overflow = not np.isfinite(data).all()
    underflow = not overflow and not data.any()
    if not (overflow or underflow):
        return None
    raw = np.asanyarray(img.dataobj, dtype=np.float64) if hasattr(img.dataobj, "dtype") else None
    if raw is None or not np.isfinite(raw).all() or not raw.any():
        return None  # real NaN/Inf or real zeros: check_values_ok says so
    extreme = np.abs(raw[raw != 0])
    if overflow:
        return f"float64 values up to {extreme.max():.3g} do not fit in float32 (max 3.4e+38); rescale the image"
    return f"float64 values of at most {extreme.max():.3g} are all 0 in float32 (min normal 1.2e-38); rescale the image"


#: deflate encodes at most 258 bytes in one symbol of at least 2 bits: ~1032:1 at best; any gzip file
#: holding more than this many bytes per byte on disk (plus headers) is lying about its size
_GZIP_MAX_RATIO = 1100


def _gzip_reach(on_disk: int) -> int:
    """The most bytes a gzip file of ``on_disk`` bytes can decompress to (plus headers' slack)."""
    return _GZIP_MAX_RATIO * on_disk + (1 << 16)


def _header_problem(path: Path, img: nib.Nifti1Image) -> str | None:
    """What makes a NIfTI header unusable before any voxel is read, or None.

    A size of zero or less along an axis, voxels that are not real numbers (RGB, complex), or more
    data than the file can hold: a corrupt header that claims gigabytes would otherwise end in a
    memory error (gzip) or a memory map past the end of the file, with no word about the file.
    """
    shape = tuple(int(n) for n in img.shape)
    if any(n < 1 for n in shape):
        return f"invalid NIfTI header: shape {_fmt_shape(shape)} has a size below 1"
    header = img.header
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf":
        try:
            name = header.get_value_label("datatype")
        except Exception:  # noqa: BLE001 - only for the message
            name = str(dtype)
        return f"unsupported voxel type {name} ({dtype}); expected real-valued intensities"
    offset, end = _data_extent(img)
    need = end - offset
    on_disk = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    gz = head[:2] == b"\x1f\x8b"
    # uncompressed: the file starts with its header's size; bzip2 and zstd files (nibabel reads them
    # too) can hold far more than 1100 bytes per byte, so they get no size check here
    plain = head in {struct.pack(order + "i", size) for order in "<>" for size in (348, 540)}
    if gz and offset + need > _gzip_reach(on_disk):
        return (f"corrupt header: it describes {_fmt_bytes(offset + need)} of data (shape {_fmt_shape(shape)}, "
                f"{dtype}), more than a {_fmt_bytes(on_disk)} gzip file can hold")
    if plain and offset + need > on_disk:
        return (f"truncated: the header describes {offset + need} bytes (shape {_fmt_shape(shape)}, {dtype}, "
                f"data from byte {offset}), the file has {on_disk}")
    return None


#: a compressed stream may go on past the image (padding, a second gzip member) by this much before
#: the rest is left unread, and its checksum with it
_TRAILING_LIMIT = 64 << 20


def _raw_header_problem(path: Path) -> str | None:
    """What is wrong with the magic, dimension count, data offset, scaling or extensions of a NIfTI
    header, read as stored.

    nibabel takes a ``dim[0]`` outside 1-7 as the sign of the other byte order and reads every field
    swapped (``dim[0] = 8`` came out as "vox offset 0 too low"), and an offset of 0, NaN or past the
    end of the file ended in numpy's or Python's own words. A missing or wrong magic ended in "cannot
    work out file type", an extension of size 0 or below in "read length must be non-negative" (and
    in a .nii.gz both were blamed on an intact gzip stream), a NIfTI-2 header under a NIfTI-1 size
    was read with the NIfTI-1 layout, and an infinite ``scl_slope`` was silently dropped. The byte
    order here comes from ``sizeof_hdr`` (348 or 540), which no valid header has in the other order.
    Plain and gzip files are checked (gzip's first 64 KiB only, and its extensions as far as 64 MiB);
    anything else, or a file that does not start like a NIfTI header, is left to nibabel and
    :func:`_cut_header`.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(1 << 16)
        gz = raw[:2] == b"\x1f\x8b"
        head = zlib.decompressobj(wbits=31).decompress(raw, 552) if gz else raw[:552]
    except (OSError, zlib.error):
        return None
    order = next((o for o in "<>" for n in (348, 540) if head[:4] == struct.pack(o + "i", n)), None)
    if order is None:
        return None
    nifti2 = struct.unpack(order + "i", head[:4])[0] == 540
    header_size = 540 if nifti2 else 348
    if len(head) < header_size:
        return None  # cut inside the header: _cut_header says so
    problem = _magic_problem(head, nifti2)
    if problem:
        return problem
    if nifti2:
        ndim = struct.unpack_from(order + "q", head, 16)[0]
        offset: float = struct.unpack_from(order + "q", head, 168)[0]
        slope, inter = struct.unpack_from(order + "2d", head, 176)
        magic, header_end = head[4:7].decode(), 544
    else:
        ndim = struct.unpack_from(order + "h", head, 40)[0]
        offset = struct.unpack_from(order + "f", head, 108)[0]
        slope, inter = struct.unpack_from(order + "2f", head, 112)
        magic, header_end = head[344:347].decode(), 352
    if not 1 <= ndim <= 7:
        return f"invalid NIfTI header: dim[0] = {ndim} (the number of dimensions must be 1-7)"
    if not math.isfinite(offset):
        return f"invalid NIfTI header: vox_offset is {offset} (the byte where the voxels start)"
    if offset != int(offset):
        # nibabel rounds it down: voxels written at byte 353 under vox_offset 352.5 loaded as noise
        return f"invalid NIfTI header: vox_offset {offset:g} is not a whole byte (the byte where the voxels start)"
    if offset < header_end:  # (a .hdr/.img pair was refused by its name: this is a single file)
        if magic[1] == "+":
            return (f"invalid NIfTI header: vox_offset {offset:g} is inside the header (the voxels of a single-file "
                    f"NIfTI ('{magic}') start at byte {header_end} or later)")
        return (f"invalid NIfTI header: vox_offset {offset:g} is inside the header, and its magic '{magic}' is a "
                f".hdr/.img pair's (the voxels of a single-file NIfTI ('{magic[0]}+{magic[2]}') start at byte "
                f"{header_end} or later)")
    if not gz and offset >= size:
        return f"truncated: the header puts the voxels at byte {offset:.0f} (vox_offset), past the end of the file ({size} bytes)"
    if gz and offset > _gzip_reach(size):
        return (f"corrupt header: it puts the voxels at byte {offset:.0f} (vox_offset), past anything a "
                f"{_fmt_bytes(size)} gzip file can hold")
    codes = struct.unpack_from(order + ("2i" if nifti2 else "2h"), head, 344 if nifti2 else 252)
    for name, code in zip(("qform", "sform"), codes):
        if code not in _XFORM_CODES:
            # nibabel resets the code to 0 and ignores that matrix: with an sform of code 99 the
            # orientation was guessed from pixdim and the planes mislabelled, with a false warning
            return (f"invalid NIfTI header: {name}_code {code} is not a NIfTI transform code (0-5), so the {name} would "
                    f"be ignored: set a valid code (nibabel: img.set_{name}(img.get_{name}(), code=1))")
    if math.isinf(slope):
        # nibabel drops a non-finite slope as "no scaling"; the file's own scaling makes every voxel
        # NaN or Inf, like a slope of 1e38 that overflows (_scaling_problem)
        return (f"the header's scaling (scl_slope {slope:g}, scl_inter {inter:g}) makes every voxel NaN/Inf: "
                "fix scl_slope/scl_inter")
    if slope < 0:
        # an MR or CT intensity is never stored inverted: with a positive intercept every voxel stays
        # > 0, the air reads brightest, and the image was embedded as a head
        return (f"negative scl_slope ({slope:g}, scl_inter {inter:g}) in the header: the intensities read inverted, "
                "the air brightest; fix scl_slope/scl_inter")
    if len(head) > header_size and head[header_size] != 0:  # the extension flag: extensions follow
        return _extension_problem(path, gz, order, header_end, int(offset))
    return None


#: NIfTI qform/sform codes: unknown, scanner, aligned, Talairach, MNI-152, another template
_XFORM_CODES = frozenset(range(6))

#: NIfTI magic strings: the single-file and the pair magic of each version
_MAGIC = {False: (b"n+1\0", b"ni1\0"), True: (b"n+2\0", b"ni2\0")}


def _magic_problem(head: bytes, nifti2: bool) -> str | None:
    """A header whose magic is missing or belongs to the other NIfTI version than its ``sizeof_hdr``.

    NIfTI-1 keeps its magic at byte 344, NIfTI-2 at byte 4: a NIfTI-2 header with ``sizeof_hdr`` 348
    has 'n+2' at byte 4 and was read with the NIfTI-1 layout ("dim[0] = 90").
    """
    at, other_at = (4, 344) if nifti2 else (344, 4)
    if head[at:at + 4] in _MAGIC[nifti2]:
        return None
    size, version, other = (540, "NIfTI-2", "NIfTI-1") if nifti2 else (348, "NIfTI-1", "NIfTI-2")
    found = next((m for m in (head[at:at + 4], head[other_at:other_at + 4]) if m in _MAGIC[not nifti2]), None)
    if found:
        return f"invalid NIfTI header: sizeof_hdr {size} ({version}) but magic '{found[:3].decode()}' ({other})"
    wanted = " or ".join(f"'{m[:3].decode()}'" for m in _MAGIC[nifti2])
    if nifti2:
        return f"invalid NIfTI header: no NIfTI-2 magic ({wanted}) at byte 4, found {head[4:8]!r} (sizeof_hdr 540)"
    if head[344:348] == bytes(4):
        return (f"no NIfTI magic ({wanted}) in the header: an Analyze 7.5 file? convert it to NIfTI "
                "(e.g. nibabel.save(nibabel.Nifti1Image(...)))")
    return f"invalid NIfTI header: no NIfTI magic ({wanted}) at byte 344, found {head[344:348]!r}"


#: header extensions are walked only as far as this (real ones are a few KiB; nibabel reads the rest)
_EXTENSIONS_READ = 64 << 20


def _extension_problem(path: Path, gz: bool, order: str, start: int, offset: int) -> str | None:
    """A header extension whose size (``esize``, the first int32 of each) is not a positive multiple of
    16, as the standard requires, or runs past ``vox_offset``, where nibabel stops reading them.

    nibabel reads ``esize - 8`` bytes per extension: a size of 0 or below ended in "read length must
    be non-negative" (blamed on the gzip stream of a .nii.gz), one past the voxels in "failed to read
    extension content" or in voxels read as extensions, and other sizes it reads "hoping for the best"
    with a warning on stderr.
    """
    stored = _stored_prefix(path, gz, min(offset, _EXTENSIONS_READ))
    pos, count = start, 0
    while offset - pos >= 16:  # nibabel's condition: less than 16 bytes left is padding
        if stored is None or pos + 8 > len(stored):
            return None  # beyond what was read, or a cut stream: the stream checks say so
        count += 1
        if count > _MAX_EXTENSIONS:
            # nibabel makes a Python object of each and parses the header several times: 4 million
            # 16-byte extensions (a 0.5 MB .nii.gz) took 54 s and 1.7 GB to load
            return (f"corrupt NIfTI header: more than {_MAX_EXTENSIONS} header extensions before the voxels (vox_offset "
                    f"{offset}); a file holds a few")
        esize = struct.unpack_from(order + "i", stored, pos)[0]
        if esize <= 0 or esize % 16:
            return (f"invalid NIfTI header extension: esize {esize} at byte {pos} (must be a positive multiple "
                    "of 16)")
        if pos + esize > offset:
            return (f"invalid NIfTI header extension: esize {esize} at byte {pos} runs past the voxels (vox_offset "
                    f"{offset})")
        pos += esize
    return None


#: header extensions a file may hold (dcm2niix and AFNI write one or two)
_MAX_EXTENSIONS = 10_000


def _stored_prefix(path: Path, gz: bool, n: int) -> bytes | None:
    """The first ``n`` bytes of a plain file, or of a gzip file's decompressed stream (fewer when it
    ends first); None when the stream cannot be decoded that far."""
    try:
        with open(path, "rb") as f:
            if not gz:
                return f.read(n)
            stream, out, data = zlib.decompressobj(wbits=31), bytearray(), b""
            while len(out) < n and not stream.eof:
                data = data or f.read(1 << 16)
                if not data:
                    break
                out += stream.decompress(data, n - len(out))
                data = stream.unconsumed_tail
            return bytes(out)
    except (OSError, zlib.error):
        return None


def _data_extent(img: nib.Nifti1Image) -> tuple[int, int]:
    """(first, one past the last) byte of the voxels in the (decompressed) file, as Python ints: a
    NIfTI-2 header's dims can overflow an int64 product."""
    # the image's header is a copy with vox_offset reset; the array proxy keeps the file's
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
    return offset, offset + math.prod(int(n) for n in img.shape) * img.header.get_data_dtype().itemsize


def _xform_gap(qform: np.ndarray, sform: np.ndarray) -> str | None:
    """How a qform and an sform with the same orientation letters still differ, or None: voxel sizes
    more than 1% apart, or a voxel axis turned by more than 1 deg (the default ``max_obliquity_deg``).
    A translation alone changes no slice and is not reported."""
    with np.errstate(all="ignore"):
        q_mm, s_mm = (np.linalg.norm(a[:3, :3], axis=0) for a in (qform, sform))
        cos = np.sum(qform[:3, :3] * sform[:3, :3], axis=0) / (q_mm * s_mm)
    if not (np.isfinite(q_mm).all() and np.isfinite(s_mm).all() and np.isfinite(cos).all()):
        return None  # a broken matrix: the checks of the affine read name it
    parts = []
    if np.any(np.abs(q_mm - s_mm) > 0.01 * np.maximum(q_mm, s_mm)):
        parts.append(f"voxel sizes {_fmt_mm(q_mm)} vs {_fmt_mm(s_mm)}")
    turn = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).max())
    if turn > 1.0:
        parts.append(f"voxel axes turned by up to {turn:.3g} deg")
    return "; ".join(parts) or None


def _usable_qform(img: nib.Nifti1Image) -> tuple[np.ndarray | None, str | None]:
    """(the qform, None), or (None, why it is no affine): its quaternion may have a norm above 1
    (nibabel raises) or NaN/Inf fields, or pixdim may be NaN/Inf. Only asked when qform_code > 0: a
    qform whose code is 0 is to be ignored (NIfTI standard), and writers leave junk in its fields."""
    try:
        with np.errstate(all="ignore"):
            qform = img.get_qform()
    except ValueError as err:
        return None, (_qform_problem(err) or _short(err)).split(";")[0]
    if not np.isfinite(qform).all():
        return None, "NaN/Inf in its quaternion, offset or pixdim"
    return qform, None


def _qform_problem(err: BaseException) -> str | None:
    """nibabel's words for a qform quaternion it cannot turn into a rotation, as the file's problem."""
    text = str(err)
    if "w2 should be positive" in text:  # quatern_b^2 + c^2 + d^2 > 1: no unit quaternion
        return ("invalid qform: its quaternion (quatern_b, quatern_c, quatern_d) has a norm above 1, so it is no "
                f"rotation (nibabel: {_short(err)}); fix the qform, or set qform_code 0 with a valid sform")
    return None


def _trailing_problem(img: nib.Nifti1Image, extra: int, more: bool = False) -> str | None:
    """Why ``extra`` bytes after the voxels the header describes make the file suspect, or None.

    A writer may pad a file by a few bytes; a whole slice or more after the data is what a header
    whose shape was cut (``dim[3]`` 90 -> 45) leaves, and nibabel then loads part of the scan as if
    it were all of it.
    """
    shape = tuple(int(n) for n in img.shape)
    slice_bytes = math.prod(shape[:2]) * img.header.get_data_dtype().itemsize if len(shape) >= 2 else 0
    if slice_bytes <= 0 or (extra < slice_bytes and not more):
        return None
    size = f"at least {_fmt_bytes(extra)}" if more else f"{extra} bytes"
    return (f"the file holds {size} after the voxels its header describes (shape {_fmt_shape(shape)}, "
            f"{img.get_data_dtype()}): {'many' if more else f'{extra / slice_bytes:.3g}'} more slice(s) of data; "
            "is the header's shape wrong?")


def _whole_stream(path: Path, img: nib.Nifti1Image) -> nib.Nifti1Image:
    """A gzip or bzip2 NIfTI re-opened from its whole decompressed stream, checksums verified.

    nibabel decompresses a .nii.gz only as far as the voxels go, so gzip's CRC and length, at the end
    of the stream, are never checked: a byte flipped in the middle or a cut trailer loaded as garbage
    intensities without a word. Decompressing to the end in one zlib/bz2 call verifies them, and the
    image is then read from those bytes (no second pass; the same nibabel header and array proxy).
    An uncompressed file (told by its first bytes, whatever its name) is not read here: its trailing
    bytes are checked from its size. Other files (.zst) are returned as they are.

    Raises:
        zlib.error, OSError, EOFError, ValueError: a corrupt or truncated stream.
    """
    need = _data_extent(img)[1]
    limit = need + _TRAILING_LIMIT
    with open(path, "rb") as fh:
        head = fh.read(4)
        if head[:2] == b"\x1f\x8b":
            magic, member = b"\x1f\x8b", lambda: zlib.decompressobj(wbits=31)  # zlib checks CRC-32 and length
        elif head[:3] == b"BZh":
            magic, member = b"BZh", bz2.BZ2Decompressor
        elif head == b"\x28\xb5\x2f\xfd":  # zstd: nibabel reads it; no stream check here
            return img
        else:  # plain: reading it whole would cost its size in memory (GBs of junk after a small image)
            problem = _trailing_problem(img, path.stat().st_size - need)
            if problem:
                raise VolumeError(path, problem)
            return img
        # gzip and bzip2 grow incompressible data by under 1 %, so an eighth more than the voxels and
        # the tolerated rest need is all the input that can matter; junk past it is not read into memory
        on_disk = os.fstat(fh.fileno()).st_size
        fh.seek(0)
        raw = fh.read(min(on_disk, limit + (limit >> 3) + (1 << 20)))  # (read(n) allocates n bytes up front)
        unread = on_disk - len(raw)
    # a stream may hold several members one after the other (bgzip, pigz, pbzip2, `cat a.gz b.gz`):
    # gzip reads them as one file, so the voxels may continue in the next member
    stream, rest, parts, size = member(), raw, [], 0
    while size < limit:  # (a max_length of 0 would mean "no limit" to zlib)
        try:
            part = stream.decompress(rest, limit - size)
        except zlib.error as err:
            for code, meaning in (("incorrect data check", "the gzip checksum (CRC-32) does not match the data"),
                                  ("incorrect length check", "the gzip length field does not match the data")):
                if code in str(err):
                    raise ValueError(meaning) from None
            raise
        parts.append(part)
        size += len(part)
        # zero padding between members (tape-style blocking) is skipped, as gzip itself does
        following = stream.unused_data.lstrip(b"\0") if stream.eof else b""
        if not following.startswith(magic):
            break
        stream, rest = member(), following
    data = b"".join(parts)
    if len(data) < need:
        raise EOFError(f"the stream holds {len(data)} of the {need} bytes the header describes")
    # all input used and the stream unfinished (not merely stopped at the limit): it was cut
    if isinstance(stream, bz2.BZ2Decompressor):
        cut = not stream.eof and stream.needs_input
    else:
        cut = not stream.eof and not stream.unconsumed_tail
    if cut:
        raise EOFError("the compressed stream ends before its end marker")
    if stream.eof and (unread or stream.unused_data.strip(b"\0")):  # gzip itself says "trailing garbage ignored"
        _warn_once(path, "trailing", f"%s: {len(stream.unused_data) + unread} bytes after the end of the compressed stream "
                   "are not compressed data; ignored (the voxels passed their checksum)")
    problem = _trailing_problem(img, len(data) - need, more=not stream.eof)
    if problem:
        raise VolumeError(path, problem)
    with _quiet_nibabel():  # its header repairs were reported by nib.load already
        return type(img).from_bytes(data)


_quiet_lock = threading.Lock()
_quiet = {"depth": 0, "was_disabled": False}  # users of _quiet_nibabel now; the logger's state before


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Mutes nibabel's logger, which reports each header field it repairs on load on several lines
    (its own handler, then the root logger's); what matters is checked and reported by read_nifti.

    nibabel's ``LoggingOutputSuppressor`` misses the root handlers and skips every other handler it
    removes; this counts nested and concurrent users (reader threads), so the first one to finish does
    not unmute the logger under another's load.
    """
    logger = logging.getLogger("nibabel.global")
    with _quiet_lock:
        if _quiet["depth"] == 0:
            _quiet["was_disabled"] = logger.disabled
            logger.disabled = True
        _quiet["depth"] += 1
    try:
        # numpy's error state is per thread: nibabel's affine arithmetic on an inf/NaN header field
        # (a RuntimeWarning and its source line on stderr, naming no file) stays quiet here alone
        with np.errstate(all="ignore"):
            yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                logger.disabled = _quiet["was_disabled"]


def _raw_pixdim(path: Path, img: nib.Nifti1Image) -> np.ndarray | None:
    """pixdim[1:4] as the file has it (nibabel's loaded header has zeros replaced by 1)."""
    try:
        with _quiet_nibabel(), nib.openers.ImageOpener(str(path)) as fh:
            header = type(img.header).from_fileobj(fh, check=False)
        return np.asarray(header["pixdim"][1:4], dtype=np.float64)
    except Exception:  # noqa: BLE001 - the loaded header was readable; this is only a second look
        return None


class _Grid(NamedTuple):
    """The voxel grid of an image (what :func:`_grid_difference` compares), without its data."""

    shape: tuple[int, ...]
    affine: np.ndarray


def _ras_grid(img: "nib.Nifti1Image | _Grid") -> _Grid:
    """The grid of ``img`` once its axes are permuted/flipped to closest RAS (what :func:`_to_ras` does
    to its voxels), so two files of one grid stored in different voxel orders compare equal."""
    shape = tuple(int(n) for n in img.shape[:3])
    ornt = nib.orientations.io_orientation(img.affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(ORIENTATION))
    ras_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        ras_shape[int(target)] = shape[axis]
    return _Grid(tuple(ras_shape), img.affine @ nib.orientations.inv_ornt_aff(transform, shape))


def _same_grid(img: "nib.Nifti1Image | _Grid", ref: "nib.Nifti1Image | _Grid") -> bool:
    """Whether two images sample the same voxel centres, whatever order each file stores them in: a T2
    saved in RAS order (fslreorient2std) beside a PSR T1 of the same grid was refused (fuzz round 13)."""
    if img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-3):
        return True
    a, b = _ras_grid(img), _ras_grid(ref)
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=1e-3))


def _grid_difference(img: "nib.Nifti1Image | _Grid", ref: "nib.Nifti1Image | _Grid") -> str:
    if img.shape[:3] != ref.shape[:3]:
        return f"shape {_fmt_shape(img.shape[:3])} vs {_fmt_shape(ref.shape[:3])}"
    moved = float(np.abs(img.affine[:3, 3] - ref.affine[:3, 3]).max())
    turned = float(np.abs(img.affine[:3, :3] - ref.affine[:3, :3]).max())
    return (f"same shape {_fmt_shape(img.shape[:3])}, but the affines differ: origin by up to {moved:.3g} mm, "
            f"voxel axes by up to {turned:.3g}")


def integer_labels(path: str | Path, name: str, values: np.ndarray) -> np.ndarray:
    """A label map's values as int32, refusing what is not an integer label (NaN, fractions, huge values).

    ``np.rint(...).astype(int32)`` alone turns NaN and labels beyond int32 into -2147483648 and merges
    fractional values into their neighbours, without a word.
    """
    finite = np.isfinite(values)
    if not finite.all():
        raise VolumeError(path, f"{name} map has {int((~finite).sum())} NaN/Inf voxels; expected integer labels")
    rounded = np.rint(values)
    off = np.abs(values - rounded)
    if off.max(initial=0.0) > 1e-3:
        example = values.flat[int(np.argmax(off))]
        raise VolumeError(path, f"{name} map holds non-integer values (e.g. {example:g}); expected integer labels "
                                "(a probability map or an interpolated segmentation?)")
    # maps are read as float32, where integers stop being exact at 2^24: 16777217 already reads as
    # 16777216 (two labels merged) and 2^31 - 1 as 2^31 (beyond int32), so the bound is 2^24
    peak = float(np.abs(rounded, dtype=np.float64).max(initial=0.0))
    if peak >= _EXACT_LABEL_LIMIT:
        extreme = rounded.flat[int(np.argmax(np.abs(rounded)))]
        raise VolumeError(path, f"{name} map holds labels of magnitude 2^24 = 16777216 or more (e.g. {extreme:.0f}), "
                                "which float32 reading cannot keep apart; renumber the labels")
    if rounded.size and rounded.min() < 0:
        # the segmentation probe's lookup table clipped them to background: a structure labelled -2
        # was trained on as background without a word
        raise VolumeError(path, f"{name} map holds negative labels (e.g. {rounded.min():.0f}); expected labels >= 0 "
                                "(0 = background)")
    return rounded.astype(np.int32)


#: labels must stay below this magnitude: the largest range of integers float32 holds exactly
_EXACT_LABEL_LIMIT = float(1 << 24)


#: bytes of memory per voxel beyond the stored data: the float32 copy and about two working copies
#: (reorienting, resampling, the normalised volume) that a read makes
_WORK_BYTES_PER_VOXEL = 12


def available_memory() -> int | None:
    """Bytes this process may still allocate: the least of the kernel's MemAvailable, the cgroup's
    limit less its use, and the address-space rlimit less the process's size; None where none is known."""
    limits = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        top = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if top != "max":
            limits.append(int(top) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            pages = int(Path("/proc/self/statm").read_text().split()[0])
            limits.append(soft - pages * os.sysconf("SC_PAGE_SIZE"))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return max(0, min(limits)) if limits else None


def _memory_problem(img: nib.Nifti1Image) -> str | None:
    """A volume whose read would need more memory than is available, said from its header before any
    voxel is decompressed: a small, highly compressible file can describe tens of GB (a 4.6 MiB
    .nii.gz of 1700^3 zeros), which used to fill memory for half a minute or get the job killed."""
    voxels = float(np.prod([float(n) for n in img.shape], dtype=np.float64))
    need = voxels * (img.header.get_data_dtype().itemsize + _WORK_BYTES_PER_VOXEL)
    have = available_memory()
    if have is None or need <= have:
        return None
    return (f"too large to load: shape {_fmt_shape(img.shape)} needs about {_fmt_bytes(need)} of memory to read "
            f"(the data, a float32 copy and the working copies), and {_fmt_bytes(have)} is available")


def _resample_memory_problem(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float],
                             n_maps: int) -> str | None:
    """Why resampling a (C, X, Y, Z) array of ``shape`` to ``spacing`` mm would not fit in memory, or None.

    The resampled grid grows with the cube of the spacing ratio: a 1 mm scan at 0.05 mm is 8,000 times
    larger. Counted: the float32 input copy, the output, and the normalised copy of it (float32 each),
    plus one float32 copy per label map (nearest-neighbour resampling goes through float32 too).
    """
    old = np.linalg.norm(affine[:3, :3], axis=0)
    size = [max(1, int(round(n * o / float(t)))) for n, o, t in zip(shape[1:], old, spacing)]
    voxels = float(np.prod(size, dtype=np.float64))
    need = 4.0 * voxels * (3 * int(shape[0]) + 2 * n_maps)
    have = available_memory()
    if have is None or need <= have:
        return None
    target = _fmt_mm(np.asarray(spacing, dtype=float))
    return (f"resampling to {target} mm would make shape {_fmt_shape(size)} needing about {_fmt_bytes(need)}, and "
            f"{_fmt_bytes(have)} is available: choose a coarser spacing (the file's voxels are {_fmt_mm(old)} mm)")


def _extent_problem(affine: np.ndarray, shape: Sequence[int], cfg: VolumeConfig,
                    unit: tuple[str, float] | None) -> str | None:
    """Why a volume of ``shape`` voxels with ``affine`` cannot be a head (absurd voxel size, a field of
    view too small or too large, a slab), or None; said in RAS axis order.

    Checked on the file's own grid, before any reslicing: a thin oblique file (100 x 2 x 60 voxels of
    2 x 0.06 x 19.5 mm tilted 44 deg, 43 KB) resliced onto 57 million voxels (2 GB) before its
    1170 mm slab was refused, and its bounding box looked like a head.
    """
    origin = np.asarray(affine[:3, 3], dtype=np.float64)
    if np.abs(origin).max() > _MAX_ORIGIN_MM:
        # a corrupt offset: float64 loses the voxel grid at such coordinates (an oblique file with its
        # origin at 1e30 mm was resliced onto 1 x 1 x 1 voxels and cached)
        return (f"absurd origin ({', '.join(f'{v:.4g}' for v in origin)}) mm in the affine (over "
                f"{_MAX_ORIGIN_MM / 1000:g} m from the scanner's centre); a corrupt sform/qform offset")
    ornt = nib.orientations.io_orientation(affine)
    axes = ornt[:, 0].astype(int)
    spacing, dims = np.empty(3), np.empty(3, dtype=int)
    spacing[axes] = np.linalg.norm(affine[:3, :3], axis=0)  # what _to_ras and nearest_ras_grid give
    dims[axes] = [int(n) for n in shape[:3]]
    note = _unit_note(spacing, unit)
    if np.any(spacing < cfg.min_spacing) or np.any(spacing > cfg.max_spacing):
        return (f"absurd voxel spacing {_fmt_mm(spacing)} mm ({note + '; ' if note else ''}allowed "
                f"{cfg.min_spacing:g}-{cfg.max_spacing:g} mm)")
    fov = dims.astype(np.float64) * spacing
    if fov.max() < cfg.min_fov_mm or fov.max() > cfg.max_fov_mm:
        small = fov.max() < cfg.min_fov_mm
        return (f"field of view {' x '.join(f'{v:.4g}' for v in fov)} mm (shape {_fmt_shape(dims)}, "
                f"voxels {_fmt_mm(spacing)} mm{', ' + note if note else ''}) cannot hold a head: "
                + (f"under {cfg.min_fov_mm:g} mm along every axis" if small
                   else f"over {cfg.max_fov_mm:g} mm along an axis")
                + "; a wrong voxel size in the header, or not a brain scan")
    if fov.min() < cfg.min_extent_ratio * fov.max():
        return (f"field of view {' x '.join(f'{v:.4g}' for v in fov)} mm (shape {_fmt_shape(dims)}) is a "
                f"slab, not a head: its shortest axis is {fov.min() / fov.max():.2g} of its longest (under "
                f"{cfg.min_extent_ratio:g}); a localizer/scout or partial-coverage scan (VolumeConfig.min_extent_ratio "
                "sets the limit, 0 turns it off)")
    if dims.min() < cfg.min_voxels:
        return (f"shape {_fmt_shape(dims)} (voxels {_fmt_mm(spacing)} mm) has {int(dims.min())} voxel(s) along an axis, "
                f"under {cfg.min_voxels}: too few to be a head scan, whatever the voxel size says "
                "(VolumeConfig.min_voxels sets the limit, 0 turns it off)")
    return None


#: an affine origin farther than this (mm) from the scanner's centre is a corrupt header (100 m)
_MAX_ORIGIN_MM = 1e5


def _reslice_memory_problem(shape: Sequence[int], source: Sequence[int], channels: int) -> str | None:
    """Why reslicing ``channels`` images onto a grid of ``shape`` would not fit in memory, or None.

    The RAS bounding box of a tilted volume holds more voxels than the file (about 2x for a 30 deg
    clinical stack), and far more for a thin, strongly anisotropic one. Counted per output voxel: the
    float32 result and the working copies of :data:`_WORK_BYTES_PER_VOXEL`, per channel.
    """
    voxels = float(np.prod([float(n) for n in shape], dtype=np.float64))
    need = voxels * channels * (4 + _WORK_BYTES_PER_VOXEL)
    have = available_memory()
    if have is None or need <= have:
        return None
    return (f"reslicing this oblique volume (shape {_fmt_shape(source)}) onto its RAS bounding box would make "
            f"shape {_fmt_shape(shape)} needing about {_fmt_bytes(need)}, and {_fmt_bytes(have)} is available: "
            "snap it instead (--oblique snap), or reslice it beforehand with another tool")


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def check_values_ok(path: str | Path, data: np.ndarray) -> None:
    """Raises :class:`VolumeError` for NaN/Inf, all-zero or constant data."""
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - finite.sum())
        share = "all" if bad == data.size else f"{_percent(bad / data.size)} of the volume"
        raise VolumeError(path, f"{bad} NaN/Inf voxels ({share})")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi == 0:
        raise VolumeError(path, "empty volume (all voxels are 0)")
    if lo == hi:
        raise VolumeError(path, f"constant volume (all voxels = {lo:g})")
    # a blank volume with a stray voxel passes the checks above, then reads as 100% foreground (Otsu
    # splits the one odd value off) or embeds as zeros: fewer than 1 in 10,000 voxels differing from
    # the typical value is no image (a head is ~40% of its grid; load_volume's foreground check
    # refuses the few specks above this)
    typical = np.median(data[::4, ::4, ::4]) if data.ndim == 3 else np.median(data)
    differ = int(np.count_nonzero(data != typical))
    if differ < 1e-4 * data.size:
        raise VolumeError(path, f"almost {'empty' if typical == 0 else 'constant'} volume: {differ} of {data.size} "
                                f"voxels differ from {float(typical):g}")
    if hi <= 0:
        # a magnitude image is never all <= 0: min-max normalisation would make the air the brightest
        # tissue, Otsu then took the air for the head (mask 90% of the grid), and a photographic
        # negative was embedded like a scan
        raise VolumeError(path, f"every voxel is <= 0 (range {lo:g} to {hi + 0.0:g}): an inverted image (a negative "
                                "scl_slope?) or not an intensity image")


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(path: Path, kind: str, message: str) -> None:
    """Logs ``message % path`` the first time this process meets ``kind`` for this file: one
    command often reads a file twice (``info`` for the volume and its raw range), and a warning
    repeated per read reads like a second problem."""
    key = (str(Path(path).absolute()), kind)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logging.getLogger(__name__).warning(message, path)


def _to_mm(affine: np.ndarray, unit: tuple[str, float] | None) -> np.ndarray:
    """``affine`` of a file in ``unit`` (from :func:`_unit_of`; None: mm) with its rows in mm."""
    out = np.array(affine, dtype=np.float64)
    out[:3] *= 1.0 if unit is None else unit[1]
    return out


def _affine_ok(path: Path, affine: np.ndarray, unit: tuple[str, float] | None) -> bool:
    try:
        _check_affine(path, affine, unit)
    except VolumeError:
        return False
    return True


def _check_affine(path: Path, affine: np.ndarray, unit: tuple[str, float] | None = None) -> None:
    if not np.isfinite(affine).all():
        raise VolumeError(path, "affine has NaN/Inf entries")
    with np.errstate(over="ignore"):
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        det = np.linalg.det(affine[:3, :3])
    if not (np.isfinite(spacing).all() and np.isfinite(det)):
        # finite entries whose squares overflow (NIfTI-2 stores float64): io_orientation then gave NaN axes
        raise VolumeError(path, f"absurd voxel spacing {_fmt_mm(spacing)} mm: the affine's entries overflow "
                                f"(columns {_fmt_axes(affine[:3, :3])}); the header's orientation is broken")
    if np.any(spacing <= 1e-6):
        what = "zero" if np.any(spacing == 0) else "near-zero (below 1e-6 mm)"
        note = _unit_note(spacing, unit)
        raise VolumeError(path, f"{what} voxel spacing {_fmt_mm(spacing)} mm ({note + '; ' if note else ''}"
                                "singular affine)")
    if abs(det) < 1e-9 * np.prod(spacing):
        # non-zero columns that are parallel: two voxel axes point the same way, no 3D grid
        raise VolumeError(path, f"singular affine: its voxel axes are not independent (columns "
                                f"{_fmt_axes(affine[:3, :3])}); the header's orientation is broken")
    (i, j), angle = _closest_axes(affine)
    if angle < MIN_AXIS_ANGLE_DEG:
        # nearly parallel columns passed the determinant test (axes 0.003 deg apart: det 5e-5 of the
        # orthogonal one) and were resliced onto a grid one voxel thick; a scanner's voxel axes are
        # orthogonal, and a CT gantry tilt shears them to 60 deg at most
        raise VolumeError(path, f"{'near-singular' if angle < 1 else 'sheared'} affine: voxel axes {'ijk'[i]} and "
                                f"{'ijk'[j]} are only {angle:.3g} deg apart (columns {_fmt_axes(affine[:3, :3])}; "
                                f"refused below {MIN_AXIS_ANGLE_DEG:g} deg: a scanner's are 90 deg apart, a CT "
                                "gantry tilt shears them to 60); the header's orientation is broken")


#: voxel axes closer than this (degrees) are refused as a broken header (orthogonal: 90; a CT gantry
#: tilt of 30 deg shears two of them to 60)
MIN_AXIS_ANGLE_DEG = 45.0


def _closest_axes(affine: np.ndarray) -> tuple[tuple[int, int], float]:
    """The two voxel axes (columns of ``affine[:3, :3]``) closest to parallel, and their angle in
    degrees (0-90: a flipped axis is the same line)."""
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    pairs = [(0, 1), (0, 2), (1, 2)]
    cosines = [min(1.0, abs(float(cols[:, a] @ cols[:, b]))) for a, b in pairs]
    k = int(np.argmax(cosines))
    return pairs[k], float(np.degrees(np.arccos(cosines[k])))


def _fmt_mm(values: Sequence[float]) -> str:
    """``(2, 2, 0)``: plain numbers (numpy 2 would print ``np.float64(2.0)`` inside a tuple repr)."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _percent(fraction: float) -> str:
    """``0.98`` -> ``98%``, ``0.0004`` -> ``0.04%``: two significant digits, never in e-notation, and
    never ``100%`` unless it is all."""
    pct = 100 * fraction
    if pct >= 99.5:
        return "100%" if fraction >= 1 else "over 99%"
    if pct < 0.01:
        return "under 0.01%"
    return f"{pct:.0f}%" if pct >= 10 else f"{float(f'{pct:.2g}'):g}%"


def _fmt_axes(m: np.ndarray) -> str:
    """The three voxel-axis columns of a 3x3 matrix, as ``(2, 2, 0), (2, 2, 0), (0, 0, 2)``."""
    return ", ".join(_fmt_mm(m[:, i]) for i in range(3))


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def _obliquity_deg(affine: np.ndarray) -> float:
    return float(np.degrees(np.max(np.abs(nib.affines.obliquity(affine)))))


def obliquity_deg(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis of ``affine`` and its nearest scanner axis."""
    return _obliquity_deg(affine)


def nearest_ras_grid(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The RAS-aligned grid nearest to an oblique one, covering its whole field of view.

    Each world axis gets the voxel size of the voxel axis closest to it (so a 1 x 1 x 3 mm scan stays
    1 x 1 x 3 mm along the same anatomical directions); the grid is the bounding box of the oblique
    volume's voxel centres, centred on it.

    Args:
        affine: (4, 4) voxel -> world matrix of the oblique volume.
        shape: its spatial shape (X, Y, Z).

    Returns:
        (target affine (4, 4) with a positive diagonal, target shape (X', Y', Z')).
    """
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], dtype=float)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(0), world.max(0)
    size = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    origin = lo + ((hi - lo) - (size - 1) * spacing) / 2  # centre the grid on the field of view
    target = np.eye(4)
    target[:3, :3] = np.diag(spacing)
    target[:3, 3] = origin
    return target, tuple(int(n) for n in size)  # type: ignore[return-value]


def reslice(img: nib.Nifti1Image, affine: np.ndarray, shape: Sequence[int], *, order: int = 3
            ) -> np.ndarray:
    """Interpolates ``img`` onto the grid (``affine``, ``shape``) with nibabel; float32 (X', Y', Z').

    Voxels outside the source field of view get the source minimum (the background of an MRI).
    ``order``: 3 cubic B-spline, 1 trilinear (images), 0 nearest-neighbour (label maps).
    """
    import nibabel.processing

    data = img.get_fdata(dtype=np.float32)  # cached by read_nifti's value checks
    cval = float(np.nanmin(data)) if order else 0.0
    source = nib.Nifti1Image(data, img.affine)
    out = nibabel.processing.resample_from_to(source, (tuple(shape), affine), order=order,
                                              mode="constant", cval=cval)
    return np.asarray(out.dataobj, dtype=np.float32)


_COMPRESSION = {b"\x1f\x8b": ("gzip", ".gz"), b"BZh": ("bzip2", ".bz2"), b"\x28\xb5\x2f\xfd": ("zstd", ".zst")}


#: other formats a file named .nii or .nii.gz turns out to hold: (start, offset, what, what to do)
_OTHER_FORMATS = (
    (b"\xfd7zXZ\x00", 0, "xz-compressed data", "decompress it (xz -d) and save it as .nii or .nii.gz"),
    (b"PK\x03\x04", 0, "a zip archive", "unzip it and list the .nii/.nii.gz inside"),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive", "extract it and list the .nii/.nii.gz inside"),
    (b"\x89HDF\r\n\x1a\n", 0, "an HDF5 file", "export the volume to NIfTI"),
    (b"\x89PNG\r\n\x1a\n", 0, "a PNG image", "a 2D picture is no volume: give the scan as NIfTI"),
    (b"\xff\xd8\xff", 0, "a JPEG image", "a 2D picture is no volume: give the scan as NIfTI"),
    (b"DICM", 128, "a DICOM file", "convert the series to NIfTI first (dcm2niix)"),
    (b"NRRD", 0, "an NRRD image", "convert it to NIfTI first (e.g. SimpleITK.WriteImage)"),
    (b"ObjectType", 0, "a MetaImage (.mha/.mhd) header", "convert it to NIfTI first (e.g. SimpleITK.WriteImage)"),
)


def _other_format(raw: bytes) -> tuple[str, str] | None:
    """(what ``raw``, a file's first bytes, is, what to do), for a known non-NIfTI format, or None.
    zlib data without gzip's wrapper (``zlib.compress``) is recognised by decoding its start."""
    for magic, at, what, advice in _OTHER_FORMATS:
        if raw[at:at + len(magic)] == magic:
            return what, advice
    if len(raw) >= 2 and raw[0] == 0x78 and (raw[0] << 8 | raw[1]) % 31 == 0:
        try:
            start = zlib.decompressobj().decompress(raw, 4)
        except zlib.error:
            return None
        if start[:4] in (struct.pack("<i", 348), struct.pack(">i", 348), struct.pack("<i", 540),
                         struct.pack(">i", 540)):
            return ("zlib-compressed data without the gzip wrapper",
                    "decompress it (python: zlib.decompress) and gzip it (.nii.gz)")
    return None


def _cut_header(path: Path) -> str | None:
    """Why nibabel could not read ``path``, when it is an empty file, compressed data under another
    name, or a NIfTI cut off early (a copy or download that stopped); None otherwise.

    A NIfTI header starts with its own size as an int32 (348 for NIfTI-1, 540 for NIfTI-2, either byte
    order), so a file (or compressed stream) that starts like one is a NIfTI: if it ends inside the
    header it is cut there; if its stream holds the whole header, reading failed on the stream itself.
    """
    try:
        on_disk = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(1 << 16)
        if on_disk == 0:  # a /proc or /sys file reports 0 bytes and yet reads
            return "empty file (0 bytes)" if not raw else ("reports a size of 0 bytes yet reads as text or data "
                                                           "(a /proc or /sys file?): not a NIfTI image")
    except OSError as err:  # (no permission to read it): the caller's message stands
        logging.getLogger(__name__).debug("%s: %s", path, err)
        return None
    kind, suffix = next((v for magic, v in _COMPRESSION.items() if raw.startswith(magic)), (None, ""))
    name = path.name.lower()
    other = None if kind else _other_format(raw)
    if other:  # nibabel's words were "not a gzip file" or "cannot work out file type"
        return f"{other[0]}, not a NIfTI image: {other[1]}"
    if kind and not name.endswith(suffix):  # nibabel goes by the name
        return f"{kind}-compressed data in a file named {path.name}: rename it to end in .nii{suffix}"
    head = raw
    try:
        if kind == "gzip":  # what the (possibly cut) stream holds
            head = zlib.decompressobj(wbits=31).decompress(raw, 540)
        elif kind == "bzip2":
            head = bz2.BZ2Decompressor().decompress(raw, 540)
    except (OSError, EOFError, ValueError, zlib.error):
        return f"corrupt {kind} stream ({on_disk} bytes on disk)" if kind else None
    if kind and len(head) < 4:  # a bzip2 block decodes only whole: a cut one gives nothing at all
        return f"truncated or corrupt {kind} stream ({on_disk} bytes on disk; nothing of it decodes)"
    inner = next((v[0] for magic, v in _COMPRESSION.items() if head.startswith(magic)), None)
    if kind and inner:
        return f"compressed twice ({inner} data inside the {kind} stream): decompress it once (e.g. gunzip)"
    if head[257:262] == b"ustar":  # a POSIX tar header's magic, in a plain file or in the stream
        where = f" inside the {kind} stream" if kind else ""
        return f"a tar archive{where}, not a NIfTI image: extract it (tar xf) and list the .nii/.nii.gz inside"
    if head[:4] == b"\0\0\0\1" and len(head) >= 30 and struct.unpack(">h", head[28:30])[0] in (0, 1):
        # MGH: big-endian version 1, then width, height, depth, frames, type, dof, goodRASflag (int16)
        return ("a FreeSurfer MGH/MGZ image, not a NIfTI: convert it first (mri_convert x.mgz x.nii.gz, or "
                "nibabel.save(nibabel.load('x.mgz'), 'x.nii.gz'))")
    for size in (348, 540):
        if head[:4] in (struct.pack("<i", size), struct.pack(">i", size)):
            if len(head) < size:
                return f"truncated: the NIfTI header ends after {len(head)} of {size} bytes"
            if not kind and name.endswith((".gz", ".bz2", ".zst")):
                return f"not compressed, but named {path.name}: rename it to end in .nii"
            if kind in ("gzip", "bzip2"):
                # nibabel fails on many header problems too: the stream is blamed only once it is decoded
                decoded, broken = _decode_whole(path, kind)
                if broken:
                    return (f"truncated or corrupt {kind} stream ({on_disk} bytes on disk; the NIfTI header in it is "
                            f"whole; {broken})")
                need = _described_bytes(head)
                if need is not None and decoded < need:
                    return f"truncated: the {kind} stream holds {decoded} of the {need} bytes the header describes"
    return None


def _decode_whole(path: Path, kind: str) -> tuple[int, str | None]:
    """(bytes a gzip or bzip2 file's first stream decodes to, why decoding it fails, or None), in
    chunks: nothing is kept, and no call yields more than 16 MiB (a corrupt file may be a bomb)."""
    stream = zlib.decompressobj(wbits=31) if kind == "gzip" else bz2.BZ2Decompressor()
    limit, total = 1 << 24, 0
    try:
        with open(path, "rb") as f:
            while not stream.eof:
                chunk = f.read(1 << 16)
                if not chunk:
                    if kind == "gzip":
                        total += len(stream.flush())
                    return total, None if stream.eof else "the stream ends before its end marker"
                total += len(stream.decompress(chunk, limit))
                # (the rest of the chunk, or of what it decodes to, waits inside the decompressor)
                while not stream.eof and (stream.unconsumed_tail if kind == "gzip" else not stream.needs_input):
                    total += len(stream.decompress(stream.unconsumed_tail if kind == "gzip" else b"", limit))
    except (OSError, EOFError, ValueError, zlib.error) as err:
        return total, _short(err)
    return total, None


def _described_bytes(head: bytes) -> int | None:
    """vox_offset + the voxel bytes a whole NIfTI-1/2 header at the start of ``head`` describes, or None
    when its fields make no sense (other checks say so)."""
    order = next((o for o in "<>" for n in (348, 540) if head[:4] == struct.pack(o + "i", n)), None)
    if order is None:
        return None
    nifti2 = struct.unpack(order + "i", head[:4])[0] == 540
    bitpix = struct.unpack_from(order + "h", head, 14 if nifti2 else 72)[0]
    dims = struct.unpack_from(order + ("8q" if nifti2 else "8h"), head, 16 if nifti2 else 40)
    offset = struct.unpack_from(order + ("q" if nifti2 else "f"), head, 168 if nifti2 else 108)[0]
    if not 1 <= dims[0] <= 7 or not math.isfinite(offset) or bitpix <= 0:
        return None
    return int(offset) + math.prod(max(0, int(n)) for n in dims[1:dims[0] + 1]) * bitpix // 8


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def _to_ras(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Returns (data (X, Y, Z) float32, affine, original axis codes) in closest-RAS order."""
    affine = img.affine
    ornt = nib.orientations.io_orientation(affine)
    codes = tuple(nib.orientations.ornt2axcodes(ornt))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    ras = nib.orientations.axcodes2ornt(ORIENTATION)
    transform = nib.orientations.ornt_transform(ornt, ras)
    data = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, img.shape[:3])
    return np.ascontiguousarray(data), new_affine, codes


def _on_grid(img: nib.Nifti1Image, grid: tuple[np.ndarray, tuple[int, ...]] | None, order: int
             ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``img`` as (data (X, Y, Z) float32, affine, original axis codes) on RAS: resliced onto
    ``grid`` = (affine, shape) when given, else reoriented by permutation/flips only."""
    if grid is None:
        return _to_ras(img)
    codes = tuple(nib.orientations.ornt2axcodes(nib.orientations.io_orientation(img.affine)))
    return reslice(img, grid[0], grid[1], order=order), grid[0].copy(), codes


def resample(
    data: np.ndarray, affine: np.ndarray, spacing: Sequence[float], *, order: Literal["linear", "nearest"]
) -> tuple[np.ndarray, np.ndarray]:
    """Resamples a (C, X, Y, Z) or (X, Y, Z) array to a target voxel size.

    Voxel centres follow ``align_corners=False`` geometry for both interpolation orders, so an image
    and its label map resampled separately stay aligned.

    Returns:
        (resampled array, its affine).
    """
    import torch
    import torch.nn.functional as F

    squeeze = data.ndim == 3
    arr = data[None] if squeeze else data
    old = np.linalg.norm(affine[:3, :3], axis=0)
    size = [max(1, int(round(n * o / s))) for n, o, s in zip(arr.shape[1:], old, spacing)]
    if list(arr.shape[1:]) == size:
        return data, affine
    tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    if order == "linear":
        out = F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)
    else:
        out = F.interpolate(tensor, size=size, mode="nearest-exact")
    out_np = out[0].numpy()
    if order == "nearest":
        out_np = out_np.astype(data.dtype)
    factor = np.array(arr.shape[1:], dtype=float) / np.array(size, dtype=float)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factor)
    scale[:3, 3] = (factor - 1) / 2  # new voxel centre j sits at old (j + 0.5) * f - 0.5
    return (out_np[0] if squeeze else out_np), affine @ scale


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D array (between-class variance maximum)."""
    # float64: a float32 range near its maximum (3.4e38) overflows to inf in the bin edges
    # ("Too many bins for data range") and in the class means
    values = np.asarray(values, dtype=np.float64)
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def background_to_floor(channel: np.ndarray, share: float = 0.5) -> np.ndarray | None:
    """``channel`` (X, Y, Z) with its background set to its darkest value, when the background is not
    the darkest value; None (nothing to change) otherwise.

    The background is the border's darkest value when it fills over ``share`` of the grid's border
    voxels exactly (air stored as 0, or a constant pad). Normalisation and the foreground mask take the darkest value
    for the background: a skull-stripped brain z-scored inside its mask (0 around it, half the brain
    below 0) came out with a grey background and 100% foreground. A scan whose border is noisy air,
    or whose constant border is its minimum (the usual case: all 48 IXI T1s), is left as it is.
    """
    border = np.concatenate([np.ravel(f) for axis in range(channel.ndim)
                             for f in (np.take(channel, 0, axis=axis), np.take(channel, -1, axis=axis))])
    # the border's darkest value: a constant background is that (air stored as 0, or a pad), and the
    # usual scan has it as its minimum too, decided in one pass over the volume (no sort)
    background = border.min()
    if np.count_nonzero(border == background) <= share * border.size or not channel.min() < background:
        return None
    below = np.count_nonzero(channel < background)
    above = np.count_nonzero(channel > background)
    # tissue on both sides of it: a background that is the brightest value (an image stored inverted)
    # is left for the foreground check to refuse, and one with a few voxels under it (a spline's
    # undershoot at the skull, -0.5 under a 0 background) is in effect the minimum already
    if min(below, above) < 0.05 * (below + above):
        return None
    return np.where(channel == background, channel.min(), channel)


def foreground_mask(data: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Head foreground of a (C, X, Y, Z) array: ``fraction`` x Otsu per channel (union), holes filled.

    Otsu alone cuts grey matter and CSF off a skull-on T1 (about 10% of DLMUSE brain voxels on IXI);
    half of it, with holes filled, keeps about 98% while leaving the air out.

    Returns:
        bool array of shape (X, Y, Z).
    """
    mask = np.zeros(data.shape[1:], dtype=bool)
    for channel in data:
        sample = channel[::2, ::2, ::2].ravel()
        if sample.size and sample.min() == sample.max():
            # every other voxel constant (content only on odd slices, e.g. one slice of a localizer):
            # Otsu of a constant is below it, and the whole grid became foreground
            sample = channel.ravel()
        mask |= channel > fraction * otsu_threshold(sample)
    return fill_holes(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (face connectivity), by labelling the background once.

    A background voxel is a hole unless its face-connected background component reaches the array's
    border, which is what scipy's iterated dilation from the border finds. Here the background is
    labelled once, inside the mask's bounding box padded by one voxel: everything outside that box
    is background joined to the border, so a voxel in the box is outside exactly when its component
    holds the padding ring (one component, whose label the first corner carries). For the 48 IXI
    heads the box is 67-93% of the grid, and the whole fill costs a third of scipy's
    (``python scripts/bench_cache.py --subjects 48 --profile-read --encoder none``).

    Args:
        mask: bool array of any dimension.

    Returns:
        bool array of the same shape.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    spans = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
             for axis in range(mask.ndim)]
    if mask.ndim == 0 or any(len(s) == 0 for s in spans):
        return out  # no foreground: no hole either
    box = tuple(slice(int(s[0]), int(s[-1]) + 1) for s in spans)
    background, _ = ndimage.label(~np.pad(mask[box], 1))  # default structure: face connectivity, as scipy
    out[box] = (background != background.flat[0])[(slice(1, -1),) * mask.ndim]
    return out


_SLAB_VALUES = 1 << 20  # values per float64 slab of normalize_intensity (8 MiB)
_ONE_PASS_VALUES = 1 << 24  # volumes up to this many voxels take their foreground sample in one pass


def _slabs(channel: np.ndarray) -> tuple[np.ndarray, int]:
    """An (X, Y, Z) channel as (X, Y*Z) rows, and how many rows make one slab of ~_SLAB_VALUES values."""
    flat = channel.reshape(channel.shape[0], -1)
    return flat, max(1, _SLAB_VALUES // max(1, flat.shape[1]))


def _foreground_sample(channel: np.ndarray, size: int = 200_000) -> np.ndarray:
    """Every k-th voxel (C order) of those above the channel's minimum, k = count // ``size``; all of
    them when the channel is constant. The same values as ``channel[channel != min][::k]``, picked
    slab by slab for large volumes, so that no copy of the whole foreground is made (1 GiB for a
    600^3 head); below 2^24 voxels in one pass, which is faster."""
    low = channel.min()
    if channel.size <= _ONE_PASS_VALUES:
        nonzero = channel[channel != low]
        if nonzero.size == 0:
            nonzero = channel.ravel()
        return nonzero[::max(1, nonzero.size // size)]
    flat, rows = _slabs(channel)
    counts = [int(np.count_nonzero(flat[i:i + rows] != low)) for i in range(0, flat.shape[0], rows)]
    total = sum(counts)
    if total == 0:
        return channel.ravel()[::max(1, channel.size // size)]
    step = max(1, total // size)
    parts, before = [], 0
    for i, count in zip(range(0, flat.shape[0], rows), counts):
        if count:
            slab = flat[i:i + rows]
            parts.append(slab[slab != low][(-before) % step::step])
        before += count
    return np.concatenate(parts)


def normalize_intensity(
    data: np.ndarray, mask: np.ndarray | None, cfg: VolumeConfig
) -> np.ndarray:
    """Percentile clipping + scaling per channel of a (C, X, Y, Z) array (see :class:`VolumeConfig`)."""
    if cfg.normalize == "none":
        return data
    out = np.empty_like(data, dtype=np.float32)
    lo_p, hi_p = cfg.clip_percentiles
    scratch = None  # one float64 slab buffer: the clip and shift used to allocate three whole volumes
    for c, channel in enumerate(data):
        sample = _foreground_sample(channel)
        lo, hi = np.percentile(sample, [lo_p, hi_p])
        if hi <= lo:
            # no spread among the non-background voxels (a binary image, a phantom, one bright spot):
            # clipping to that empty range would turn every voxel into 0, so use the full range
            lo, hi = np.float64(channel.min()), np.float64(channel.max())
            if hi <= lo:
                hi = lo + 1e-6
        # in float64 as (clip(x, lo, hi) - lo) / (hi - lo) with float64 bounds computes it, then rounded
        # once; slab by slab along the first axis, so the float64 copy is a few MiB, not twice the volume
        (flat, rows), dest = _slabs(channel), out[c].reshape(channel.shape[0], -1)
        if scratch is None:
            scratch = np.empty((min(rows, flat.shape[0]), flat.shape[1]), dtype=np.float64)
        for start in range(0, flat.shape[0], rows):
            part = scratch[:min(rows, flat.shape[0] - start)]
            np.clip(flat[start:start + rows], lo, hi, out=part)
            np.subtract(part, lo, out=part)
            np.divide(part, hi - lo, out=dest[start:start + rows], casting="same_kind")
        if cfg.normalize == "zscore":
            inside = out[c][mask] if mask is not None and mask.any() else out[c].ravel()
            out[c] = (out[c] - inside.mean()) / max(float(inside.std()), 1e-6)
    return out


def named_images(images: str | Path | Sequence[str | Path] | dict[str, str | Path]) -> dict[str, Path]:
    """A path, a list of paths or a modality -> path mapping, as an ordered modality -> Path dict."""
    if isinstance(images, (str, Path)):
        return {"image": Path(images)}
    if isinstance(images, dict):
        return {k: Path(v) for k, v in images.items()}
    return {f"image{i}": Path(p) for i, p in enumerate(images)}


def load_volume(
    images: str | Path | Sequence[str | Path] | dict[str, str | Path],
    cfg: VolumeConfig | None = None,
    *,
    seg: str | Path | None = None,
    maps: dict[str, str | Path] | None = None,
    subject_id: str | None = None,
) -> Volume:
    """Loads one subject: one or several modalities on the same grid, plus optional label maps.

    Args:
        images: a path, a list of paths, or a modality -> path mapping (channels in that order).
        cfg: loading options; defaults to :class:`VolumeConfig()`.
        seg: optional integer segmentation on the image grid.
        maps: other optional integer/binary maps (e.g. ``{"lesion": path}``) on the same grid.
        subject_id: defaults to the first image's file stem.

    Returns:
        A :class:`Volume` with data of shape (C, X, Y, Z) in RAS.

    Raises:
        VolumeError: the first problem found, as ``"<path>: <problem>"``.
    """
    try:
        return _load_volume(images, cfg or VolumeConfig(), seg, maps, subject_id)
    except MemoryError:
        first = next(iter(named_images(images).values()))
        size = _fmt_bytes(first.stat().st_size) if first.exists() else "?"
        raise VolumeError(first, f"too large to load: out of memory while reading, reorienting or resampling "
                                 f"it (file {size})") from None


def label_map_problem(data: np.ndarray, max_samples: int = 1_000_000) -> str | None:
    """Why ``data`` (X, Y, Z) looks like a label map rather than an image (None: it does not).

    A segmentation or mask is piecewise constant: 1 to 1,024 integer labels besides 0 (a binary brain
    mask has one, a tissue map three, DLMUSE 145), and most in-plane neighbour pairs that touch the
    foreground carry the same one (0.70-0.77 in the 2 mm IXI DLMUSE maps, more at 1 mm; refused from
    0.5). An image's neighbours differ: under 0.25 in IXI T1s quantised to 60 levels. Scattered specks
    (every pair a speck and background) stay low and are left to the foreground check. Reads whole
    slices (every ``step``-th along the first axis), at most ``max_samples`` voxels.
    """
    step = max(1, -(-data.size // max_samples)) if data.ndim == 3 else 1
    sample = np.asarray(data[::step])
    values = sample[sample != 0]
    if values.size < 0.01 * sample.size:  # a few specks: the foreground check names them
        return None
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        return None
    levels = np.unique(values)
    if not 1 <= len(levels) <= 1024 or (len(levels) == 1 and values.size == sample.size):
        return None  # one value everywhere is a constant volume, refused as such later
    same = []
    for axis in range(1, sample.ndim):  # in-plane neighbours: the kept slices are whole
        a = np.moveaxis(sample, axis, 0)
        x, y = a[1:], a[:-1]
        # pairs touching the foreground: a label map's differ only on its boundaries; scattered
        # specks (every pair speck-background) and an image's textured voxels differ almost everywhere
        either = (x != 0) | (y != 0)
        if either.any():
            same.append(float(np.mean(x[either] == y[either])))
    share = float(np.mean(same)) if same else 0.0
    if share < 0.5:
        return None
    shown = ", ".join(f"{v:.10g}" for v in levels[:4]) + (", ..." if len(levels) > 4 else "")
    what = "value" if len(levels) == 1 else "values"
    return (f"looks like a label map or mask, not an image: {len(levels)} distinct non-zero integer {what} ({shown}) in "
            f"patches, {share:.0%} of neighbouring voxels equal (a segmentation in an image column? "
            "VolumeConfig.refuse_label_maps=false lets it through)")


def _load_volume(images, cfg: VolumeConfig, seg, maps, subject_id) -> Volume:
    """:func:`load_volume` without its out-of-memory guard (same arguments)."""
    named = named_images(images)
    if not named:
        raise ValueError("load_volume: no image given")
    first = next(iter(named.values()))
    sid = subject_id or first.name.split(".nii")[0]

    opened = {name: read_nifti(path) for name, path in named.items()}
    ref = opened[next(iter(named))]
    unit = _unit_of(ref)  # the first file's spacing unit when not mm, for the messages below
    for name, img in opened.items():
        if not _same_grid(img, ref):
            raise VolumeError(named[name], f"modality {name!r} is not on the grid of {first} "
                                           f"({_grid_difference(img, ref)})")
    del img  # the loop's last image would otherwise live on (and its data) through normalisation
    problem = _extent_problem(ref.affine, ref.shape[:3], cfg, unit)
    if problem:
        raise VolumeError(first, problem)
    tilt = _obliquity_deg(ref.affine)
    grid = None
    action = "none"
    if tilt > cfg.max_obliquity_deg:
        if cfg.oblique == "refuse":
            raise VolumeError(first, f"oblique affine ({tilt:.1f} deg off the nearest axes); reslice it "
                                     "(--oblique reslice, the default) or snap it (--oblique snap)")
        if cfg.oblique == "reslice":
            grid = nearest_ras_grid(ref.affine, ref.shape[:3])
            problem = _reslice_memory_problem(grid[1], ref.shape[:3], len(opened))
            if problem:
                raise VolumeError(first, problem)
            action = "resliced"
        else:
            action = "snapped"
    channels, affine, codes = [], None, None
    ref = _Grid(tuple(ref.shape[:3]), ref.affine)  # what the label maps are checked against
    for name in list(opened):
        # each file's image (its decompressed bytes and float cache) goes once its RAS array exists:
        # a 400^3 int16 .nii.gz held 366 MiB of them through normalisation
        data, aff, file_codes = _on_grid(opened.pop(name), grid, order=cfg.reslice_order)
        problem = label_map_problem(data) if cfg.refuse_label_maps else None
        if problem:
            raise VolumeError(named[name], problem)
        if affine is None:
            affine, codes = aff, file_codes
        channels.append(data)
    sources = [str(p) for p in named.values()]
    original_shape = ref.shape[:3]
    assert affine is not None
    # a background above the darkest voxels (a brain z-scored inside its mask: 0 around it, half the
    # brain below 0) read as foreground, and the volume was refused as 100% foreground
    channels = [floored if (floored := background_to_floor(c)) is not None else c for c in channels]
    stacked = channels[0][None] if len(channels) == 1 else np.stack(channels)  # one channel: a view, no copy
    del channels, data  # several channels were copied into `stacked`

    label_maps: dict[str, np.ndarray] = {}
    for name, path in (({"seg": seg} if seg is not None else {}) | dict(maps or {})).items():
        img = read_nifti(path, check_values=False)
        if not _same_grid(img, ref):
            raise VolumeError(path, f"{name} map is not on the image grid ({_grid_difference(img, ref)})")
        lab, _, _ = _on_grid(img, grid, order=0)
        label_maps[name] = integer_labels(path, name, lab)

    if cfg.spacing is not None:
        problem = _resample_memory_problem(stacked.shape, affine, cfg.spacing, len(label_maps))
        if problem:  # torch's allocator error named no file and said nothing of the spacing
            raise VolumeError(first, problem)
        new_stacked, new_affine = resample(stacked, affine, cfg.spacing, order="linear")
        label_maps = {k: resample(v, affine, cfg.spacing, order="nearest")[0] for k, v in label_maps.items()}
        stacked, affine = new_stacked, new_affine

    scaled = normalize_intensity(stacked, None, dataclasses.replace(cfg, normalize="minmax")) \
        if cfg.normalize != "none" else stacked
    if cfg.normalize == "minmax":
        del stacked  # the raw intensities are not needed again (zscore reads them once more)
    mask = foreground_mask(scaled)
    share = float(np.count_nonzero(mask)) / mask.size if mask.size else 0.0
    if share < cfg.min_foreground_fraction:
        # a head covers 10-60% of its grid: specks in a blank volume passed every check and were
        # embedded by `embed` (the slice check of `cache` refused them, with other words)
        raise VolumeError(first, f"the foreground covers {_percent(share)} of the grid ({int(np.count_nonzero(mask))} "
                                 f"of {mask.size} voxels), under {_percent(cfg.min_foreground_fraction)}: no head in it "
                                 "(a blank volume with specks, or the wrong file; VolumeConfig.min_foreground_fraction "
                                 "sets the limit, 0 turns it off)")
    if share > cfg.max_foreground_fraction:
        raise VolumeError(first, f"the foreground covers {100 * share:.1f}% of the grid, over "
                                 f"{_percent(cfg.max_foreground_fraction)}: no background around a head (noise, an "
                                 "inverted image with the air brightest, or not a head scan; "
                                 "VolumeConfig.max_foreground_fraction sets the limit, 1 turns it off)")
    if cfg.normalize == "zscore":
        scaled = normalize_intensity(stacked, mask, cfg)

    if cfg.crop_foreground and mask.any():
        idx = np.nonzero(mask)
        start = np.maximum([i.min() - cfg.crop_margin for i in idx], 0)
        stop = np.minimum([i.max() + 1 + cfg.crop_margin for i in idx], mask.shape)
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        scaled = scaled[(slice(None),) + box]
        mask = mask[box]
        label_maps = {k: v[box] for k, v in label_maps.items()}
        shift = np.eye(4)
        shift[:3, 3] = start
        affine = affine @ shift

    seg_map = label_maps.pop("seg", None)
    return Volume(
        subject_id=sid,
        data=np.ascontiguousarray(scaled, dtype=np.float32),
        affine=affine,
        mask=np.ascontiguousarray(mask),
        seg=None if seg_map is None else np.ascontiguousarray(seg_map),
        modalities=tuple(named),
        sources=tuple(sources),
        original_orientation=tuple(codes or ORIENTATION),
        original_shape=tuple(original_shape or ()),
        maps={k: np.ascontiguousarray(v) for k, v in label_maps.items()},
        obliquity_deg=round(tilt, 3),
        oblique_action=action,
    )


# -- input fingerprints (the resume key of caching jobs) --------------------------------------------
def file_stat(path: str | Path) -> dict[str, int]:
    """``{"size", "mtime_ns"}`` of a file: the cheap half of its fingerprint."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (as stored, e.g. gzip-compressed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(images: dict[str, str | Path]) -> dict[str, dict]:
    """Fingerprint of a subject's input files: modality -> ``{"size", "mtime_ns", "sha256"}``.

    Stored with cached features; :func:`fingerprint_changes` compares it with the files now.

    Raises:
        VolumeError: a file is missing, a directory or unreadable (the same words as :func:`read_nifti`).
    """
    out = {}
    for name, path in images.items():
        problem = file_problem(path)  # before opening: a named pipe would block the hashing for ever
        if problem:
            raise VolumeError(path, problem)
        try:
            out[name] = {**file_stat(path), "sha256": file_sha256(path)}
        except OSError as err:  # (missing files and folders are file_problem's)
            raise VolumeError(path, f"unreadable ({err.strerror or _short(err)})") from None
    return out


def fingerprint_changes(stored: dict[str, dict], images: dict[str, str | Path]) -> list[str]:
    """What changed between a stored :func:`fingerprint` and the files now (empty: unchanged).

    Size and modification time are compared first (cheap); only a file whose size or time differs
    is hashed, so touching or copying a file with ``cp`` does not count as a change, and a rewritten
    file of the same size does (when its mtime moved).
    """
    now = {k: Path(v) for k, v in images.items()}
    changes = []
    if set(stored) != set(now):
        return [f"modalities {sorted(stored)} -> {sorted(now)}"]
    for name, path in now.items():
        old = stored[name]
        if file_problem(path):
            continue  # a missing or odd file fails at loading, with its own message
        try:
            st = file_stat(path)
        except OSError:
            continue
        if st["size"] == old.get("size") and st["mtime_ns"] == old.get("mtime_ns"):
            continue
        if old.get("sha256") and file_sha256(path) == old["sha256"]:
            continue
        what = f"size {old.get('size')} -> {st['size']} bytes" if st["size"] != old.get("size") else "content"
        changes.append(f"{name} ({path.name}): {what}")
    return changes
