"""Volume loading: orientation, resampling geometry, intensity, and every bad-input case."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from slice2vol.data import VolumeConfig, VolumeError, load_manifest, load_subject, load_volume
from slice2vol.data.io import resample
from tests.conftest import blob_volume, write_nifti


def _psr_affine(spacing=2.0):
    # voxel axes point P, S, R (as the IXI files): x_world = R <- k, y_world = A <- -i, z_world = S <- j
    aff = np.zeros((4, 4))
    aff[0, 2] = spacing
    aff[1, 0] = -spacing
    aff[2, 1] = spacing
    aff[3, 3] = 1
    return aff


def test_reorients_psr_to_ras_and_keeps_world_positions(tmp_path):
    data = blob_volume((10, 12, 14))
    data[2, 3, 4] = 500.0  # a bright marker voxel
    aff = _psr_affine()
    path = write_nifti(tmp_path / "psr.nii.gz", data, aff)
    vol = load_volume(path, VolumeConfig(normalize="none"))
    assert vol.orientation == ("R", "A", "S")
    assert vol.original_orientation == ("P", "S", "R")
    assert vol.shape == (14, 10, 12)
    # the marker is at the same world coordinate before and after
    world_before = aff @ np.array([2, 3, 4, 1])
    ijk = np.argwhere(vol.data[0] == 500.0)[0]
    world_after = vol.affine @ np.array([*ijk, 1])
    np.testing.assert_allclose(world_after, world_before)


def test_resample_keeps_label_map_aligned_with_image(tmp_path):
    data = np.zeros((20, 20, 20), np.float32)
    data[5:11, 6:14, 4:9] = 1.0
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    new, new_aff = resample(data, aff, (2.0, 0.5, 2.0), order="linear")
    lab, lab_aff = resample(data.astype(np.int32), aff, (2.0, 0.5, 2.0), order="nearest")
    np.testing.assert_allclose(new_aff, lab_aff)
    assert new.shape == lab.shape == (10, 40, 20)
    # the label map equals the thresholded image everywhere
    assert np.mean((new > 0.5) == (lab > 0)) > 0.97
    # the object's world centre of mass does not move
    def com(arr, affine):
        idx = np.argwhere(arr > 0.5).mean(0)
        return affine[:3, :3] @ idx + affine[:3, 3]
    np.testing.assert_allclose(com(new, new_aff), com(data, aff), atol=0.3)


def test_minmax_and_zscore(tmp_path, small_nifti):
    vol = load_volume(small_nifti)
    assert vol.data.dtype == np.float32
    assert 0.0 <= vol.data.min() and vol.data.max() <= 1.0
    assert 0.05 < vol.mask.mean() < 0.9
    z = load_volume(small_nifti, VolumeConfig(normalize="zscore"))
    inside = z.data[0][z.mask]
    assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3


def test_multimodal_channels_and_crop(tmp_path):
    a = write_nifti(tmp_path / "t1.nii.gz", blob_volume(seed=1))
    b = write_nifti(tmp_path / "t2.nii.gz", blob_volume(seed=2) * 3)
    vol = load_volume({"t1": a, "t2": b}, VolumeConfig(crop_foreground=True, crop_margin=1))
    assert vol.data.shape[0] == 2 and vol.modalities == ("t1", "t2")
    assert all(s < o for s, o in zip(vol.shape, (24, 28, 20)))
    # cropping shifts the affine so the voxel keeps its world position
    full = load_volume({"t1": a, "t2": b})
    start = np.argwhere(full.mask).min(0) - 1
    np.testing.assert_allclose(vol.affine[:3, 3], full.affine[:3, :3] @ start + full.affine[:3, 3])


def test_4d_with_one_volume_is_accepted(tmp_path):
    path = write_nifti(tmp_path / "one.nii.gz", blob_volume()[..., None])
    assert load_volume(path).shape == (24, 28, 20)


def _truncated(tmp_path: Path) -> Path:
    good = write_nifti(tmp_path / "good_src.nii.gz", blob_volume())
    raw = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


def _zero_spacing(tmp_path: Path) -> Path:
    # nibabel rewrites the header on save, so the broken sform is patched into the bytes
    plain = write_nifti(tmp_path / "zero.nii", blob_volume())
    raw = bytearray(plain.read_bytes())
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[296:312] = np.zeros(4, "<f4").tobytes()  # srow_y = 0
    out = tmp_path / "zero_spacing.nii.gz"
    out.write_bytes(gzip.compress(bytes(raw)))
    return out


def _not_nifti(tmp_path: Path) -> Path:
    p = tmp_path / "text.nii.gz"
    p.write_bytes(gzip.compress(b"hello, I am not an image" * 10))
    return p


BAD_CASES = {
    "missing": (lambda t: t / "nope.nii.gz", "file not found"),
    "truncated": (_truncated, "unreadable|truncated|corrupt"),
    "not_nifti": (_not_nifti, "not a NIfTI|unreadable"),
    "2d": (lambda t: write_nifti(t / "flat.nii.gz", np.ones((10, 10), np.float32)), "2D data"),
    "4d": (lambda t: write_nifti(t / "multi.nii.gz", np.random.rand(8, 8, 8, 3).astype(np.float32)), "4D data with 3 volumes"),
    "nan": (lambda t: write_nifti(t / "nan.nii.gz", np.where(blob_volume() > 50, np.nan, blob_volume()).astype(np.float32)), "NaN/Inf voxels"),
    "empty": (lambda t: write_nifti(t / "empty.nii.gz", np.zeros((8, 8, 8), np.float32)), "empty volume"),
    "constant": (lambda t: write_nifti(t / "const.nii.gz", np.full((8, 8, 8), 7, np.float32)), "constant volume"),
    "zero_spacing": (_zero_spacing, "zero voxel spacing"),
    "absurd_spacing": (lambda t: write_nifti(t / "huge.nii.gz", blob_volume(), np.diag([1.0, 1.0, 80.0, 1.0])), "absurd voxel spacing"),
    "oblique": (lambda t: write_nifti(t / "oblique.nii.gz", blob_volume(), nib.affines.from_matvec(
        np.array([[np.cos(0.5), -np.sin(0.5), 0], [np.sin(0.5), np.cos(0.5), 0], [0, 0, 1]]), [0, 0, 0])), "oblique affine"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_one_line_error_naming_file(tmp_path, case):
    make, pattern = BAD_CASES[case]
    path = make(tmp_path)
    with pytest.raises(VolumeError, match=pattern) as info:
        load_volume(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_cohort_goes_on_after_bad_subject(tmp_path, case):
    make, pattern = BAD_CASES[case]
    bad = make(tmp_path)
    good1 = write_nifti(tmp_path / "g1.nii.gz", blob_volume(seed=1))
    good2 = write_nifti(tmp_path / "g2.nii.gz", blob_volume(seed=2))
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"subject_id,t1,age\ns1,{good1.name},30\nbad,{bad.name},40\ns2,{good2.name},50\n")
    cohort = load_manifest(csv)
    loaded = [v.subject_id for v in cohort.iter_volumes()]
    assert loaded == ["s1", "s2"]
    assert [f.subject_id for f in cohort.failures] == ["bad"]
    import re
    assert re.search(pattern, cohort.failures[0].message)
    assert str(bad.name) in cohort.failure_report()


def test_oblique_allowed_when_asked(tmp_path):
    make, _ = BAD_CASES["oblique"]
    vol = load_volume(make(tmp_path), VolumeConfig(allow_oblique=True))
    assert vol.orientation == ("R", "A", "S")


@pytest.mark.ixi
def test_ixi_all_subjects_ras_and_aligned(ixi_manifest):
    cohort = load_manifest(ixi_manifest)
    assert len(cohort) == 48 and not cohort.failures
    assert cohort.label_types == {"age": "continuous", "sex": "categorical"}
    for subject in cohort.subjects:
        vol = load_subject(subject)
        assert vol.orientation == ("R", "A", "S") and vol.original_orientation == ("P", "S", "R")
        assert vol.shape == (90, 120, 120) and vol.spacing == (2.0, 2.0, 2.0)
        # segmentation follows the image: labelled brain voxels lie inside the foreground
        brain = vol.seg > 0
        assert brain.sum() > 50_000
        assert vol.mask[brain].mean() > 0.95
        # and the raw files agree voxel-for-voxel after the same reorientation
    raw_img = nib.as_closest_canonical(nib.load(str(cohort.subjects[0].images["t1"])))
    raw_seg = nib.as_closest_canonical(nib.load(str(cohort.subjects[0].seg)))
    vol = load_subject(cohort.subjects[0])
    np.testing.assert_array_equal(vol.seg, np.asarray(raw_seg.dataobj).astype(np.int32))
    np.testing.assert_allclose(vol.affine, raw_img.affine)
