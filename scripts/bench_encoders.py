#!/usr/bin/env python
"""Encoder throughput on this machine: slices/s at a fixed batch and FLOPs per slice.

The number later issues compare against (caching, aggregation overheads) is the bare forward:
``encode`` on already-sliced (B, 1, H, W) inputs, preprocessing included, under
``torch.inference_mode``, channels_last for CNNs, no autocast on CPU.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one slice, with attention forced
to the math SDPA kernel (the fused CPU flash kernel is invisible to the counter). A multiply-add
counts as 2 FLOPs.

Example:
    python scripts/bench_encoders.py --encoders tv/mobilenet_v2 timm/resnet18 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def count_flops(encoder, image_size: tuple[int, int]) -> float:
    """FLOPs of ``encode`` for one (1, 1, H, W) slice (math attention so SDPA is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 1, *image_size, device=encoder.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        encoder.encode(x)
    return float(counter.get_total_flops())


def time_encoder(encoder, batch: int, image_size: tuple[int, int], repeats: int, warmup: int = 1) -> list[float]:
    """Slices/s of ``encode`` for each of ``repeats`` timed batches (after ``warmup`` untimed ones)."""
    x = torch.rand(batch, 1, *image_size, device=encoder.device)
    rates = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            encoder.encode(x)
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                rates.append(batch / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["tv/mobilenet_v2", "timm/resnet18",
                                                          "timm/efficientnet_lite0", "timm/vit_small_patch16_224"])
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per encoder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--slice-size", type=int, default=224, help="side of the input slices (before resizing)")
    parser.add_argument("--img-size", type=int, default=None, help="encoder input size (default: native)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-channels-last", action="store_true", help="keep NCHW for CNNs")
    parser.add_argument("--compile", action="store_true", help="torch.compile (slow first call)")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast, CUDA only")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    from slice2vol.encoders import build_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    size = (args.slice_size, args.slice_size)
    rows = []
    print(f"# device={args.device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"repeats={args.repeats} torch={torch.__version__}", flush=True)
    print(f"{'encoder':36s} {'input':>8s} {'GFLOP/slice':>12s} {'slices/s':>9s} {'(min-max)':>13s} {'GFLOP/s':>8s}")
    for key in args.encoders:
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        encoder = build_encoder(key, **kwargs).to(args.device)
        flops = count_flops(encoder, size)
        encoder.optimize(channels_last=False if args.no_channels_last else None, compile=args.compile, amp=args.amp)
        rates = time_encoder(encoder, args.batch_size, size, args.repeats)
        median = statistics.median(rates)
        row = {"encoder": key, "input": list(encoder.info.input_size), "gflop_per_slice": flops / 1e9,
               "slices_per_s": median, "min": min(rates), "max": max(rates), "achieved_gflops": median * flops / 1e9,
               "batch": args.batch_size, "threads": torch.get_num_threads(), "device": args.device,
               "channels_last": bool(getattr(encoder, "_channels_last", False)), "compile": args.compile}
        rows.append(row)
        print(f"{key:36s} {'x'.join(map(str, encoder.info.input_size)):>8s} {flops / 1e9:12.2f} {median:9.1f} "
              f"{min(rates):6.1f}-{max(rates):<6.1f} {row['achieved_gflops']:8.1f}", flush=True)
        del encoder
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
