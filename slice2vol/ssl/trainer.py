"""Pretraining loop and checkpoints.

A run directory holds ``last/`` (the newest checkpoint, replaced atomically), optional
``step_<N>/`` copies, ``metrics.csv``/``metrics.json`` and ``loss_curve.png``. A checkpoint is a
directory with:

* ``meta.json``: method, dims, step, the full :class:`~slice2vol.ssl.config.SSLConfig`, embed_dim;
* ``model.safetensors``: the whole method (backbone, heads, decoder);
* ``encoder.safetensors``: the encoder alone (what export and ``ssl2d/*`` load);
* ``train_state.pt``: optimizer, scheduler, grad-scaler and RNG states — tensors and plain values
  only, read back with ``torch.load(weights_only=True)``.

Resuming restores all of it, so on CPU with deterministic algorithms a run interrupted and
resumed ends with exactly the parameters of an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slice2vol.config import config_hash, from_dict, to_dict
from slice2vol.ssl.config import SSLConfig, TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("meta.json", "model.safetensors", "encoder.safetensors", "train_state.pt")


# -- reproducibility ----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors/plain values (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "python": torch.tensor(py_internal, dtype=torch.int64), "python_version": int(py_version),
        "python_gauss": float("nan") if py_gauss is None else float(py_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    gauss = None if math.isnan(state["python_gauss"]) else state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cosine_with_warmup(train: TrainConfig):
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine to ``min_lr_ratio`` at ``steps``."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices/kernels only (not norms, biases, tokens, position embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("token", "pos_embed", "position"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- checkpoints ----------------------------------------------------------------------------------
def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied or re-registered parameters)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(directory: str | Path, model, cfg: SSLConfig, step: int, optimizer=None, scheduler=None,
                    scaler=None, extra: dict | None = None) -> Path:
    """Writes a checkpoint directory atomically (a temporary sibling renamed over ``directory``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_tensors(model.state_dict()), str(tmp / "model.safetensors"))
    save_file(_tensors(model.encoder.state_dict()), str(tmp / "encoder.safetensors"))
    meta = {"method": cfg.method, "spatial_dims": cfg.spatial_dims, "step": step,
            "embed_dim": int(model.encoder.embed_dim), "input_size": list(cfg.input_size),
            "config_hash": config_hash(cfg), "config": to_dict(cfg), **(extra or {})}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    state = {"step": step, "rng": rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp / "train_state.pt")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from: itself, a run directory (uses ``last``), or a file inside one."""
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if (path / "last" / "meta.json").exists():
        path = path / "last"
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path}: not an SSL checkpoint (no meta.json; expected <run dir>/last)")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuilds the trained method from a checkpoint.

    Returns:
        (method in eval mode, its :class:`SSLConfig`, meta dict with ``checkpoint`` and ``encoder_file``).
    """
    from safetensors.torch import load_file

    from slice2vol.ssl import build_method

    path = resolve_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text())
    cfg = from_dict(SSLConfig, meta["config"])
    model = build_method(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    meta.update(checkpoint=str(path), encoder_file=str(path / "encoder.safetensors"))
    return model.to(map_location).eval(), cfg, meta


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu"):
    """The trained encoder of a checkpoint, (B, C, *spatial) -> (B, embed_dim), in eval mode, plus meta."""
    model, cfg, meta = load_checkpoint(path, map_location)
    return model.encoder.eval(), meta


# -- training ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a run produced."""

    out_dir: Path
    step: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    loss_curve: Path | None = None


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    if not history:
        return
    (out_dir / "metrics.json").write_text(json.dumps(history, indent=1))
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def plot_loss_curve(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss (log scale) and learning rate against the step, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in history], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if all(r["loss"] > 0 for r in history):
        ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in history], color="tab:gray", alpha=0.5, lw=1)
    ax2.set_ylabel("learning rate", color="tab:gray")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def train(model, dataset, cfg: SSLConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
          stop_after: int | None = None, extra_meta: dict | None = None, plot: bool = True) -> TrainResult:
    """Trains ``model`` on ``dataset.sample(batch_size)`` batches for ``cfg.train.steps`` optimiser steps.

    Args:
        model: an :class:`~slice2vol.ssl.base.SSLMethod`.
        dataset: a :class:`~slice2vol.ssl.data.CropDataset` / ``SliceDataset`` (anything with ``sample(n)``).
        cfg: the run config (saved in every checkpoint).
        out_dir: run directory.
        resume: continue from ``out_dir/last`` when it exists.
        progress: tqdm bar with loss and samples/s.
        stop_after: return after this step without checkpointing (simulates a killed job in tests).
        extra_meta: more keys for ``meta.json`` (e.g. the manifest used).
        plot: write ``loss_curve.png`` at the end.
    """
    from tqdm.auto import tqdm

    tc = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(tc.device)
    use_amp = tc.amp and device.type == "cuda"  # never autocast on CPU (bf16 is ~40x slower there)
    amp_dtype = getattr(torch, tc.amp_dtype)
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tc))
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)

    step, history = 0, []
    last = out_dir / "last"
    if resume and (last / "train_state.pt").exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(last / "model.safetensors")))
        state = torch.load(last / "train_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        if (out_dir / "metrics.json").exists():
            history = [r for r in json.loads((out_dir / "metrics.json").read_text()) if r["step"] <= step]
        log.info("resuming %s from step %d", out_dir, step)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    def checkpoint() -> Path:
        _write_metrics(out_dir, history)
        path = save_checkpoint(last, model, cfg, step, optimizer, scheduler, scaler, extra_meta)
        if tc.keep_every and step % tc.keep_every == 0:
            shutil.copytree(path, out_dir / f"step_{step:07d}", dirs_exist_ok=True)
        return path

    bar = tqdm(total=tc.steps, initial=step, desc=f"{cfg.method} {cfg.spatial_dims}D", disable=not progress)
    window_loss, window_n, window_extra = 0.0, 0, {}
    window_start, samples = time.perf_counter(), 0
    try:
        while step < tc.steps:
            optimizer.zero_grad(set_to_none=True)
            for _ in range(tc.accumulate):
                batch = dataset.sample(tc.batch_size).to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss, extra = model.training_step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{cfg.method}: loss is {loss.item()} at step {step}; "
                                             "lower train.lr or check the inputs")
                (scaler.scale(loss / tc.accumulate) if scaler else loss / tc.accumulate).backward()
                window_loss += float(loss.detach()) / tc.accumulate
                for k, v in extra.items():
                    window_extra[k] = window_extra.get(k, 0.0) + v / tc.accumulate
                samples += batch.shape[0]
            if scaler:
                scaler.unscale_(optimizer)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            window_n += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "loss": window_loss / window_n, "lr": lr,
                       "samples_per_s": samples / max(elapsed, 1e-9),
                       **{k: v / window_n for k, v in window_extra.items()}}
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{row['samples_per_s']:.1f}")
                window_loss, window_n, window_extra = 0.0, 0, {}
                window_start, samples = time.perf_counter(), 0
            if stop_after is not None and step >= stop_after:
                break
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint()
        if step == tc.steps == 0 and not last.exists():
            checkpoint()  # steps=0: the random initialisation, a baseline worth embedding too
    finally:
        bar.close()
        torch.use_deterministic_algorithms(deterministic_before)
    curve = None
    if history:
        _write_metrics(out_dir, history)
    if history and plot:
        curve = plot_loss_curve(history, out_dir / "loss_curve.png", f"{cfg.method} {cfg.spatial_dims}D")
    return TrainResult(out_dir, step, history[-1]["loss"] if history else float("nan"), history,
                       last if last.exists() else None, curve)


