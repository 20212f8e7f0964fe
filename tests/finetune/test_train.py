"""Fine-tuning modes and objectives on tiny encoders: what changes, what does not, and the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slice2vol.encoders import build_encoder
from slice2vol.finetune import (
    FinetuneConfig,
    SimCLRObjective,
    SliceBank,
    find_blocks,
    run_finetune,
    setup_trainable,
    train_steps,
)
from slice2vol.finetune.lora import LoRALinear
from tests.conftest import blob_volume, write_nifti

TINY_VIT = dict(img_size=32, model_kwargs=dict(depth=2))


def _cfg(**kw) -> FinetuneConfig:
    cfg = FinetuneConfig(encoder="timm/vit_small_patch16_224", encoder_kwargs=TINY_VIT, **kw)
    cfg.train.steps, cfg.train.batch_size, cfg.train.proj_hidden, cfg.train.proj_dim = 4, 8, 64, 32
    cfg.train.lr = cfg.train.head_lr = 1e-2
    cfg.data.slice_size, cfg.data.slices_per_subject = 32, 2
    return cfg


def _bank(n_subjects=4, per_subject=6, seed=0) -> SliceBank:
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.random((n_subjects * per_subject, 1, 32, 32), dtype=np.float32)).half()
    owners = torch.arange(n_subjects).repeat_interleave(per_subject)
    return SliceBank([f"s{i}" for i in range(n_subjects)], images, owners)


def _named_state(net) -> dict[str, torch.Tensor]:
    """State dict with LoRA wrappers' ``.base.`` removed, so names compare across injection."""
    return {k.replace(".base.", "."): v.clone() for k, v in net.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("mode", ["lora", "last_blocks", "frozen"])
def test_only_the_mode_s_parameters_change(mode):
    torch.manual_seed(0)
    cfg = _cfg(mode=mode, last_blocks=1)
    encoder = build_encoder(cfg.encoder, **cfg.encoder_kwargs)
    before = _named_state(encoder.model)
    setup = setup_trainable(encoder.model, cfg)
    objective = SimCLRObjective(encoder.info.embed_dim, cfg)
    head_before = [p.clone() for p in objective.parameters()]
    train_steps(encoder, objective, _bank(), cfg, setup["train_modules"], progress=False)
    after = _named_state(encoder.model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    if mode == "lora":
        assert changed == []  # every original tensor bit-identical
        adapters = [m for m in encoder.model.modules() if isinstance(m, LoRALinear)]
        assert len(adapters) == 4 and all(m.lora_B.abs().sum() > 0 for m in adapters)
        assert setup["trainable"] == [n for n, _ in encoder.model.named_parameters() if "lora_" in n]
    elif mode == "last_blocks":
        assert changed and all(k.startswith(("blocks.1.", "norm.", "fc_norm.", "head.")) for k in changed)
        assert not any(k.startswith("blocks.0.") for k in changed)
        # every parameter of the last block and after it trains, the first of them included
        names = [n for n, _ in encoder.model.named_parameters()]
        start = next(i for i, n in enumerate(names) if n.startswith("blocks.1."))
        assert setup["trainable"] == names[start:]
        assert all(p.requires_grad == (i >= start) for i, (_, p) in enumerate(encoder.model.named_parameters()))
    else:
        assert changed == [] and setup["trainable"] == []
    assert any(not torch.equal(a, b) for a, b in zip(head_before, objective.parameters()))


def test_simclr_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = _cfg(mode="lora")
    cfg.train.steps = 15
    cfg.train.lr, cfg.train.head_lr = 3e-3, 3e-3
    encoder = build_encoder(cfg.encoder, **cfg.encoder_kwargs)
    setup = setup_trainable(encoder.model, cfg)
    objective = SimCLRObjective(encoder.info.embed_dim, cfg)
    batch = _bank().sample(8, torch.Generator().manual_seed(1))
    losses = train_steps(encoder, objective, None, cfg, setup["train_modules"], progress=False,
                         batch_fn=lambda g: objective.loss(encoder, batch, torch.Generator().manual_seed(2)))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_find_blocks_across_families():
    assert len(find_blocks(build_encoder("timm/resnet18").model)) == 8
    assert find_blocks(build_encoder("tv/mobilenet_v2").model)[-1][0] == "features.18"
    names = [n for n, _ in find_blocks(build_encoder("timm/efficientnet_lite0").model)]
    assert names[0] == "blocks.0.0" and len(names) == 16


@pytest.mark.parametrize("mode, objective", [("lora", "simclr"), ("last_blocks", "supervised")])
def test_checkpoint_reloads_through_build_encoder(tmp_path, mode, objective):
    cfg = _cfg(mode=mode, objective=objective, last_blocks=1, label="sex" if objective == "supervised" else None)
    cfg.data.train_ids = "all"
    bank = _bank()
    cohort = _FakeCohort(bank.ids)
    torch.manual_seed(0)
    path = run_finetune(cfg, cohort, tmp_path / "ft", bank=bank, progress=False)
    record = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert record["base_weights"] == "random" and record["base_weights_sha256"] == ""
    assert record["mode"] == mode and len(record["losses"]) == cfg.train.steps
    assert record["trained_subjects"] == bank.ids
    from slice2vol.encoders import sha256_file

    assert record["checkpoint_sha256"] == sha256_file(path)
    reloaded = build_encoder(cfg.encoder, weights=str(path), **cfg.encoder_kwargs)
    assert reloaded.info.weights_sha256 == record["checkpoint_sha256"]
    # The reloaded encoder equals the trained model; rebuild that from a fresh base + the saved deltas.
    fresh = build_encoder(cfg.encoder, **cfg.encoder_kwargs)
    x = bank.images[:4].float()
    with torch.no_grad():
        out = reloaded.encode(x)
        assert not torch.allclose(out, fresh.encode(x), atol=1e-4)  # training moved the weights
    from safetensors.torch import load_file

    state = load_file(str(path))
    fresh.model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x), out)


