"""Fine-tuning a 2D encoder on a cohort's slices; the result is an ordinary weights file of the family.

Modes (what trains):
    * ``frozen``: nothing in the encoder (only the objective's head: a linear probe / projector);
    * ``last_blocks``: the last N blocks (ViT blocks, ResNet/EfficientNet/MobileNet blocks) and every
      parameter after them (final norm);
    * ``lora``: low-rank adapters on the attention projections (``attn.qkv``, ``attn.proj``) only.

Objectives:
    * ``simclr``: two augmented views of each slice, a projection MLP, NT-Xent (label free);
    * ``supervised``: k slices per subject, encoded, mean-pooled and fed to a linear head on a
      label column (cross-entropy for categorical labels, MSE on the standardised value for
      continuous ones). Needs an explicit list of training subjects so that evaluation subjects
      never shape the weights.

The checkpoint is the encoder network's full state dict with LoRA merged (``encoder.safetensors``):
``build_encoder(key, weights=path, **encoder_kwargs)`` loads it like any pretrained file, so the
fine-tuned encoder caches and evaluates like any other. ``finetune.json`` beside it records the base
weights and their sha256, the checkpoint's sha256, the config, the training subjects and the losses.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

from slice2vol.checkpoint_io import CheckpointError, load_state, read_json, read_safetensors, read_torch_state
from slice2vol.config import check_real, check_whole, to_dict
from slice2vol.finetune.data import AugmentConfig, SliceBank, augment, standardise
from slice2vol.finetune.lora import DEFAULT_TARGETS, LoRALinear, inject_lora, lora_parameters, merge_lora
from slice2vol.ssl.losses import nt_xent

log = logging.getLogger(__name__)


@dataclass
class LoRAConfig:
    """Adapter options: ``targets`` are regexes searched in module names (timm ViT attention by default)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        check_whole("lora.rank", self.rank, 1)
        check_real("lora.alpha", self.alpha, 0.0, low_open=True)
        check_real("lora.dropout", self.dropout, 0.0, 1.0, high_open=True)
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ValueError(f"lora.targets must be a non-empty list of module-name patterns, got {self.targets!r}")


@dataclass
class FinetuneData:
    """Which slices train the model (cut exactly as the cache cuts them).

    Attributes:
        planes, stride, min_foreground, context: see :class:`~slice2vol.data.SliceConfig`.
        slice_size: side of the stored slices (the encoder then resizes to its input size).
        slices_per_subject: k slices mean-pooled per subject (``supervised``).
        train_ids: file with one subject ID per line, or ``all``; ``None`` means all subjects for
            ``simclr`` and is refused for ``supervised``.
    """

    planes: list[str] = field(default_factory=lambda: ["axial", "coronal", "sagittal"])
    stride: int = 2
    min_foreground: float = 0.1
    context: int = 1
    slice_size: int = 224
    slices_per_subject: int = 8
    train_ids: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.planes, (list, tuple)) or not self.planes:
            raise ValueError(f"data.planes must name at least one plane, got {self.planes!r}")
        for name, low in (("stride", 1), ("context", 1), ("slice_size", 1), ("slices_per_subject", 1)):
            check_whole(f"data.{name}", getattr(self, name), low)
        check_real("data.min_foreground", self.min_foreground, 0.0, 1.0)


