"""The segmentation task end to end on a small cohort: sets (encoder, twin, control), rows, paired
tests, figures, feature files and the cached rerun."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from slice2vol.encoders.base import ENCODERS, Encoder, EncoderInfo, load_state_dict
from slice2vol.eval.dense import Level
from tests.conftest import write_nifti

KEY = "test/dense_cnn"


class DenseCNN(Encoder):
    """Two conv stages (strides 2 and 4) with the dense-feature API of CONTRACTS section 1."""

    def __init__(self, img_size: int = 32) -> None:
        super().__init__()
        self.info = EncoderInfo(key=KEY, embed_dim=16, input_size=(img_size, img_size), patch_size=4, token_dim=16,
                                source="test", resize="squash", mean=(0.5,) * 3, std=(0.25,) * 3)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def feature_info(self):
        return [Level(0, "conv1", 8, 2), Level(1, "conv2", 16, 4)]

    def forward_intermediates(self, x, levels=None, **_):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        maps = [a, b]
        return [maps[i] for i in (levels if levels is not None else (0, 1))]

    @torch.inference_mode()
    def feature_maps(self, images, levels=None, batch_size=32, **_):
        out = [self.forward_intermediates(self._prepare(images[i:i + batch_size]), levels)
               for i in range(0, len(images), batch_size)]
        return [torch.cat([o[j] for o in out]).float() for j in range(len(out[0]))]

    def forward_features(self, x):
        return self.forward_intermediates(x, [1])[0].mean((-2, -1))

    def forward_tokens(self, x):
        fmap = self.forward_intermediates(x, [1])[0]
        return fmap.flatten(2).transpose(1, 2), tuple(fmap.shape[-2:])


if KEY not in ENCODERS:
    @ENCODERS.register(KEY, embed_dim=16)
    def build_dense_cnn(weights="random", img_size: int = 32, **_):
        model = DenseCNN(img_size)
        if weights not in ("random", None, ""):
            model.load_state_dict(load_state_dict(weights))
            model.info.weights = str(weights)
        return model


def pretrained_weights(path: Path) -> Path:
    """'Pretrained' weights: conv1 detects the bright core (a fixed edge/level filter), so the
    pretrained net and its random twin differ in a way the probe can measure."""
    torch.manual_seed(123)
    model = DenseCNN()
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[:, :, 1, 1] = torch.linspace(-1, 1, 8)[:, None]
        model.conv1.bias.copy_(torch.linspace(-1, 1, 8))
    torch.save(model.state_dict(), path)
    return path


def blob_cohort(root: Path, n: int = 8, shape=(24, 28, 20)):
    """Ellipsoid heads with a bright core (seg 2) inside a darker shell (seg 1), shifted per subject."""
    from slice2vol.data.manifest import load_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        centre = rng.uniform(-0.1, 0.1, 3)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        radius = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        core = rng.uniform(0.35, 0.5)
        vol = np.where(radius < 0.85, 40.0, 0.0) + np.where(radius < core, 60.0, 0.0) + rng.normal(0, 2, shape)
        seg = np.where(radius < core, 2, np.where(radius < 0.85, 1, 0)).astype(np.int16)
        write_nifti(root / f"s{i}.nii.gz", vol.astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
        write_nifti(root / f"s{i}_seg.nii.gz", seg, np.diag([4.0, 4.0, 4.0, 1.0]))
        rows.append({"subject_id": f"s{i:02d}", "t1": f"s{i}.nii.gz", "seg": f"s{i}_seg.nii.gz", "grp": i % 2})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return load_manifest(root / "manifest.csv")


def context(tmp_path: Path, cohort, weights: Path, tasks=("segmentation",), **blocks):
    from slice2vol.config import from_dict
    from slice2vol.eval.experiment import ExperimentConfig
    from slice2vol.eval.resultcache import ResultCache

    data = {"tasks": list(tasks), "n_bootstrap": 50, "n_permutations": 50,
            "encoders": [{"name": "cnn", "key": KEY, "weights": str(weights)}],
            "segmentation": {"structures": {"shell": [1], "core": [2]}, "n_folds": 2,
                             "features": {"slice_size": 32, "img_size": 32},
                             "probe": {"variants": {"multilayer": [0, 1], "linear": ["last"]}, "per_class": 40}},
            **blocks}
    cfg = from_dict(ExperimentConfig, data)
    out = tmp_path / "run"
    return SimpleNamespace(cfg=cfg, base=tmp_path, out=out, cohort=cohort, cache=ResultCache(out / "cache"),
                           progress=False, timings={}, reference="cnn/mean")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    return blob_cohort(root), pretrained_weights(root / "cnn.pth")


def test_segmentation_task_rows_tests_figures_and_cached_rerun(small, tmp_path, monkeypatch):
    from slice2vol.eval import dense_bench
    from slice2vol.eval.tasks import get_task

    cohort, weights = small
    ctx = context(tmp_path, cohort, weights)
    res = get_task("segmentation").run(ctx)
    assert not res.skipped, res.skipped
    sets = res.extras["sets"]
    assert sets["cnn"]["twin"] == "cnn:random-init" and sets["cnn:random-init"]["kind"] == "twin"
    assert sets["control:intensity"]["kind"] == "control"
    dice = {(r["encoder"], r["label"], r["variant"].split(" ")[0]): r for r in res.rows if r["metric"] == "dice"}
    assert {k[0] for k in dice} == {"cnn", "cnn:random-init", "control:intensity"}
    # the core is bright: every set segments it well above chance with the multi-layer probe
    for name in ("cnn", "cnn:random-init", "control:intensity"):
        row = dice[(name, "core", "multilayer")]
        assert row["estimate"] > 0.7, row
        assert row["ci_low"] <= row["estimate"] <= row["ci_high"] and row["n_subjects"] == 8
        assert {"pooled", "fold_mean", "fold_sd", "estimate_kind", "n_folds"} <= set(row)
    assert ("cnn", "core", "linear") in dice and ("control:intensity", "core", "linear") not in dice
    assert any(r["metric"] == "hd95_mm" and np.isfinite(r["estimate"]) for r in res.rows)
    pairs = {(p["encoder"], p["reference"], p["label"]) for p in res.paired}
    assert {("cnn", "cnn:random-init", "core"), ("cnn", "control:intensity", "core"),
            ("cnn:random-init", "control:intensity", "shell")} <= pairs
    assert all(0 < p["p_value"] <= p["p_holm"] <= 1 for p in res.paired)
    assert set(res.extras["gains"]["cnn"]["core"]) == {"cnn:random-init", "control:intensity"}
    for fig in res.figures:
        assert (ctx.out / fig["png"]).exists() and (ctx.out / fig["svg"]).exists()
    assert len(res.figures) == 2
    assert not list((ctx.out / "cache" / "dense").glob("*/*.npz"))  # feature files removed after the task

    def no_extraction(*args, **kwargs):
        raise AssertionError("a cached rerun must not extract features")

    monkeypatch.setattr(dense_bench.DenseFeatureFiles, "ensure", no_extraction)
    again = get_task("segmentation").run(context(tmp_path, cohort, weights))
    assert [r["estimate"] for r in again.rows] == [r["estimate"] for r in res.rows]


def test_unknown_encoder_name_and_too_few_subjects(small, tmp_path):
    from slice2vol.eval.tasks.segmentation import run_segmentation

    cohort, weights = small
    ctx = context(tmp_path, cohort, weights)
    ctx.cfg.segmentation.encoders = ["nope"]
    with pytest.raises(ValueError, match="unknown encoder name"):
        run_segmentation(ctx)
    ctx = context(tmp_path, cohort, weights)
    ctx.cfg.segmentation.max_subjects = 3
    out = run_segmentation(ctx)
    assert out["rows"] == [] and "subjects with a segmentation" in out["skipped"][0]["reason"]