def test_checkpoint_equals_the_unmerged_adapted_model(tmp_path):
    from slice2vol.finetune import save_checkpoint

    torch.manual_seed(0)
    cfg = _cfg(mode="lora")
    encoder = build_encoder(cfg.encoder, **cfg.encoder_kwargs)
    setup_trainable(encoder.model, cfg)
    with torch.no_grad():
        for m in encoder.model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        adapted = encoder.encode(x)
    path = save_checkpoint(encoder, tmp_path, {"encoder_kwargs": TINY_VIT})
    reloaded = build_encoder(cfg.encoder, weights=str(path), **cfg.encoder_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode(x), adapted, atol=1e-5, rtol=1e-5)
    record = json.loads((tmp_path / "finetune.json").read_text())
    assert record["load_with"].startswith("build_encoder('timm/vit_small_patch16_224', weights=")


def test_supervised_needs_explicit_training_subjects(tmp_path):
    cfg = _cfg(objective="supervised", label="sex")
    with pytest.raises(ValueError, match="needs data.train_ids"):
        run_finetune(cfg, _FakeCohort(["s0", "s1"]), tmp_path, bank=_bank(), progress=False)


def test_cli_end_to_end_on_nifti(tmp_path):
    from slice2vol.cli import main

    rows = ["subject_id,t1,sex"]
    for i in range(3):
        write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume((24, 28, 20), seed=i))
        rows.append(f"s{i},s{i}.nii.gz,{'MF'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    code = main(["finetune", "--config", "configs/finetune/cpu_smoke.yaml", "--manifest", str(tmp_path / "m.csv"),
                 "--steps", "2", "--out", str(tmp_path / "out"), "--no-progress", "data.stride=4"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert record["steps"] == 2 and record["trained_subjects"] == ["s0", "s1", "s2"] and record["n_slices"] > 3
    assert (tmp_path / "out" / "encoder.safetensors").exists()


class _FakeCohort:
    """The slice of the Cohort interface ``run_finetune`` uses when a bank is given."""

    def __init__(self, ids):
        import pandas as pd

        self.subjects = [type("S", (), {"subject_id": i})() for i in ids]
        self.label_types = {"sex": "categorical"}
        self._labels = pd.DataFrame({"sex": ["F", "M"] * (len(ids) // 2) + ["F"] * (len(ids) % 2)},
                                    index=pd.Index(ids, name="subject_id"))

    def labels(self):
        return self._labels


def test_finetuned_checkpoint_caches_like_any_encoder(tmp_path):
    from slice2vol.cache import FeatureStore
    from slice2vol.data import SliceConfig, load_manifest
    from slice2vol.extract import cache_cohort
    from slice2vol.finetune import save_checkpoint

    torch.manual_seed(0)
    cfg = _cfg(mode="lora")
    encoder = build_encoder(cfg.encoder, **cfg.encoder_kwargs)
    setup_trainable(encoder.model, cfg)
    path = save_checkpoint(encoder, tmp_path / "ft", {"encoder_kwargs": TINY_VIT})
    write_nifti(tmp_path / "s0.nii.gz", blob_volume((24, 28, 20), seed=0))
    (tmp_path / "m.csv").write_text("subject_id,t1\ns0,s0.nii.gz\n")
    report = cache_cohort(load_manifest(tmp_path / "m.csv"), cfg.encoder, tmp_path / "store.h5", weights=str(path),
                          encoder_kwargs=TINY_VIT, slice_cfg=SliceConfig(planes=("axial",), stride=4, size=32),
                          progress=False)
    assert list(report.done) == ["s0"]
    store = FeatureStore(tmp_path / "store.h5")
    assert store.slice_features("s0", "axial").shape[1] == 384
    assert json.dumps(store.provenance).count(json.loads((tmp_path / "ft" / "finetune.json").read_text())
                                              ["checkpoint_sha256"]) >= 1
