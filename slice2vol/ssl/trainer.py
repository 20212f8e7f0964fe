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
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from slice2vol.checkpoint_io import load_state, read_json, read_safetensors, read_torch_state
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
    """``auto`` -> CUDA when available, else CPU; other names checked (one line for a missing GPU,
    naming ``train.device``: the config file's value, or ``--device``'s, which sets it)."""
    from slice2vol.runtime import checked_device

    return torch.device(checked_device(name, "train.device"))


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
                    scaler=None, extra: dict | None = None, *, extra_state: dict | None = None) -> Path:
    """Writes a checkpoint directory atomically (a temporary sibling renamed over ``directory``).

    ``extra`` keys go to ``meta.json``, ``extra_state`` (plain values) to ``train_state.pt``.
    """
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
    state = {"step": step, "rng": rng_state(), **(extra_state or {})}
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
        if not (path.parent / "meta.json").exists() and not (path.parent / "last" / "meta.json").exists():
            raise FileNotFoundError(f"{path}: not an SSL checkpoint (a file outside a run folder; give the run "
                                    "folder or <run dir>/last)")
        path = path.parent
    if (path / "last" / "meta.json").exists():
        path = path / "last"
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{path}: not an SSL checkpoint (no meta.json; expected <run dir>/last)")
    return path


#: the keys of a checkpoint's meta.json that loading and embedding read, and their JSON types
META_KEYS = {"method": str, "spatial_dims": int, "config": dict}