@dataclass
class FinetuneTrain:
    """Optimisation.

    Attributes:
        batch_size: slices per step (``simclr``) or subjects per step (``supervised``), per process
            (the global batch of a DDP job is ``batch_size * world_size``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``; under torchrun the GPU
            of the local rank.
        checkpoint_every: write ``<out>/train_state/`` every N steps (0 = never); a rerun resumes.
        amp, amp_dtype: autocast on CUDA only (never on CPU, where bf16 is ~40x slower).
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.1
    proj_dim: int = 128
    proj_hidden: int = 512
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0
    amp: bool = True
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"

    def __post_init__(self) -> None:
        # none of these was checked: steps=0 wrote an untrained encoder, lr=-1 trained uphill
        for name, low in (("steps", 1), ("batch_size", 1), ("proj_dim", 1), ("proj_hidden", 1), ("log_every", 1),
                          ("checkpoint_every", 0), ("seed", 0)):
            check_whole(f"train.{name}", getattr(self, name), low)
        check_real("train.lr", self.lr, 0.0, low_open=True)
        check_real("train.head_lr", self.head_lr, 0.0, low_open=True)
        check_real("train.weight_decay", self.weight_decay, 0.0)
        check_real("train.temperature", self.temperature, 0.0, low_open=True)


@dataclass
class FinetuneConfig:
    """A fine-tuning run (YAML under ``configs/finetune/``; CLI flags and ``--set`` win)."""

    encoder: str = "timm/vit_small_patch16_224"
    weights: str = "random"
    encoder_kwargs: dict = field(default_factory=dict)
    mode: Literal["frozen", "last_blocks", "lora"] = "lora"
    last_blocks: int = 2
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    objective: Literal["simclr", "supervised"] = "simclr"
    label: str | None = None
    data: FinetuneData = field(default_factory=FinetuneData)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)

    def __post_init__(self) -> None:
        if self.objective == "simclr":
            # NT-Xent needs another sample as its negatives: a batch of one gave loss 0 and wrote an
            # untrained encoder; a label was silently ignored by the label-free objective
            if self.train.batch_size < 2:
                raise ValueError(f"train.batch_size must be >= 2 for the simclr objective (its negatives are the "
                                 f"other slices of the batch), got {self.train.batch_size}")
            if self.label:
                raise ValueError(f"label {self.label!r} is not used by the simclr objective (label free): drop "
                                 "--label, or train on it with --objective supervised")
        if self.mode == "last_blocks":
            check_whole("last_blocks", self.last_blocks, 1)


# -- what trains --------------------------------------------------------------------------------
def find_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's blocks in forward order, as (qualified name, module).

    timm ViT/EfficientNet ``blocks`` (stages flattened), ResNet ``layer1..4`` (flattened),
    torchvision ``features`` children.
    """

    def flatten(prefix: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for name, child in container.named_children():
            if isinstance(child, nn.Sequential):  # a stage of blocks (EfficientNet)
                out += [(f"{prefix}.{name}.{n}", c) for n, c in child.named_children()]
            else:
                out.append((f"{prefix}.{name}", child))
        return out

    if isinstance(getattr(net, "blocks", None), nn.Module):
        return flatten("blocks", net.blocks)
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):
        return [(f"layer{i}.{n}", c) for i in range(1, 5) for n, c in getattr(net, f"layer{i}").named_children()]
    if isinstance(getattr(net, "features", None), nn.Module):
        return [(f"features.{n}", c) for n, c in net.features.named_children()]
    raise TypeError(f"{type(net).__name__}: cannot find its blocks (need .blocks, .layer1-4 or .features)")


def setup_trainable(net: nn.Module, cfg: FinetuneConfig) -> dict[str, Any]:
    """Freezes ``net`` and unfreezes what ``cfg.mode`` trains (injecting LoRA layers in place).

    Returns:
        ``{"trainable": names of trainable encoder parameters, "lora_layers": adapted layer names,
        "train_modules": modules to keep in train mode}``.
    """
    for p in net.parameters():
        p.requires_grad_(False)
    lora_layers: list[str] = []
    train_modules: list[nn.Module] = []
    if cfg.mode == "lora":
        c = cfg.lora
        lora_layers = inject_lora(net, c.targets, c.rank, c.alpha, c.dropout)
        for p in lora_parameters(net):
            p.requires_grad_(True)
        train_modules = [m for m in net.modules() if isinstance(m, LoRALinear)]
    elif cfg.mode == "last_blocks":
        blocks = find_blocks(net)
        n = cfg.last_blocks
        if not 1 <= n <= len(blocks):
            raise ValueError(f"last_blocks must be in 1..{len(blocks)} for this network, got {n}")
        first = blocks[-n][0] + "."
        names = [name for name, _ in net.named_parameters()]
        start = next(i for i, name in enumerate(names) if name.startswith(first))
        params = dict(net.named_parameters())
        for name in names[start:]:  # the last n blocks and everything registered after them
            params[name].requires_grad_(True)
        train_modules = [m for _, m in blocks[-n:]]
        tail_names = {name.rsplit(".", 1)[0] for name in names[start:]}
        train_modules += [m for name, m in net.named_modules() if name in tail_names]
    elif cfg.mode != "frozen":
        raise ValueError(f"mode must be frozen, last_blocks or lora, got {cfg.mode!r}")
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    return {"trainable": trainable, "lora_layers": lora_layers, "train_modules": train_modules}


def set_train_mode(net: nn.Module, train_modules: list[nn.Module]) -> None:
    """Eval mode everywhere (frozen batch norms keep their statistics) except the trained modules."""
    net.eval()
    for m in train_modules:
        m.train()


