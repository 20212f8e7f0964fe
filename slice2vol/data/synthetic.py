"""The offline default cohort: labelled synthetic T1 volumes built from the MNI152 template.

nilearn ships the ICBM 2009a MNI152 T1 template with grey/white-matter probability maps and a brain
mask (no download). Every subject is that real anatomy, changed in ways a cohort varies:

* a random smooth deformation (coarse control grid, trilinear upsampling) plus a small global
  scaling and rotation — no two brains have the same shape;
* contrast changes: per-tissue intensity jitter, a gamma curve, a multiplicative bias field and
  Gaussian noise whose strengths depend on a nuisance ``site`` (scanner) label;
* class-defining effects: ``lesion`` (0/1) subjects get 1-3 ellipsoidal white-matter lesions
  (T1-hypointense or -hyperintense, 4-14 mm radius) whose ground-truth mask is written beside the
  image (all-zero for ``lesion = 0``); the continuous ``atrophy`` score (0-1) enlarges the
  ventricles and widens the sulcal CSF proportionally.

Labels in the manifest: ``lesion`` (categorical), ``atrophy`` (continuous), ``site`` (categorical,
a confound that good encoders also pick up). The segmentation ``seg`` holds tissue labels
1 = CSF, 2 = GM, 3 = WM, 4 = ventricles, deformed with the image. Subject ``i`` of seed ``s``
depends only on ``(s, i)``, so the same seed always gives the same cohort.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

TISSUES = {1: "csf", 2: "gm", 3: "wm", 4: "ventricles"}


@dataclass
class SynthConfig:
    """Knobs of the generator; defaults give a cohort a good encoder separates.

    Attributes:
        n_subjects: cohort size; half get lesions (alternating, so any prefix is balanced), and
            site alternates in pairs so it does not predict the lesion label.
        seed: master seed.
        spacing: output voxel size in mm (2.0 is the template's own grid; 4.0 makes tiny test cohorts).
        deformation_mm: standard deviation of the smooth displacement field.
        noise: Gaussian noise std relative to the white-matter intensity.
        bias: strength of the multiplicative bias field (0.2 = about +-20%).
        lesion_radius_mm: range of lesion semi-axes.
        max_ventricle_growth_mm: ventricle dilation at ``atrophy = 1``.
    """

    n_subjects: int = 32
    seed: int = 0
    spacing: float = 2.0
    deformation_mm: float = 2.5
    noise: float = 0.03
    bias: float = 0.2
    lesion_radius_mm: tuple[float, float] = (4.0, 14.0)
    max_ventricle_growth_mm: float = 6.0

    def __post_init__(self) -> None:
        # refused here in words: n_subjects 0 or spacing 0 used to end in a numpy traceback mid-build
        from slice2vol.config import check_real, check_whole

        check_whole("n_subjects", self.n_subjects, 1)
        check_whole("seed", self.seed, 0)
        # the template's own grid is 2 mm; under 0.5 mm one subject is > 50 M voxels of interpolation
        check_real("spacing", self.spacing, 0.5, 16.0)
        for key in ("deformation_mm", "noise", "bias", "max_ventricle_growth_mm"):
            check_real(key, getattr(self, key), 0.0)
        radii = list(self.lesion_radius_mm) if isinstance(self.lesion_radius_mm, (list, tuple)) else None
        if radii is None or len(radii) != 2:
            raise ValueError(f"lesion_radius_mm must be [low, high] in mm, got {self.lesion_radius_mm!r}")
        for r in radii:
            check_real("lesion_radius_mm", r, 0.0, low_open=True)
        if radii[0] > radii[1]:
            raise ValueError(f"lesion_radius_mm must be [low, high] with low <= high, got {radii}")


@dataclass
class _Template:
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray
    brain: np.ndarray
    affine: np.ndarray


def _load_template() -> _Template:
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=2)
    t1 = t1_img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata(dtype=np.float32) > 0
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0, 1)
    # ventricles: dark CSF components lying wholly inside a box around the lateral and third
    # ventricles (MNI mm); the sulcal/cisternal CSF forms one huge component reaching outside it
    from scipy import ndimage

    affine = t1_img.affine
    candidates = (csf > 0.5) & (t1 < 0.45)
    components, count = ndimage.label(candidates)
    ventricles = np.zeros_like(candidates)
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        corners = np.array([[sl.start for sl in box], [sl.stop - 1 for sl in box]], dtype=float)
        lo, hi = (affine[:3, :3] @ corners.T + affine[:3, 3:4]).T
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        inside = lo[0] > -36 and hi[0] < 36 and lo[1] > -62 and hi[1] < 36 and lo[2] > -12 and hi[2] < 36
        if inside and (components[box] == index).sum() >= 20:
            ventricles |= components == index
    return _Template(t1, gm, wm, csf, ventricles, brain, affine)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], grid: int, channels: int):
    """Random smooth field (channels, *shape) from a coarse Gaussian grid upsampled trilinearly."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal((1, channels, grid, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0].numpy()


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.radians(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warp(arrays: list[np.ndarray], modes: list[str], displacement_vox: np.ndarray,
          linear: np.ndarray) -> list[np.ndarray]:
    """Pulls every array through x -> linear @ (x - c) + c + displacement(x), in voxel units."""
    import torch
    import torch.nn.functional as F

    shape = arrays[0].shape
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = (np.array(shape, dtype=np.float32) - 1)[:, None, None, None] / 2
    source = np.einsum("ij,jxyz->ixyz", linear.astype(np.float32), grid - centre) + centre
    source = source + displacement_vox
    # grid_sample wants (x=W, y=H, z=D) in [-1, 1]; our arrays are (D, H, W) = (X, Y, Z)
    norm = [2 * source[i] / (shape[i] - 1) - 1 for i in range(3)]
    sample = torch.from_numpy(np.stack([norm[2], norm[1], norm[0]], -1)[None].astype(np.float32))
    out = []
    for arr, mode in zip(arrays, modes):
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
        warped = F.grid_sample(t, sample, mode=mode, padding_mode="zeros", align_corners=True)
        out.append(warped[0, 0].numpy())
    return out


def _ellipsoid(shape, centre, radii_vox, rotation) -> np.ndarray:
    idx = np.indices(shape).reshape(3, -1).T - centre
    local = idx @ rotation
    return (((local / radii_vox) ** 2).sum(1) <= 1).reshape(shape)


def make_subject(template: _Template, cfg: SynthConfig, index: int) -> dict:
    """One synthetic subject: image, tissue seg, lesion mask and labels (all on the template grid)."""
    from scipy import ndimage

    rng = np.random.default_rng([cfg.seed, index])
    lesion = index % 2
    atrophy = float(rng.uniform(0, 1))
    # site cycles A, A, B, B so it is balanced and independent of the lesion label in any prefix
    site = "A" if (index // 2) % 2 == 0 else "B"
    shape = template.t1.shape
    vox_mm = 2.0

    gm, wm, csf = template.gm.copy(), template.wm.copy(), template.csf.copy()
    ventricles = template.ventricles
    # atrophy: ventricles grow by up to max_ventricle_growth_mm into the surrounding tissue,
    # and sulcal CSF widens (GM/WM probability is partly replaced by CSF)
    growth_vox = atrophy * cfg.max_ventricle_growth_mm / vox_mm
    if growth_vox > 0:
        distance = ndimage.distance_transform_edt(~ventricles)
        grown = (distance <= growth_vox) & template.brain
        ventricles = grown
    widen = 0.45 * atrophy * ndimage.uniform_filter(csf, 3)
    gm = gm * (1 - widen)
    wm = wm * (1 - 0.5 * widen)
    csf = np.clip(template.brain - gm - wm, 0, 1)
    gm[ventricles], wm[ventricles], csf[ventricles] = 0, 0, 1

    # intensities: each tissue's mean drawn around the template's own contrast
    levels = {"csf": rng.uniform(0.08, 0.2), "gm": rng.uniform(0.5, 0.62), "wm": rng.uniform(0.8, 0.92)}
    image = csf * levels["csf"] + gm * levels["gm"] + wm * levels["wm"]
    # keep the template's fine texture (vessels, deep nuclei) as a residual
    residual = template.t1 - (template.csf * 0.14 + template.gm * 0.56 + template.wm * 0.86)
    image = image + 0.5 * residual * template.brain

    lesion_mask = np.zeros(shape, dtype=bool)
    if lesion:
        candidates = np.argwhere((template.wm > 0.9) & ~ventricles)
        for _ in range(int(rng.integers(1, 4))):
            centre = candidates[rng.integers(len(candidates))]
            radii = rng.uniform(*cfg.lesion_radius_mm, size=3) / vox_mm
            blob = _ellipsoid(shape, centre, radii, _rotation(rng, 90)) & template.brain
            lesion_mask |= blob
        kind_level = rng.choice([levels["csf"] + 0.15, levels["wm"] + 0.12])
        soft = ndimage.gaussian_filter(lesion_mask.astype(np.float32), 0.7)
        image = image * (1 - soft) + kind_level * soft

    seg = np.zeros(shape, dtype=np.float32)
    tissue = np.stack([csf, gm, wm])
    seg[template.brain] = 1 + np.argmax(tissue[:, template.brain], axis=0)
    seg[ventricles] = 4

    # shape: smooth deformation + small global affine, same warp for image and label maps
    displacement = _smooth_field(rng, shape, 5, 3) * (cfg.deformation_mm / vox_mm)
    linear = _rotation(rng, 4.0) @ np.diag(rng.uniform(0.94, 1.06, 3))
    image, seg, lesion_f = _warp([image, seg, lesion_mask.astype(np.float32)],
                                 ["bilinear", "nearest", "nearest"], displacement, linear)
    head = image > 0.02

    # scanner: bias field, gamma, noise; site B is noisier and flatter
    site_noise = cfg.noise * (1.6 if site == "B" else 1.0)
    bias = np.exp(cfg.bias * _smooth_field(rng, shape, 3, 1)[0] * (1.3 if site == "B" else 1.0))
    gamma = rng.uniform(0.8, 1.25) * (1.1 if site == "B" else 1.0)
    image = np.clip(image, 0, None) ** gamma * bias
    image = image + rng.normal(0, site_noise, shape) * (head | (rng.uniform(size=shape) < 0.3))
    image = np.clip(image, 0, None)
    return {
        "image": image.astype(np.float32),
        "seg": seg.astype(np.uint8),
        "lesion_mask": (lesion_f > 0.5).astype(np.uint8),
        "labels": {"lesion": lesion, "atrophy": round(atrophy, 4), "site": site},
    }


def _resample_to(arr: np.ndarray, affine: np.ndarray, spacing: float, order: str):
    from slice2vol.data.io import resample

    return resample(arr, affine, (spacing,) * 3, order=order)  # type: ignore[arg-type]


def make_cohort(out_dir: str | Path, n_subjects: int | None = None, seed: int | None = None,
                spacing: float | None = None, cfg: SynthConfig | None = None,
                progress: bool = True, **knobs) -> Path:
    """Writes the synthetic cohort (NIfTI + ``manifest.csv``) and returns the manifest path.

    Args:
        out_dir: destination folder (created); files go to ``images/``, ``seg/``, ``lesions/``.
        n_subjects, seed, spacing: shortcuts overriding ``cfg``.
        cfg: full generator config.
        progress: report progress (a bar on a terminal, log lines otherwise; :mod:`slice2vol.progress`).
        **knobs: any other :class:`SynthConfig` field (e.g. ``lesion_radius_mm=(8, 16)``), so an
            experiment config's ``cohort.synthetic`` mapping can set them.

    Raises:
        ValueError: a knob that is not a SynthConfig field.
    """
    cfg = cfg or SynthConfig()
    fields = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ValueError(f"synthetic cohort: unknown setting(s) {unknown}; known: {sorted(fields)}")
    if isinstance(knobs.get("lesion_radius_mm"), (list, tuple)):
        knobs["lesion_radius_mm"] = tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                          else v for v in knobs["lesion_radius_mm"])
    overrides = {k: v for k, v in {"n_subjects": n_subjects, "seed": seed, "spacing": spacing, **knobs}.items()
                 if v is not None}
    try:  # checked before the template is read or a file is written
        cfg = dataclasses.replace(cfg, **overrides)
    except ValueError as err:
        raise ValueError(f"synthetic cohort: {err}") from None
    out = Path(out_dir)
    for sub in ("images", "seg", "lesions"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    template = _load_template()
    rows = []
    from slice2vol.progress import track

    for i in track(range(cfg.n_subjects), desc="synth", unit="subjects", enabled=progress):
        subject = make_subject(template, cfg, i)
        sid = f"synth-{cfg.seed:02d}-{i:03d}"
        affine = template.affine
        image, seg, lesion = subject["image"], subject["seg"], subject["lesion_mask"]
        if cfg.spacing != 2.0:
            image, new_affine = _resample_to(image, affine, cfg.spacing, "linear")
            seg = _resample_to(seg, affine, cfg.spacing, "nearest")[0]
            lesion = _resample_to(lesion, affine, cfg.spacing, "nearest")[0]
            if subject["labels"]["lesion"] and not lesion.any():
                # a lesion smaller than one coarse voxel still marks the subject as positive
                lesion = (_resample_to(subject["lesion_mask"].astype(np.float32), affine,
                                       cfg.spacing, "linear")[0] > 0.1).astype(np.uint8)
            affine = new_affine
        paths = {
            "t1": f"images/{sid}_T1.nii.gz",
            "seg": f"seg/{sid}_seg.nii.gz",
            "lesion_mask": f"lesions/{sid}_lesion.nii.gz",
        }
        # int16 with a scale factor, as scanners write
        img = nib.Nifti1Image(np.round(image * 1000).astype(np.int16), affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(out / paths["t1"]))
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), str(out / paths["seg"]))
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), str(out / paths["lesion_mask"]))
        rows.append({"subject_id": sid, **paths, **subject["labels"]})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "README.md").write_text(
        "Synthetic cohort made by slice2vol.data.synthetic from the MNI152 ICBM 2009a template "
        f"(nilearn).\nConfig: {dataclasses.asdict(cfg)}\n"
        "Labels: lesion (0/1), atrophy (0-1, ventricle enlargement), site (A/B, scanner confound).\n"
        "seg: 1 CSF, 2 GM, 3 WM, 4 ventricles. lesions/: ground-truth lesion masks.\n"
    )
    return manifest