def pretrain(cfg: SSLConfig, out_dir: str | Path, *, cohort=None, bank=None, resume: bool = True,
             progress: bool = True, stop_after: int | None = None, plot: bool = True) -> TrainResult:
    """Builds data and model from ``cfg`` and trains (seeded; resumes from ``out_dir/last``).

    Args:
        cfg: the run config.
        out_dir: run directory.
        cohort: a :class:`~slice2vol.data.manifest.Cohort` to load, or
        bank: an already loaded :class:`~slice2vol.ssl.data.VolumeBank`.
    """
    from slice2vol.ssl import build_method
    from slice2vol.ssl.data import VolumeBank, make_dataset

    if bank is None:
        if cohort is None:
            raise ValueError("pretrain needs a cohort or a VolumeBank")
        bank = VolumeBank.from_cohort(cohort, cfg.data.volume, cfg.data.volume_size,
                                      max_subjects=cfg.data.max_subjects, dtype=cfg.data.cache_dtype,
                                      progress=progress)
    if bank.in_channels != cfg.in_channels:
        raise ValueError(f"config in_channels={cfg.in_channels} but the volumes have {bank.in_channels} channel(s)")
    seed_everything(cfg.train.seed)
    model = build_method(cfg)
    dataset = make_dataset(bank, cfg.spatial_dims, cfg.data)
    extra = {"n_subjects": len(bank), "source": getattr(cohort, "source", "")}
    return train(model, dataset, cfg, out_dir, resume=resume, progress=progress, stop_after=stop_after,
                 extra_meta=extra, plot=plot)