def read_checkpoint_meta(path: str | Path) -> tuple[Path, dict]:
    """The checkpoint folder of ``path`` (itself, ``<run dir>/last`` or a file's folder) and its
    ``meta.json``, checked to be what ``slice2vol pretrain`` writes.

    Loading reads the meta's keys without looking (a list, or an object without ``config``, gave a
    TypeError or a bare key name): this says which file is wrong and how, in one line.

    Raises:
        FileNotFoundError: ``path`` does not exist, or holds no meta.json.
        CheckpointError: meta.json is damaged, not a JSON object, or lacks or mistypes a key.
    """
    from slice2vol.checkpoint_io import CheckpointError

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder (give a slice2vol pretrain run folder or "
                                "<run dir>/last)")
    folder = resolve_checkpoint(path)
    meta_path = folder / "meta.json"
    hint = "not a checkpoint written by slice2vol pretrain; give the folder of a complete run (<run dir>/last)"
    meta = read_json(meta_path, hint)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: a JSON {type(meta).__name__}, expected an object with "
                              f"{', '.join(META_KEYS)}; {hint}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing key(s) {missing}; {hint}")
    for key, kind in META_KEYS.items():
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"{meta_path}: {key} is {meta[key]!r}, expected a JSON "
                                  f"{ {str: 'string', int: 'integer', dict: 'object'}[kind]}; {hint}")
    return folder, meta


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder of ``path``, after :func:`read_checkpoint_meta`'s checks."""
    return read_checkpoint_meta(path)[0]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuilds the trained method from a checkpoint (its meta.json checked by :func:`read_checkpoint_meta`).

    Returns:
        (method in eval mode, its :class:`SSLConfig`, meta dict with ``checkpoint`` and ``encoder_file``).
    """
    from slice2vol.ssl import build_method

    from slice2vol.checkpoint_io import CheckpointError

    path, meta = read_checkpoint_meta(path)
    hint = "give the folder of a complete SSL run (<run dir>/last)"
    try:
        cfg = from_dict(SSLConfig, meta["config"])
        model = build_method(cfg)
    except (ValueError, KeyError, TypeError) as err:  # an edited config: the file is named
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)  # KeyError quotes itself
        raise CheckpointError(f"{path / 'meta.json'}: its config cannot be rebuilt "
                              f"({' '.join(text.split())[:200]}); {hint}") from None
    missing, unexpected = load_state(model, read_safetensors(path / "model.safetensors", hint), path, hint,
                                     strict=False)
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
    """What a run produced.

    Attributes:
        out_dir: the run directory.
        step: optimiser steps done.
        final_loss: mean loss of the last logged window (over all ranks).
        history: logged rows (step, loss, lr, samples_per_s, step_time_s, wall_s, flops, method metrics).
        checkpoint: ``out_dir/last``.
        loss_curve: ``loss_curve.png``.
        total_steps: the steps the run was laid out for (``train.steps`` or the budget's).
        cost: measured :class:`~slice2vol.ssl.compute.StepCost` as a dict (FLOPs per step...).
        wall_s: training wall seconds (summed over resumed segments).
        cpu_s: CPU seconds of the training process (user + system, all threads; summed likewise).
    """

    out_dir: Path
    step: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    loss_curve: Path | None = None
    total_steps: int = 0
    cost: dict | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, checkpoint directory) of every complete checkpoint of a run, by step.

    The ``step_<N>/`` copies (``train.keep_every``) plus ``last/`` when its step has no copy; the
    input of learning curves (probe metric against pretraining steps).
    """
    run_dir = Path(run_dir)
    found: dict[int, Path] = {}
    for path in sorted(run_dir.glob("step_*")):
        meta = path / "meta.json"
        if path.is_dir() and meta.exists() and (path / "encoder.safetensors").exists():
            found[int(read_json(meta)["step"])] = path
    last = run_dir / "last"
    if (last / "meta.json").exists() and (last / "encoder.safetensors").exists():
        step = int(read_json(last / "meta.json")["step"])
        found.setdefault(step, last)
    return sorted(found.items())


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
    """Loss (log scale) and learning rate against the step, saved as PNG (150 dpi)."""
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
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def _batch_stream(dataset, cfg: SSLConfig, start: int, end: int, env, device: torch.device):
    """This rank's micro-batches for steps ``start .. end - 1``, in order.

    Samplers with ``draw(i, generator)`` (crops/slices of a volume source) go through a DataLoader
    keyed by sample number (:func:`~slice2vol.ssl.streaming.make_loader`); anything else only needs
    ``sample(n)`` and is called in the training process (tests use fixed batches that way).
    """
    from slice2vol.ssl.distributed import default_num_workers
    from slice2vol.ssl.streaming import make_loader

    tc = cfg.train
    if hasattr(dataset, "draw") and hasattr(dataset, "bank"):
        workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers(device.type, env)
        loader = make_loader(dataset, tc.seed, start, end, tc.batch_size, accumulate=tc.accumulate, rank=env.rank,
                             world_size=env.world_size, num_workers=workers, pin_memory=device.type == "cuda")
        # the iterator is created here, before any step seeds the RNG: DataLoader draws its base seed
        # from the global RNG when the iterator starts, which must not shift a step's randomness
        return iter(loader)

    def sampled():
        while True:
            yield dataset.sample(tc.batch_size)

    return sampled()


def _seed_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Seeds the torch RNG for one micro-batch: the method's views, masks and pretext labels of a step
    depend on (seed, step, micro-batch, rank) only, so a resumed run redraws exactly the same ones."""
    from slice2vol.ssl.streaming import mix_seed

    torch.manual_seed(mix_seed(seed, step, micro, rank))


#: config keys a resumed run may change: more steps (the point of resuming), where it runs, how often it
#: logs and checkpoints, how samples are loaded (samples are keyed by number, not by loader), whether
#: FLOPs are counted; anything else would train a different run under the old one's weights and state
RESUME_FREE_KEYS = ("train.steps", "train.device", "train.log_every", "train.checkpoint_every",
                    "train.keep_every", "train.count_flops", "train.deterministic", "data.num_workers",
                    "data.cache_dir")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):  # an empty one adds no key: {} and unset are the same
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def config_changes(saved: dict, cfg: SSLConfig, free: Sequence[str] = RESUME_FREE_KEYS) -> list[str]:
    """``"key old -> new"`` for every config key (but ``free`` ones) that differs from a checkpoint's.

    ``saved`` is the ``config`` of a checkpoint's meta.json; keys it lacks (written by an older
    version) take their defaults, so a key added since is no change unless this run sets it.
    """
    try:
        saved = to_dict(from_dict(SSLConfig, saved))
    except ValueError:  # a config this version refuses: compare what it says as it is
        pass
    old, new = _flatten(saved), _flatten(to_dict(cfg))

    def show(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    missing = object()
    return [f"{key} {show(old.get(key, '(unset)'))} -> {show(new.get(key, '(unset)'))}"
            for key in sorted(set(old) | set(new), key=lambda k: (k != "method", k))
            if key not in free and old.get(key, missing) != new.get(key, missing)]


def _set_difference(saved: Any, now: Any, shown: int = 3) -> str:
    """``; now missing: a, b; now added: c`` -- which subjects differ (a subject that failed to load
    this time is the usual cause), or '' when either list is unknown."""
    if not isinstance(saved, list) or not isinstance(now, (list, tuple)):
        return ""
    parts = []
    for what, ids in (("now missing", sorted(set(map(str, saved)) - set(map(str, now)))),
                      ("now added", sorted(set(map(str, now)) - set(map(str, saved))))):
        if ids:
            parts.append(f"{what}: {', '.join(ids[:shown])}" + (f" and {len(ids) - shown} more" if len(ids) > shown
                                                                   else ""))
    return "; " + "; ".join(parts) if parts else ""


def _resume_state(last: Path, extra_meta: dict | None, cfg: SSLConfig | None = None) -> dict | None:
    if not (last / "train_state.pt").exists():
        return None
    meta = read_json(last / "meta.json")
    if cfg is not None:
        saved = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(saved, dict):
            log.warning("%s: meta.json stores no config (an older format): resuming without checking that "
                        "the config is the same", last)
        else:
            changes = config_changes(saved, cfg)
            if changes:
                shown = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
                raise ValueError(f"{last}: saved by a run with another config ({shown}); "
                                 "use another --out or --no-resume")
    want = (extra_meta or {}).get("subjects_sha256")
    have = meta.get("subjects_sha256")
    if want and have and want != have:
        raise ValueError(f"{last}: this run was trained on another subject set ({meta.get('n_subjects')} subjects"
                         f"{_set_difference(meta.get('subject_ids'), (extra_meta or {}).get('subject_ids'))}); "
                         "use --no-resume (resume=False) or another output folder")
    return read_torch_state(last / "train_state.pt")


def train(model, dataset, cfg: SSLConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
          stop_after: int | None = None, extra_meta: dict | None = None, plot: bool = True) -> TrainResult:
    """Trains ``model`` for ``cfg.train.steps`` optimiser steps (or the steps its budget buys).

    Runs in one process or, started by torchrun, as one rank of a DistributedDataParallel job:
    every rank draws its share of each global batch (the same global batch for any world size),
    gradients are averaged, rank 0 writes checkpoints and metrics. On CUDA the forward pass runs
    under autocast (``amp_dtype``); never on CPU.

    Args:
        model: an :class:`~slice2vol.ssl.base.SSLMethod`.
        dataset: a :class:`~slice2vol.ssl.data.CropDataset` / ``SliceDataset`` (seeded per sample,
            loaded by a DataLoader), or anything with ``sample(n)``.
        cfg: the run config (saved in every checkpoint).
        out_dir: run directory.
        resume: continue from ``out_dir/last`` when it exists.
        progress: progress bar / log lines with loss and samples/s (rank 0).
        stop_after: return after this step without checkpointing (simulates a killed job in tests).
        extra_meta: more keys for ``meta.json`` (e.g. the manifest used, the subject IDs).
        plot: write ``loss_curve.png`` at the end.
    """
    from contextlib import nullcontext

    from slice2vol.progress import bar as progress_bar
    from slice2vol.ssl.compute import StepTimer, count_step_flops, resolve_budget_steps
    from slice2vol.ssl.distributed import (all_reduce_max, all_reduce_mean, barrier, broadcast_object,
                                           configure_threads, init_distributed, rank_device, unwrap)

    cfg.check()  # a config changed after construction too (one line naming the key, before any work)
    tc = cfg.train
    out_dir = Path(out_dir)
    device_hint = resolve_device(tc.device).type
    env = init_distributed(device_hint)
    configure_threads(env)
    device = rank_device(tc.device, env)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier(env)
    use_amp = tc.amp and device.type == "cuda"  # never autocast on CPU (bf16 is ~40x slower there)
    amp_dtype = getattr(torch, tc.amp_dtype)
    model.to(device).train()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if tc.deterministic:
        if device.type == "cuda":
            # cuBLAS refuses deterministic mode without a fixed workspace (a RuntimeError at the first
            # matmul), and some backward passes (trilinear upsampling, adaptive pooling, grid_sample)
            # have no deterministic CUDA kernel: those warn instead of stopping the run
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.use_deterministic_algorithms(True)

    last = out_dir / "last"
    state = _resume_state(last, extra_meta, cfg) if resume else None
    step, history, wall_before, cpu_before = 0, [], 0.0, 0.0
    total = int(tc.steps)
    cost: dict | None = None
    if state is not None:
        load_state(model, read_safetensors(last / "model.safetensors"), last)
        step = int(state["step"])
        if tc.budget_flops or tc.budget_device_hours:  # the steps the budget bought stay fixed
            total = int(state.get("total_steps", total))
        wall_before = float(state.get("wall_s", 0.0))
        cpu_before = float(state.get("cpu_s", 0.0))
        meta = read_json(last / "meta.json")
        cost = meta.get("compute")
        if (out_dir / "metrics.json").exists():
            history = [r for r in read_json(out_dir / "metrics.json") if r["step"] <= step]
        if step > total:  # the checkpoint is not cut back: it stays the run of `step` steps it is
            log.warning("%s: the checkpoint has trained %d steps, more than train.steps=%d; nothing to train, "
                        "the %d-step checkpoint is kept (use another --out or --no-resume for a %d-step run)",
                        out_dir, step, total, step, total)
        else:
            log.info("resuming %s from step %d of %d", out_dir, step, total)

    micro = tc.batch_size
    global_batch = micro * tc.accumulate * env.world_size
    stream = _batch_stream(dataset, cfg, step, 1 << 40, env, device)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)  # noqa: E731

    def step_fn(m, b):
        with autocast():
            return m(b)[0]

    unused: list[str] = []
    pending = None  # the batch the probe measured, trained on first
    budgeted = bool(tc.budget_flops or tc.budget_device_hours) and state is None
    if (step < total or budgeted) and (budgeted or env.distributed or (tc.count_flops and cost is None)):
        _seed_step(tc.seed, step, 0, env.rank)
        pending = next(stream).to(device, non_blocking=True)
        probe = count_step_flops(model, pending, step_fn)
        unused = probe.unused
        if unused:
            log.info("%d parameter tensors get no gradient (e.g. %s): DDP runs with find_unused_parameters",
                     len(unused), unused[:3])
        if cost is None and tc.count_flops or budgeted:
            flops_step = probe.flops * tc.accumulate * env.world_size
            seconds = 0.0
            if tc.budget_device_hours and state is None:
                from slice2vol.ssl.compute import time_step

                seconds = time_step(model, pending, step_fn, tc.budget_probe_steps, device) * tc.accumulate
                seconds = max(all_reduce_max([seconds], env, device)) * env.world_size  # device-seconds
            cost = {"flops_per_step": flops_step, "flops_per_sample": probe.flops_per_sample,
                    "global_batch": global_batch, "probe_device_s_per_step": seconds,
                    "flops_uncounted_ops": probe.uncounted_ops, "flops_by_module": probe.by_module,
                    "flop_counter": "torch.utils.flop_counter.FlopCounterMode (matmul/conv fwd+bwd)"}
            if budgeted:
                from slice2vol.ssl.compute import StepCost

                budget = resolve_budget_steps(tc, StepCost(flops_step, probe.flops_per_sample, seconds))
                if budget is not None:
                    total = int(broadcast_object(budget, env))
                    cost["budget"] = {"flops": tc.budget_flops, "device_hours": tc.budget_device_hours,
                                      "resolved_steps": total}
                    log.info("%s %dD: budget buys %d steps (%.3g FLOPs/step)", cfg.method, cfg.spatial_dims,
                             total, flops_step)
    schedule_cfg = dataclasses.replace(tc, steps=total)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(schedule_cfg))
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        # no RNG state to restore: every micro-batch reseeds from (seed, step), see _seed_step

    net = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if device.type == "cuda" and tc.sync_batchnorm:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=bool(unused))
    if env.is_main:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    wall_start, cpu_start = time.perf_counter(), _cpu_seconds()

    def wall() -> float:
        return wall_before + time.perf_counter() - wall_start

    def cpu() -> float:
        return cpu_before + _cpu_seconds() - cpu_start

    def meta_extra() -> dict:
        return {**(extra_meta or {}), "compute": cost, "total_steps": total, "world_size": env.world_size,
                "wall_s": round(wall(), 3), "cpu_s": round(cpu(), 3), "threads": torch.get_num_threads()}

    def checkpoint() -> Path:
        if env.is_main:
            _write_metrics(out_dir, history)
            save_checkpoint(last, unwrap(net), cfg, step, optimizer, scheduler, scaler, meta_extra(),
                            extra_state={"total_steps": total, "wall_s": wall(), "cpu_s": cpu()})
            if tc.keep_every and step % tc.keep_every == 0:
                shutil.copytree(last, out_dir / f"step_{step:07d}", dirs_exist_ok=True)
        barrier(env)
        return last

    flops_step = (cost or {}).get("flops_per_step")
    bar = progress_bar(total, f"{cfg.method} {cfg.spatial_dims}D", unit="step", enabled=progress and env.is_main)
    bar.update(step)
    window_loss, window_n, window_extra, window_time = 0.0, 0, {}, 0.0
    window_start, samples = time.perf_counter(), 0
    timer = StepTimer(device)
    try:
        while step < total:
            timer.begin()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for a in range(tc.accumulate):
                if pending is None:
                    _seed_step(tc.seed, step, a, env.rank)
                    batch = next(stream).to(device, non_blocking=True)
                else:  # the probe's batch, drawn after the same seeding
                    batch, pending = pending, None
                sync = net.no_sync() if env.distributed and a < tc.accumulate - 1 else nullcontext()
                with sync:
                    with autocast():
                        loss, extra = net(batch)
                    (scaler.scale(loss / tc.accumulate) if scaler else loss / tc.accumulate).backward()
                step_loss += float(loss.detach()) / tc.accumulate
                for k, v in extra.items():
                    window_extra[k] = window_extra.get(k, 0.0) + v / tc.accumulate
                samples += batch.shape[0] * env.world_size
            if max(all_reduce_max([0.0 if math.isfinite(step_loss) else 1.0], env, device)) > 0:
                raise FloatingPointError(f"{cfg.method}: loss is not finite at step {step}; "
                                         "lower train.lr or check the inputs")
            window_loss += step_loss
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
            window_time += timer.end()
            bar.update(1)
            if step % tc.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                keys = sorted(window_extra)
                means = all_reduce_mean([window_loss / window_n, *[window_extra[k] / window_n for k in keys]],
                                        env, device)
                row = {"step": step, "loss": means[0], "lr": lr, "samples_per_s": samples / max(elapsed, 1e-9),
                       "step_time_s": window_time / window_n, "wall_s": round(wall(), 3),
                       "cpu_s": round(cpu(), 3),
                       **({"flops": step * flops_step} if flops_step else {}),
                       **dict(zip(keys, means[1:]))}
                history.append(row)
                bar.set_postfix_str(f"loss={row['loss']:.4f} lr={lr:.2e} sps={row['samples_per_s']:.1f}")
                window_loss, window_n, window_extra, window_time = 0.0, 0, {}, 0.0
                window_start, samples = time.perf_counter(), 0
            if stop_after is not None and step >= stop_after:
                break
            if step % tc.checkpoint_every == 0 or step == total:
                checkpoint()
        if step == total == 0 and not last.exists():
            checkpoint()  # steps=0: the random initialisation, a baseline worth embedding too
    finally:
        bar.close()
        torch.use_deterministic_algorithms(deterministic_before)
        close = getattr(getattr(dataset, "bank", None), "close", None)
        if close is not None:
            close()
    curve = None
    if history and env.is_main:
        _write_metrics(out_dir, history)
        if plot:
            curve = plot_loss_curve(history, out_dir / "loss_curve.png", f"{cfg.method} {cfg.spatial_dims}D")
    barrier(env)
    return TrainResult(out_dir, step, history[-1]["loss"] if history else float("nan"), history,
                       last if last.exists() else None, curve, total, cost, wall(), cpu())


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads): the compute a run used, which on a
    shared machine says more than wall time (DataLoader workers are separate processes, not counted)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _subjects_sha256(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def pretrain(cfg: SSLConfig, out_dir: str | Path, *, cohort=None, bank=None, resume: bool = True,
             progress: bool = True, stop_after: int | None = None, plot: bool = True,
             subject_ids: Sequence[str] | None = None) -> TrainResult:
    """Builds data and model from ``cfg`` and trains (seeded; resumes from ``out_dir/last``).

    With a cohort and ``data.streaming`` (the default) the volumes are prepared once to HDF5 files
    under ``data.cache_dir`` (``<out_dir>/volumes`` when unset) and read crop by crop; otherwise they
    are held in memory. Started by torchrun, this is one rank of a DDP job (each rank prepares its
    share of the volumes first).

    Args:
        cfg: the run config.
        out_dir: run directory.
        cohort: a :class:`~slice2vol.data.manifest.Cohort` to load, or
        bank: an already loaded :class:`~slice2vol.ssl.data.VolumeBank`.
        subject_ids: pretrain on these subjects only (e.g. the training folds of a benchmark);
            unknown IDs are an error. Recorded in ``meta.json`` (``subject_ids``), and a resumed run
            refuses a different subject set.
    """
    from slice2vol.ssl import METHODS, build_method
    from slice2vol.ssl.data import VolumeBank, failure_lines, make_dataset, no_subject_loaded
    from slice2vol.ssl.distributed import barrier, cleanup, init_distributed

    # refuse a bad config, an unknown method or one without these dims before any volume is read
    cfg.check()
    METHODS.get(cfg.method)
    dims = METHODS.meta(cfg.method).get("dims", (2, 3))
    if cfg.spatial_dims not in dims:
        raise ValueError(f"{cfg.method}: spatial_dims={cfg.spatial_dims} not supported (supports {list(dims)})")
    # the model is built (and its method_params checked) before any volume is read: a negative
    # temperature or an unknown parameter used to surface after minutes of volume preparation
    seed_everything(cfg.train.seed)
    model = build_method(cfg)
    env = init_distributed(resolve_device(cfg.train.device).type)
    try:
        if bank is None:
            if cohort is None:
                raise ValueError("pretrain needs a cohort or a VolumeBank")
            if subject_ids is not None:
                unknown = sorted(set(subject_ids) - set(cohort.ids))
                if unknown:
                    raise ValueError(f"{cohort.source}: {len(unknown)} subject_ids not in the cohort, e.g. {unknown[:3]}")
                cohort = cohort.subset(subject_ids)
            if cfg.data.max_subjects:
                cohort = cohort.subset(cohort.ids[: cfg.data.max_subjects])
            if cfg.data.streaming:
                from slice2vol.ssl.streaming import PreparedVolumes, collect_failures, prepare_cohort

                cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(out_dir) / "volumes"
                report = prepare_cohort(cohort, cfg.data, cache_dir, rank=env.rank, world_size=env.world_size,
                                        progress=progress)
                barrier(env)
                failures = collect_failures(report.directory, env.world_size)
                failed = {f.subject_id for f in failures}
                ids = [s for s in cohort.ids if s not in failed]
                if not ids:  # name the manifest and the first problem, not the cache folder
                    raise ValueError(no_subject_loaded(cohort, failures))
                bank = PreparedVolumes(report.directory, ids, failures=failures)
            else:
                bank = VolumeBank.from_cohort(cohort, cfg.data.volume, cfg.data.volume_size,
                                              dtype=cfg.data.cache_dtype, progress=progress and env.is_main)
        elif subject_ids is not None:
            bank = bank.subset(list(subject_ids))
        if bank.in_channels != cfg.in_channels:
            raise ValueError(f"config in_channels={cfg.in_channels} but the volumes have {bank.in_channels} channel(s)")
        dataset = make_dataset(bank, cfg.spatial_dims, cfg.data)
        extra = {"n_subjects": len(bank), "source": str(getattr(cohort, "source", "") or ""),
                 "subject_ids": list(bank.ids), "subjects_sha256": _subjects_sha256(bank.ids),
                 "failures": failure_lines(getattr(cohort, "failures", []), getattr(bank, "failures", [])),
                 "streaming": type(bank).__name__ == "PreparedVolumes"}
        return train(model, dataset, cfg, out_dir, resume=resume, progress=progress, stop_after=stop_after,
                     extra_meta=extra, plot=plot)
    finally:
        cleanup(env)