# -- objectives ---------------------------------------------------------------------------------
class Objective(nn.Module):
    """A head plus the loss of one training step; ``step_loss(encoder, bank, generator) -> scalar``."""

    def step_loss(self, encoder, bank: SliceBank, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class SimCLRObjective(Objective):
    """Two augmented views per slice -> projection MLP -> NT-Xent."""

    def __init__(self, embed_dim: int, cfg: FinetuneConfig) -> None:
        super().__init__()
        t = cfg.train
        self.head = nn.Sequential(nn.Linear(embed_dim, t.proj_hidden), nn.ReLU(inplace=True),
                                  nn.Linear(t.proj_hidden, t.proj_dim))
        self.cfg = cfg

    def loss(self, encoder, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """NT-Xent of two random views of ``images`` (B, C, H, W); under DDP the negatives are the views
        of every rank (gathered with their gradients)."""
        from slice2vol.ssl.distributed import gather_with_grad

        views = torch.cat([augment(images, self.cfg.augment, generator), augment(images, self.cfg.augment, generator)])
        z = self.head(encoder.encode(views))
        z1, z2 = z.chunk(2)
        return nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.cfg.train.temperature)

    def step_loss(self, encoder, bank: SliceBank, generator: torch.Generator) -> torch.Tensor:
        device = next(self.head.parameters()).device
        return self.loss(encoder, bank.sample(self.cfg.train.batch_size, generator).to(device), generator)


class SupervisedObjective(Objective):
    """k slices per subject -> encoder -> mean over slices -> linear head -> CE or MSE."""

    def __init__(self, embed_dim: int, cfg: FinetuneConfig, targets: np.ndarray, kind: str,
                 classes: list | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.classes = classes
        out = len(classes) if kind == "categorical" else 1
        self.head = nn.Linear(embed_dim, out)
        self.register_buffer("targets", torch.as_tensor(targets, dtype=torch.long if kind == "categorical"
                                                         else torch.float32))
        self.cfg = cfg

    def loss(self, encoder, images: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
        """images (n * k, C, H, W) of subjects (n,), k = ``slices_per_subject``."""
        k = self.cfg.data.slices_per_subject
        pooled = encoder.encode(images).view(len(subjects), k, -1).mean(1)
        out = self.head(pooled)
        y = self.targets[subjects.to(self.targets.device)]
        if self.kind == "categorical":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.squeeze(1), y)

    def step_loss(self, encoder, bank: SliceBank, generator: torch.Generator) -> torch.Tensor:
        images, subjects = bank.sample_subjects(self.cfg.train.batch_size, self.cfg.data.slices_per_subject, generator)
        return self.loss(encoder, images.to(self.targets.device), subjects)


def supervised_targets(cohort, label: str, ids: list[str]) -> tuple[list[str], np.ndarray, str, dict]:
    """(subjects with a label, targets, kind, stats) for ``label``; categorical -> class indices."""
    if label not in cohort.label_types:
        raise ValueError(f"label {label!r} not in the manifest; labels: {sorted(cohort.label_types)}")
    kind = cohort.label_types[label]
    column = cohort.labels()[label].reindex(ids)
    column = column[column.notna()]
    if column.empty:
        raise ValueError(f"label {label!r}: no training subject has a value")
    if kind == "categorical":
        classes = sorted(column.unique().tolist(), key=str)
        if len(classes) < 2:
            raise ValueError(f"label {label!r}: needs >= 2 classes among training subjects, got {classes}")
        lookup = {c: i for i, c in enumerate(classes)}
        return list(column.index), np.array([lookup[v] for v in column]), kind, {"classes": classes}
    values, mean, std = standardise(column.to_numpy(dtype=np.float64))
    return list(column.index), values, kind, {"mean": mean, "std": std}


# -- training loop ------------------------------------------------------------------------------
class _StepModule(nn.Module):
    """Encoder + objective as one module whose forward runs a loss closure, so DistributedDataParallel
    sees (and synchronises) every parameter the step uses."""

    def __init__(self, encoder: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.encoder, self.objective = encoder, objective

    def forward(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        return closure()


def _state_config(cfg: FinetuneConfig) -> dict:
    """The config a resumed run must share (every key but train.steps and train.device)."""
    c = to_dict(cfg)
    c["train"].pop("steps", None)  # more steps may continue a run
    c["train"].pop("device", None)
    return c


def _state_key(cfg: FinetuneConfig) -> str:
    from slice2vol.config import config_hash

    return config_hash(_state_config(cfg))


def _changed_keys(saved: dict | None, cfg: FinetuneConfig, shown: int = 4) -> str:
    """`` (mode lora -> full, train.lr 0.001 -> 0.01)``: what differs from the saved run's config
    (empty for a state written before configs were kept in it)."""
    if not isinstance(saved, dict):
        return ""
    from slice2vol.ssl.trainer import _flatten

    old, new = _flatten(saved), _flatten(_state_config(cfg))
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "(unset)") != new.get(k, "(unset)")]
    parts = [f"{k} {json.dumps(old.get(k, '(unset)'))} -> {json.dumps(new.get(k, '(unset)'))}" for k in keys[:shown]]
    more = f", {len(keys) - shown} more" if len(keys) > shown else ""
    return f" ({', '.join(parts)}{more})" if parts else ""


def train_steps(encoder, objective: Objective, bank: SliceBank, cfg: FinetuneConfig, train_modules: list[nn.Module],
                progress: bool = True,
                batch_fn: Callable[[torch.Generator], torch.Tensor] | None = None, *,
                out_dir: str | Path | None = None, resume: bool = True, env=None) -> list[float]:
    """Runs ``cfg.train.steps`` AdamW steps and returns the loss of each step (mean over ranks).

    Each step draws its batch from a generator seeded by (seed, step, rank), so a run resumed from
    ``<out_dir>/train_state`` (``train.checkpoint_every``) continues exactly. Under DDP (``env``
    from :func:`~slice2vol.ssl.distributed.init_distributed`) gradients are averaged over ranks and
    rank 0 writes the training state.

    ``batch_fn`` replaces the objective's sampling (tests use it to train on one fixed batch).
    """
    from contextlib import nullcontext

    from safetensors.torch import save_file

    from slice2vol.progress import bar as progress_bar
    from slice2vol.ssl.distributed import DistEnv, all_reduce_max, all_reduce_mean, barrier
    from slice2vol.ssl.streaming import mix_seed

    t = cfg.train
    env = env or DistEnv()
    device = next(objective.parameters()).device
    encoder_params = [p for p in encoder.parameters() if p.requires_grad]
    groups = [{"params": list(objective.parameters()), "lr": t.head_lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": t.lr})
    optimiser = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    net = encoder.model
    losses: list[float] = []
    start = 0
    state_dir = Path(out_dir) / "train_state" if out_dir is not None and t.checkpoint_every > 0 else None
    key = _state_key(cfg)
    if state_dir is not None and resume and (state_dir / "state.json").exists():
        saved = read_json(state_dir / "state.json")
        if saved.get("config_key") != key:
            raise ValueError(f"{state_dir}: saved by a run with another config{_changed_keys(saved.get('config'), cfg)}; "
                             "use another --out or --no-resume")
        load_state(net, read_safetensors(state_dir / "encoder.safetensors"), state_dir)
        load_state(objective, read_safetensors(state_dir / "objective.safetensors"), state_dir)
        optimiser_state = read_torch_state(state_dir / "optimiser.pt", map_location=device)
        try:
            optimiser.load_state_dict(optimiser_state)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{state_dir / 'optimiser.pt'}: does not fit this run's optimiser ({err}); "
                                  "use another --out or --no-resume") from None
        start, losses = int(saved["step"]), list(saved["losses"])
        log.info("resuming fine-tuning from step %d", start)

    step_module = _StepModule(encoder, objective)
    model = step_module
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # last_blocks unfreezes everything after the first trained block, classifier heads that
        # ``encode`` never uses included: DDP must not wait for their gradients
        model = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=True)
    use_amp = t.amp and device.type == "cuda"  # never autocast on CPU
    amp_dtype = getattr(torch, t.amp_dtype)
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

    def save_state(step: int) -> None:
        if env.is_main:
            tmp = state_dir.with_name(state_dir.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()},
                      str(tmp / "encoder.safetensors"))
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in objective.state_dict().items()},
                      str(tmp / "objective.safetensors"))
            torch.save(optimiser.state_dict(), tmp / "optimiser.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "config_key": key,
                                                           "config": _state_config(cfg)}))
            import shutil

            shutil.rmtree(state_dir, ignore_errors=True)
            tmp.rename(state_dir)
        barrier(env)

    bar = progress_bar(t.steps, f"finetune {cfg.mode}/{cfg.objective}", unit="step", enabled=progress and env.is_main)
    bar.update(start)
    try:
        for step in range(start, t.steps):
            set_train_mode(net, train_modules)
            objective.train()
            generator = torch.Generator().manual_seed(mix_seed(t.seed, step, env.rank))
            if batch_fn is not None:
                closure = lambda: batch_fn(generator)  # noqa: E731
            else:
                closure = lambda: objective.step_loss(encoder, bank, generator)  # noqa: E731
            with torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext():
                loss = model(closure)
            if max(all_reduce_max([0.0 if torch.isfinite(loss) else 1.0], env, device)) > 0:
                raise FloatingPointError(f"step {step}: loss is not finite (lower the learning rate)")
            optimiser.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimiser)
                scaler.update()
            else:
                optimiser.step()
            losses.append(all_reduce_mean([float(loss.detach())], env, device)[0])
            bar.update(1)
            if step % max(1, t.log_every) == 0 or step == t.steps - 1:
                bar.set_postfix_str(f"loss={losses[-1]:.4f}")
                log.debug("step %d loss %.5f", step, losses[-1])
            if state_dir is not None and ((step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps):
                save_state(step + 1)
    finally:
        bar.close()
    net.eval()
    return losses


def save_checkpoint(encoder, out_dir: str | Path, record: dict[str, Any]) -> Path:
    """Merges LoRA layers (in place) and writes ``encoder.safetensors`` + ``finetune.json`` in ``out_dir``.

    Returns:
        Path of the safetensors file, loadable with ``build_encoder(key, weights=path)``.
    """
    from safetensors.torch import save_file

    from slice2vol.encoders import sha256_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = merge_lora(encoder.model)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.model.state_dict().items()}
    path = out / "encoder.safetensors"
    save_file(state, str(path), metadata={"encoder": encoder.info.key, "format": "slice2vol-finetune"})
    record = dict(record)
    record.update({"checkpoint": path.name, "checkpoint_sha256": sha256_file(path), "merged_lora_layers": merged,
                   "load_with": f"build_encoder({encoder.info.key!r}, weights={str(path)!r}"
                                f"{''.join(f', {k}={v!r}' for k, v in record.get('encoder_kwargs', {}).items())})"})
    (out / "finetune.json").write_text(json.dumps(record, indent=2, default=str))
    return path


