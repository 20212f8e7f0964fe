"""Fine-tuning 2D encoders on a cohort's slices (frozen, last blocks, LoRA; SimCLR or supervised).

    >>> cfg = FinetuneConfig(encoder="timm/vit_small_patch16_224", mode="lora", objective="simclr")
    >>> path = run_finetune(cfg, load_manifest("cohort.csv"), "runs/ft")
    >>> encoder = build_encoder(cfg.encoder, weights=path)   # caches and evaluates like any other
"""

from slice2vol.finetune.data import AugmentConfig, SliceBank, augment
from slice2vol.finetune.lora import LoRALinear, inject_lora, lora_parameters, merge_lora
from slice2vol.finetune.train import (
    FinetuneConfig,
    FinetuneData,
    FinetuneTrain,
    LoRAConfig,
    SimCLRObjective,
    SupervisedObjective,
    find_blocks,
    run_finetune,
    save_checkpoint,
    setup_trainable,
    train_steps,
)

__all__ = [
    "AugmentConfig", "FinetuneConfig", "FinetuneData", "FinetuneTrain", "LoRAConfig", "LoRALinear",
    "SimCLRObjective", "SliceBank", "SupervisedObjective", "augment", "find_blocks", "inject_lora",
    "lora_parameters", "merge_lora", "run_finetune", "save_checkpoint", "setup_trainable", "train_steps",
]
