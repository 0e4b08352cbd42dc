"""What batching and --cfg-trunc buy when sampling the shipped demo model on this CPU.

    python benchmarks/bench_batch.py                  # about 2 minutes on 2 cores

Both are ratios measured in one process, the runs interleaved (A, B, A, B, ...) and the median taken, so that a
busy machine slows both alike:
  batch      8 prompts at the demo's defaults (128 px, 20 DPM-Solver++ steps, CFG 3), generated one image per
             generate() call (sample.py --batch-size 1) and four per call (--batch-size 4): images/s of each, and
             the largest pixel difference between the two (batching changes kernels, not results).
  cfg_trunc  the same 8 prompts at --batch-size 4 with guidance on every step and with --cfg-trunc 0.5 (guidance
             only while t < 0.5): seconds per image of each. What it costs in prompt adherence is measured by
             `python benchmarks/eval_shapes.py --cfg-trunc 0.5` (benchmarks/README.md has both).
The JSON (--out) holds every timing.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402

PROMPTS = ["a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right",
           "an orange square in the top right", "a purple circle in the bottom left", "a yellow triangle in the center",
           "a blue square in the top right and an orange triangle in the bottom left",
           "a red circle in the top left and a green square in the bottom right"]


def run(pipe, batch, **options):
    """Every prompt once, `batch` per generate() call -> (seconds, images as int arrays)."""
    start, images = time.perf_counter(), []
    for k in range(0, len(PROMPTS), batch):
        images += pipe.generate(PROMPTS[k:k + batch], seeds=list(range(k, k + batch))[:len(PROMPTS) - k],
                                progress=False, **options)
    return time.perf_counter() - start, [np.asarray(img, dtype=np.int64) for img in images]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="model (default: the shipped demo)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each variant; the median is kept")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="bench_batch.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = sample.load_pipeline(args.ckpt, device="cpu")
    run(pipe, 4, steps=2)                                            # warm-up
    variants = {"batch_1": dict(batch=1), "batch_4": dict(batch=4), "batch_4_cfg_trunc_0.5": dict(batch=4, cfg_trunc=0.5)}
    seconds, images = {name: [] for name in variants}, {}
    for _ in range(args.repeats):
        for name, options in variants.items():
            t, images[name] = run(pipe, **options)
            seconds[name].append(t)
    median = {name: statistics.median(ts) for name, ts in seconds.items()}
    result = dict(
        prompts=len(PROMPTS), settings=dict(zip(("width", "height", "steps", "cfg", "solver", "shift"), pipe.settings())),
        threads=args.threads, seconds=seconds,
        images_per_second={name: len(PROMPTS) / t for name, t in median.items()},
        batch_4_speedup=median["batch_1"] / median["batch_4"],
        batch_max_pixel_difference=int(max(np.abs(a - b).max() for a, b in zip(images["batch_1"], images["batch_4"]))),
        cfg_trunc_time_ratio=median["batch_4_cfg_trunc_0.5"] / median["batch_4"],
        cfg_trunc_mean_abs_pixel_difference=float(np.mean([np.abs(a - b).mean() for a, b in
                                                           zip(images["batch_4"], images["batch_4_cfg_trunc_0.5"])])))
    for key in ("images_per_second", "batch_4_speedup", "batch_max_pixel_difference", "cfg_trunc_time_ratio",
                "cfg_trunc_mean_abs_pixel_difference"):
        print(f"{key}: {result[key]}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