def run_finetune(cfg: FinetuneConfig, cohort, out_dir: str | Path, *, volume_cfg=None,
                 bank: SliceBank | None = None, progress: bool = True, subject_ids: Sequence[str] | None = None,
                 resume: bool = True) -> Path:
    """Builds the encoder, trains it as ``cfg`` says on ``cohort`` and writes the checkpoint.

    Started by torchrun, this is one rank of a DDP job: each rank slices its share of the training
    subjects (memory per process shrinks with the number of processes), gradients are averaged, and
    rank 0 writes the checkpoint.

    Args:
        cfg: the run.
        cohort: a :class:`~slice2vol.data.Cohort` (subjects to slice, labels).
        out_dir: output folder (``encoder.safetensors``, ``finetune.json``, ``head.safetensors``).
        volume_cfg: how volumes are loaded (default :class:`~slice2vol.data.VolumeConfig`).
        bank: pre-built slices (skips loading; tests).
        subject_ids: train on these subjects (e.g. the training folds of a benchmark); replaces
            ``cfg.data.train_ids`` and satisfies the supervised objective's need for explicit subjects.
        resume: continue from ``<out_dir>/train_state`` when ``train.checkpoint_every`` wrote one.

    Returns:
        Path of the merged checkpoint.
    """
    from safetensors.torch import save_file

    from slice2vol.data import SliceConfig
    from slice2vol.encoders import build_encoder
    from slice2vol.ssl.distributed import all_gather_object, barrier, cleanup, configure_threads, init_distributed
    from slice2vol.ssl.trainer import resolve_device

    start = time.time()
    device = resolve_device(cfg.train.device)
    env = init_distributed(device.type)
    try:
        configure_threads(env)
        if device.type == "cuda" and env.distributed:
            from slice2vol.ssl.distributed import rank_device

            device = rank_device(cfg.train.device, env)  # the rank's GPU; another explicit index refused
        if subject_ids is not None:
            ids = list(subject_ids)
            unknown = sorted(set(ids) - {s.subject_id for s in cohort.subjects})
            if unknown:
                raise ValueError(f"{len(unknown)} subject_ids not in the cohort, e.g. {unknown[:3]}")
        else:
            ids = _train_ids(cfg, cohort)
        extra: dict[str, Any] = {}
        if cfg.objective == "supervised":
            if not cfg.label:
                raise ValueError("objective 'supervised' needs a label column (--label)")
            # classes / standardisation from every training subject, identical on all ranks
            ids, _, kind, extra = supervised_targets(cohort, cfg.label, ids)
            extra["kind"] = kind
        elif cfg.objective != "simclr":
            raise ValueError(f"objective must be simclr or supervised, got {cfg.objective!r}")
        mine = ids[env.rank::env.world_size]
        if bank is None:
            d = cfg.data
            slice_cfg = SliceConfig(planes=tuple(d.planes), stride=d.stride, min_foreground=d.min_foreground,
                                    context=d.context, size=d.slice_size)
            bank = SliceBank.from_cohort(cohort.subset(mine), slice_cfg, volume_cfg, progress=progress and env.is_main)
        else:
            bank = bank.subset([i for i in mine if i in bank.ids])
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        encoder = build_encoder(cfg.encoder, weights=cfg.weights, **cfg.encoder_kwargs).to(device)
        setup = setup_trainable(encoder.model, cfg)
        n_trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        if cfg.objective == "simclr":
            objective: Objective = SimCLRObjective(encoder.info.embed_dim, cfg)
        else:
            targets = _encode_targets(cohort, cfg.label, bank.ids, extra)
            objective = SupervisedObjective(encoder.info.embed_dim, cfg, targets, extra["kind"], extra.get("classes"))
        objective.to(device)
        log.info("%s: %s/%s on %d slices of %d subjects (rank %d of %d), %d trainable encoder parameters",
                 cfg.encoder, cfg.mode, cfg.objective, len(bank), len(bank.ids), env.rank, env.world_size,
                 n_trainable)
        losses = train_steps(encoder, objective, bank, cfg, setup["train_modules"], progress=progress,
                             out_dir=out_dir, resume=resume, env=env)
        shares = all_gather_object({"ids": bank.ids, "n": len(bank), "failures": [str(f) for f in bank.failures]},
                                   env)
        trained = [sid for share in shares for sid in share["ids"]]
        order = {sid: k for k, sid in enumerate(ids)}
        record = {
            "encoder": cfg.encoder, "encoder_kwargs": cfg.encoder_kwargs,
            "base_weights": encoder.info.weights, "base_weights_sha256": encoder.info.weights_sha256,
            "mode": cfg.mode, "objective": cfg.objective, "label": cfg.label, "label_info": extra,
            "config": to_dict(cfg), "trained_subjects": sorted(trained, key=order.get),
            "n_slices": sum(share["n"] for share in shares),
            "trainable_parameters": n_trainable, "trainable_tensors": setup["trainable"],
            "lora_layers": setup["lora_layers"], "losses": losses, "steps": len(losses),
            "world_size": env.world_size, "global_batch": cfg.train.batch_size * env.world_size,
            "seconds": round(time.time() - start, 1), "torch": torch.__version__,
            # the manifest's rows left out (the same on every rank), then each rank's subjects that failed
            "failures": [str(f) for f in getattr(cohort, "failures", [])]
                        + [f for share in shares for f in share["failures"]],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = Path(out_dir) / "encoder.safetensors"
        if env.is_main:
            path = save_checkpoint(encoder, out_dir, record)
            save_file({k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()},
                      str(Path(out_dir) / "head.safetensors"))
        barrier(env)
        return path
    finally:
        cleanup(env)


def _encode_targets(cohort, label: str, ids: Sequence[str], info: dict) -> np.ndarray:
    """Targets of ``ids`` with the classes / standardisation ``info`` computed on all training subjects."""
    column = cohort.labels()[label].reindex(list(ids))
    if info["kind"] == "categorical":
        lookup = {c: i for i, c in enumerate(info["classes"])}
        return np.array([lookup[v] for v in column])
    return (column.to_numpy(dtype=np.float64) - info["mean"]) / info["std"]


def _train_ids(cfg: FinetuneConfig, cohort) -> list[str]:
    all_ids = [s.subject_id for s in cohort.subjects]
    spec = cfg.data.train_ids
    if spec is None:
        if cfg.objective == "supervised":
            raise ValueError("supervised fine-tuning needs data.train_ids (a file of training subject IDs, or "
                             "'all' if no evaluation will use this cohort): otherwise evaluation subjects would "
                             "shape the weights")
        return all_ids
    if spec == "all":
        return all_ids
    from slice2vol.data.manifest import check_ids_known, read_id_list

    wanted = read_id_list(spec, "data.train_ids")
    check_ids_known(spec, wanted, all_ids, "the manifest")
    return wanted
