"""Shared pieces of the SSL tests: a tiny volume bank (4 IXI subjects at 32^3, or blobs) and tiny configs."""

from __future__ import annotations

import pytest
import torch

from slice2vol.config import from_dict
from slice2vol.ssl import SSLConfig
from tests.conftest import ixi_root

TINY_BACKBONE = {"name": "cnn", "params": {"width": 8, "num_stages": 3}}
TINY_VIT = {"name": "vit", "params": {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2,
                                      "num_heads": 4}}


def tiny_config(method: str, dims: int = 3, **train) -> SSLConfig:
    """A config small enough for a CPU test step in a fraction of a second (24^3 crops, 32^2 slices)."""
    return from_dict(SSLConfig, {
        "method": method, "spatial_dims": dims,
        "backbone": TINY_VIT if method == "mae" else TINY_BACKBONE,
        "method_params": {"decoder_min_width": 8} if method in ("autoencoder", "genesis") else {},
        "data": {"volume_size": [32, 32, 32], "crop_size": [24, 24, 24], "slice_size": [32, 32]},
        "train": {"steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 5,
                  "log_every": 1, "device": "cpu", "count_flops": False, **train},
    })


@pytest.fixture(scope="session")
def bank():
    """4 IXI volumes fitted into 32^3 when the cohort is present, else 4 synthetic blob heads."""
    from slice2vol.data.manifest import load_manifest
    from slice2vol.ssl.data import VolumeBank

    root = ixi_root()
    if root is None:
        return VolumeBank.synthetic(4, (32, 32, 32))
    cohort = load_manifest(root / "participants.csv")
    cohort = cohort.subset(cohort.ids[:4])
    return VolumeBank.from_cohort(cohort, volume_size=(32, 32, 32), progress=False)


class FixedBatch:
    """A 'dataset' whose every sample is the same batch with the same pretext randomness.

    Re-seeding before each step fixes the views, masks, corruptions and pretext labels that
    ``training_step`` draws next, to exactly those :func:`loss_at_seed` uses: the test measures
    whether the optimisation fits one fixed problem.
    """

    def __init__(self, batch: torch.Tensor, seed: int = 1234) -> None:
        self.batch, self.seed = batch, seed

    def sample(self, n: int) -> torch.Tensor:
        torch.manual_seed(self.seed)
        return self.batch[:n]


def loss_at_seed(model, batch: torch.Tensor, seed: int = 1234) -> float:
    """The method's loss on ``batch`` with its random views/masks/labels fixed by ``seed``."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        loss = float(model.training_step(batch)[0])
    torch.set_rng_state(state)
    return loss


def fit_fixed_batch(cfg: SSLConfig, bank, tmp_path, n: int = 4):
    """Trains ``cfg`` on one fixed batch; returns (loss before, loss after, TrainResult)."""
    from slice2vol.ssl import build_method
    from slice2vol.ssl.data import make_dataset
    from slice2vol.ssl.trainer import seed_everything, train

    seed_everything(0)
    batch = make_dataset(bank, cfg.spatial_dims, cfg.data).sample(n)
    model = build_method(cfg)
    before = loss_at_seed(model, batch)
    result = train(model, FixedBatch(batch), cfg, tmp_path, progress=False, plot=False)
    after = loss_at_seed(model, batch)
    return before, after, result


@pytest.fixture
def blob_manifest(tmp_path):
    """A 3-subject manifest of small synthetic NIfTI heads with age/sex labels (always available)."""
    import pandas as pd

    from tests.conftest import blob_volume, write_nifti

    rows = []
    for i in range(3):
        path = write_nifti(tmp_path / "nii" / f"s{i}.nii.gz", blob_volume((24, 28, 20), seed=i))
        rows.append({"subject_id": f"s{i}", "age": 20.5 + 10 * i, "sex": "MF"[i % 2], "t1": str(path)})
    csv = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv
