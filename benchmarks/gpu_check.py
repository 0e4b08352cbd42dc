"""The one prepared script for a CUDA machine: does the GPU path work, and how fast is it.

    python benchmarks/gpu_check.py --out results.json          # about 7 minutes on one H200
    python benchmarks/gpu_check.py --parts train_loop,sample_1024 --timeout-scale 2 --out rerun.json

Eight parts, each in its own process with its own time limit (PARTS at the bottom; 420 s together, 25 s more
when diffusers is installed), so a hang or a slow compile costs one part, never the whole run:

  cli          The command line as a user types it, tiny preset, built-in shapes data: `train.py --autoencoder
               P --stage 1`; `torchrun --nproc_per_node=1 train.py --stage 1 --compile`; the same command in
               a second folder, killed (SIGTERM to torchrun, as a job scheduler does) after its first
               checkpoint and started again, whose final weights must equal the uninterrupted run's;
               `--fsdp` stage 2; `sample.py`. Pass/fail for each, and `compiles` from log.jsonl.
  step_256     The 2B Next-DiT's stage-1 training step (256 px = 256 image tokens, batch 8, 128 caption
               tokens, bf16 autocast over fp32 weights, fused AdamW), eager and compiled: s/step, tokens/s,
               images/s, peak memory, MFU = model FLOPs per step / step time / measured bf16 matmul rate.
  train_loop   The same step inside train.py's own loop, run as a user runs it (`--preset 2B --dino --gemma
               --stats`), on random DINOv3 ViT-S+/16 and Gemma-2-2B weights written in the released layouts
               and a JSONL of 512x512 PNGs with ~128-token captions: images/s from log.jsonl (data loading,
               DINOv3, Gemma-2, EMA included) and its ratio to step_256's images/s.
  step_1024    The 2B step at the stage-3 size (1024 px = 4,096 image tokens, batch 2), compiled.
  sample_1024  sample.py's pipeline on a folder in the released layout: 1024 px, 50 DPM-Solver++ steps, CFG 4,
               shift 10, random 2B DiT, Autoencoder-P decoder and a 2-layer Gemma-2 (it runs once per
               image); seconds per image in bf16, and how far the image is from a float32 run's.
  sample_batch The same pipeline, 4 prompts at 1024 px (10 steps) one at a time and as one batch
               (sample.py --batch-size 1 vs 4): images/s of each, the speed-up, the largest pixel difference.
  diffusers    Only where diffusers is importable: the 2B forward + backward against diffusers'
               `Lumina2Transformer2DModel` holding the same weights (eager, caption lengths 64-128).
  lora_1024    train.py --lora 8's step on the 2B model at 1024 px, batch 1, --grad-checkpointing: the base
               frozen in bf16 and shared with the EMA, adapters in fp32; s/step and peak memory (goal <= 24 GB).

Out comes one JSON (--out), written before the first part and again after each: per part a status (ok,
failed, timeout, skipped), its figures -- a part that runs out of time keeps what it had measured -- and,
unless ok, the end of its log. Weights are random (a step costs the same whatever the weights); nothing is
downloaded and nothing outside this repository is needed.

Without CUDA, or with --tiny, every part runs at a tiny size on the CPU in float32 (torchrun over gloo, no
torch.compile unless --compile). tests/test_gpu_check.py runs it that way, so the script keeps working.

For the shared device machine: one H200, torch 2.11 + CUDA 13, no diffusers unless its wheel travels with
the checkout (64 MiB at most, so the diffusers part usually says `skipped`). Run it there as
`python benchmarks/gpu_check.py --out $OUT/gpu_check.json` with a command limit of ~450 s: the JSON carries
the end of every failing part's log. Scratch files (5 GB of Gemma-2 weights, images, run folders, each part's
full log) go to --work, a fresh temporary folder by default, never into the checkout or $OUT.
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
import autoencoder as ae_lib  # noqa: E402  (after the path set-up above)
import data  # noqa: E402
import dino  # noqa: E402
import flow  # noqa: E402
import machinery  # noqa: E402
import model as dit_lib  # noqa: E402
import reference  # noqa: E402
import sample  # noqa: E402
import text  # noqa: E402
import train  # noqa: E402

TRAIN, SAMPLE = os.path.join(ROOT, "train.py"), os.path.join(ROOT, "sample.py")

# ----- Sizes -----------------------------------------------------------------------------------------------
# FULL is what the issue asks about; TINY runs the same code in seconds on a CPU. The DiT's input and caption
# widths follow the encoders (384 = ViT-S+/16, 2304 = Gemma-2-2B), as in train.py.
_TINY_PRESET = train.PRESETS["tiny"]
FULL = dict(
    dit="2B", dino=dino.DINOV3_CONFIGS["vits16plus"], gemma=text.GEMMA2_CONFIGS["2b"], encoder_patch=16,
    dtype=torch.bfloat16, matmul_size=8192, runs=10,
    step_256=dict(res=256, batch=8, cap_len=128), step_1024=dict(res=1024, batch=2, cap_len=128),
    train_preset="2B", images=32, image_px=512,
    sample=dict(res=1024, steps=50, cfg=4.0, shift=10.0, gemma_layers=3, decoder=ae_lib.DECODER_CONFIG),
    lumina=dict(batch=8, latent=16, cap_lens=[128, 119, 110, 101, 92, 83, 74, 64]),
)
TINY = dict(
    dit="tiny", dino=_TINY_PRESET["dino"], gemma=_TINY_PRESET["gemma"], encoder_patch=8,
    dtype=torch.float32, matmul_size=512, runs=2,
    step_256=dict(res=32, batch=4, cap_len=16), step_1024=dict(res=64, batch=2, cap_len=16),
    train_preset="tiny", images=16, image_px=64,
    sample=dict(res=64, steps=2, cfg=4.0, shift=10.0, gemma_layers=None, decoder=_TINY_PRESET["decoder"]),
    lumina=dict(batch=2, latent=4, cap_lens=[16, 9]),
)
CLI_STEPS, CLI_CKPT_EVERY = 24, 4      # tiny stage 1: killed after its first checkpoint, 20 steps before the end
PROMPT = "a red circle in the top left and a blue square in the bottom right"


def dit_config(size):
    return dict(dit_lib.NEXTDIT_CONFIGS[size["dit"]], in_channels=size["dino"]["embed_dim"],
                cap_feat_dim=size["gemma"]["hidden_size"])


# ----- Small tools -----------------------------------------------------------------------------------------

def write_json(obj, path):
    """Atomically: a reader (or a kill) never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(f"{path}.tmp", path)


class Record(dict):
    """A part's results, rewritten to its JSON file at every update: a part stopped at its time limit still
    reports everything it had measured."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def update(self, **figures):
        super().update(figures)
        write_json(self, self.path)


def tail(path, lines=25):
    """The last lines of a log, progress-bar redraws (\\r) collapsed to their final state. Under torchrun the
    worker's own lines ([rank0]: ..., its traceback) say more than the launcher's summary after them."""
    with open(path, errors="replace") as f:
        rows = [line.rsplit("\r", 1)[-1].rstrip() for line in f.read().split("\n")]
    rows = [row[:300] for row in rows if row]
    return ([row for row in rows if row.startswith("[rank")] or rows)[-lines:]


def run_logged(cmd, log):
    """Run a command to completion, its output in `log`; a non-zero exit raises with the end of the log."""
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise RuntimeError(f"`{' '.join(os.path.basename(str(c)) for c in cmd[:6])} ...` exited with {rc}:\n"
                           + "\n".join(tail(log, 12)))


def log_rows(run_dir):
    """train.py's log.jsonl, DiT rows only (autoencoder rows carry an `autoencoder` key)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "autoencoder" not in r]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, runs, warmup=2):
    """Median seconds of fn() over `runs` calls after `warmup`, synchronising the device around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_rate(device, dtype, n):
    """FLOP/s of an [n, n] @ [n, n] matmul: the ceiling MFU is measured against (bf16 on CUDA, fp32 on CPU)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, device, runs=10)


def step_flops(cfg, batch, image_tokens, cap_tokens, params):
    """Model FLOPs of forward + backward: 6 per parameter per token (every token meets every block's weights
    once in the joint blocks; the refiners see only their half, so this slightly overcounts), plus attention
    4·S²·dim forward per block, x3 with backward."""
    seq = image_tokens + cap_tokens
    attention = 3 * 4 * batch * cfg["dim"] * (cfg["n_layers"] * seq ** 2 + cfg["n_refiner_layers"] *
                                              (image_tokens ** 2 + cap_tokens ** 2))
    return 6 * params * batch * seq + attention


def autocast(device):
    """bf16 autocast over fp32 weights on CUDA, as train.py trains; plain fp32 on the CPU."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ----- Random encoders in the released layouts and a small image-text dataset -----------------------------

def write_encoders(folder, size, device, gemma_layers=None, gemma_name="gemma"):
    """Random DINOv3 (Meta safetensors), Gemma-2 (Hugging Face folder + a sentencepiece tokenizer trained on
    the shapes captions, as train.py makes for its small presets) and identity latent statistics, where the
    loaders of train.py and sample.py read the released files. -> {dino, gemma, stats, tokenizer} paths."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    gemma_dir = os.path.join(folder, gemma_name)
    tok = text.train_tokenizer(data.all_captions() + list(text.SYSTEM_PROMPTS.values()),
                               os.path.join(gemma_dir, "tokenizer.model"), 512)
    gemma_cfg = dict(size["gemma"])
    if gemma_layers:                                # fewer layers, same width: a cheap stand-in
        gemma_cfg.update(num_hidden_layers=gemma_layers, vocab_size=text.Tokenizer(tok).vocab_size)
    # Built where it runs: 2.6 B parameters initialise in a second on a GPU, in a minute on the CPU; stored in
    # bf16 on CUDA (5 GB, as released), in shards with an index like google/gemma-2-2b.
    with torch.device(device):
        gemma = text.Gemma2Encoder(**gemma_cfg)
    if device.type == "cuda":
        gemma.to(torch.bfloat16)
    text.save_gemma2(gemma, gemma_dir, max_shard_size=2 ** 31)
    del gemma
    dino_path = os.path.join(folder, "dinov3_vits16plus.safetensors")
    dino.save_dinov3(dino.DINOv3(**size["dino"]), dino_path)
    channels = size["dino"]["embed_dim"]
    stats = os.path.join(folder, "latent_stats.pt")
    dino.LatentStats(torch.zeros(channels), torch.ones(channels)).save(stats)
    return dict(dino=dino_path, gemma=gemma_dir, stats=stats, tokenizer=tok)


def write_images(folder, size, tokenizer_path, cap_len):
    """size['images'] square PNGs (smooth colour waves plus noise, so they compress like photos do) and a JSONL
    whose captions tokenise, with the system prompt, to just under `cap_len` tokens: every batch then pads
    to cap_len, the caption length of the model-only step. -> (jsonl path, tokens per caption)."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = text.Tokenizer(tokenizer_path)
    rng = np.random.default_rng(0)
    px = size["image_px"]
    yy, xx = np.mgrid[0:px, 0:px] / px
    words = " ".join(data.all_captions()[::97]).split()
    lines, lengths = [], []
    for i in range(size["images"]):
        waves = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))
                 for _ in range(3)]
        pixels = 127.5 * (1 + np.stack(waves, -1)) + rng.normal(0, 12, (px, px, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
        caption, start = [], int(rng.integers(len(words)))
        count = lambda c: 1 + len(tokenizer.sp.encode(text.format_prompt(" ".join(c), "base")))  # BOS included
        while count(caption) <= cap_len - 8:     # stop inside the last multiple of 8
            caption.append(words[(start + len(caption)) % len(words)])
        lengths.append(count(caption))
        lines.append(json.dumps(dict(path=f"{i:03d}.png", prompt=" ".join(caption))))
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, lengths


# ----- Part 1: the command line end to end -----------------------------------------------------------------

def part_cli(ctx):
    cuda = ctx.device.type == "cuda"
    run, resumed = os.path.join(ctx.work, "run"), os.path.join(ctx.work, "resumed")
    common = ["--preset", "tiny", "--preview-every", "0", "--data-limit", "64", *([] if cuda else ["--workers", "0"])]
    compile_flag = ["--compile" if ctx.compile else "--no-compile"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", TRAIN]
    stage1 = [*common, "--stage", "1", "--max-steps", CLI_STEPS, "--ckpt-every", CLI_CKPT_EVERY, *compile_flag]
    checks = {}

    def check(name, fn):
        start = time.time()
        try:
            result = dict(fn() or {}, ok=True)
        except Exception as e:                    # noqa: BLE001 -- every failure is a reported result
            result = dict(ok=False, error=f"{type(e).__name__}: {e}")
        checks[name] = dict(result, seconds=round(time.time() - start, 1))
        ctx.rec.update(checks=checks)
        print(f"{name}: {'ok' if result['ok'] else 'FAILED'} ({checks[name]['seconds']} s)", flush=True)

    def expect(path):
        if not os.path.exists(path):
            raise RuntimeError(f"the command succeeded but {os.path.relpath(path, ctx.work)} is missing")

    def autoencoder():
        run_logged([sys.executable, TRAIN, "--out", run, *common, "--autoencoder", "P", "--stage", "1",
                    "--max-steps", "10"], os.path.join(ctx.work, "autoencoder.log"))
        expect(os.path.join(run, "autoencoder_P", "stage1", "model.safetensors"))

    def straight():
        run_logged([*torchrun, "--out", run, *stage1], os.path.join(ctx.work, "stage1.log"))
        expect(os.path.join(run, "stage1", "model.safetensors"))
        return dict(compiles=log_rows(run)[-1].get("compiles"))

    def killed_and_resumed():
        # Same encoders (and latent statistics) as the uninterrupted run, so the weights must come out equal.
        os.makedirs(resumed, exist_ok=True)
        shutil.copy(os.path.join(run, "encoders.json"), resumed)
        shutil.copytree(os.path.join(run, "encoders"), os.path.join(resumed, "encoders"))
        stage_dir, cmd = os.path.join(resumed, "stage1"), [str(c) for c in [*torchrun, "--out", resumed, *stage1]]
        log = os.path.join(ctx.work, "stage1_killed.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            while proc.poll() is None and machinery.find_latest(stage_dir) is None:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)      # torchrun passes it on to its worker, then exits
            proc.wait()
        latest = machinery.find_latest(stage_dir)
        if os.path.exists(os.path.join(stage_dir, "model.safetensors")):
            raise RuntimeError("the run finished before it could be killed; nothing was resumed")
        if latest is None:
            raise RuntimeError("the run stopped before its first checkpoint:\n" + "\n".join(tail(log, 12)))
        killed_at = torch.load(os.path.join(latest, "trainer.pt"), weights_only=True)["step"]
        run_logged(cmd, os.path.join(ctx.work, "stage1_resumed.log"))      # the same command again
        # A restart from step 0 would end with the same weights too (every draw is keyed by the step): the
        # run must say it resumed.
        with open(os.path.join(ctx.work, "stage1_resumed.log")) as f:
            if f"at step {killed_at}" not in f.read():
                raise RuntimeError(f"the second run did not report resuming at step {killed_at}")
        max_abs, relative = {}, {}
        for name in ("model.safetensors", "ema.safetensors"):
            a, b = load_file(os.path.join(run, "stage1", name)), load_file(os.path.join(stage_dir, name))
            max_abs[name] = max((a[k] - b[k]).abs().max().item() for k in a)
            relative[name] = (sum((a[k] - b[k]).square().sum() for k in a) / sum(a[k].square().sum() for k in a)
                              ).sqrt().item()
        # On the CPU a resumed run is bit-identical. On CUDA some kernels (attention backward) accumulate in a
        # nondeterministic order, which moves the weights by ~1e-6 of their norm; a resume that lost the
        # optimizer state, the data order or the noise draws moves them by ~1e-2 (a few AdamW steps of 2e-4).
        tolerance = 1e-4 if cuda else 0.0
        if max(relative.values()) > tolerance:
            raise RuntimeError(f"resumed weights differ from the uninterrupted run's by {relative} of their norm "
                               f"(> {tolerance})")
        return dict(killed_at_step=killed_at, max_abs_diff=max_abs, relative_diff=relative, tolerance=tolerance,
                    compiles=log_rows(resumed)[-1].get("compiles"))

    def fsdp_stage2():
        run_logged([*torchrun, "--out", run, *common, "--stage", "2", "--fsdp", "--max-steps", "4", *compile_flag],
                   os.path.join(ctx.work, "stage2_fsdp.log"))
        expect(os.path.join(run, "stage2", "model.safetensors"))
        return dict(compiles=log_rows(run)[-1].get("compiles"))

    def sampling():
        out = os.path.join(ctx.work, "samples")
        dtype = ["--dtype", "bfloat16"] if cuda else []
        run_logged([sys.executable, SAMPLE, "--ckpt", run, "--prompt", PROMPT, "--out", out, "--steps", "4", *dtype],
                   os.path.join(ctx.work, "sample.log"))
        pngs = [n for n in os.listdir(out) if n.endswith(".png")]
        if not pngs:
            raise RuntimeError(f"sample.py wrote no PNG into {out}")
        return dict(image=pngs[0], dtype=dtype[-1] if dtype else "default")

    check("autoencoder_stage1", autoencoder)
    check("stage1_torchrun", straight)
    check("stage1_killed_and_resumed", killed_and_resumed)
    check("stage2_fsdp", fsdp_stage2)
    check("sample_py", sampling)
    failed = [name for name, c in checks.items() if not c["ok"]]
    if failed:
        raise SystemExit(f"cli: {', '.join(failed)} failed (their `error` fields say why)")


# ----- Parts 2 and 3: the model-only training step ---------------------------------------------------------

def model_step(ctx, spec, modes):
    """s/step, tokens/s, images/s, peak memory and MFU of the DiT's training step, one entry per mode."""
    size, device = ctx.size, ctx.device
    cfg = dit_config(size)
    peak_rate = matmul_rate(device, size["dtype"], size["matmul_size"])
    latent = spec["res"] // size["encoder_patch"]                      # 256 px / 16 -> 16x16 latent cells
    image_tokens = (latent // cfg["patch_size"]) ** 2
    with torch.device(device):                                         # initialised where it runs
        model = dit_lib.NextDiT(**cfg).train()
    model.norm_final.requires_grad_(False)                             # unused in forward, as in train.py
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=train.LR, betas=train.BETAS, eps=train.ADAM_EPS,
                            weight_decay=train.WEIGHT_DECAY, fused=device.type == "cuda")
    B, L = spec["batch"], spec["cap_len"]
    x1 = torch.randn(B, cfg["in_channels"], latent, latent, device=device)     # [B, C, h, w]
    x0, t = torch.randn_like(x1), torch.rand(B, device=device)
    feats = torch.randn(B, L, cfg["cap_feat_dim"], device=device)              # [B, L, D]
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    flops = step_flops(cfg, B, image_tokens, L, n_params)
    ctx.rec.update(config=size["dit"], params=n_params, resolution=spec["res"], batch=B, image_tokens=image_tokens,
                   caption_tokens=L, matmul_flops=peak_rate, matmul_dtype=str(size["dtype"]).replace("torch.", ""),
                   model_flops_per_step=flops)
    for mode in modes:
        forward = torch.compile(model) if mode == "compiled" else model

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast(device):
                v = forward(flow.interpolate(x0, x1, t), t, feats, mask)
            flow.training_loss(v.float(), x0, x1).mean().backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()                                                        # compiles, when compiling
        sync(device)
        first = time.perf_counter() - start
        seconds = timed(step, device, runs=size["runs"])
        ctx.rec.update(**{mode: dict(
            seconds_per_step=seconds, first_step_seconds=first, tokens_per_second=B * (image_tokens + L) / seconds,
            images_per_second=B / seconds, mfu=flops / seconds / peak_rate,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None)})


def part_step_256(ctx):
    model_step(ctx, ctx.size["step_256"], ["eager", "compiled"] if ctx.compile else ["eager"])


def part_step_1024(ctx):
    model_step(ctx, ctx.size["step_1024"], ["compiled" if ctx.compile else "eager"])


# ----- Part 2, continued: the same step inside train.py --------------------------------------------------------

def part_train_loop(ctx, rows_wanted=3):
    """train.py stage 1 on files in the released layouts, stopped once log.jsonl has `rows_wanted` rows: the
    first row's interval holds the start-up (and compilation), the last one is the steady state. Stopping
    it (SIGTERM) also keeps the 2B run from writing its 40 GB checkpoint."""
    size, spec = ctx.size, ctx.size["step_256"]
    preset = size["train_preset"]
    assert train.PRESETS[preset]["dit_res"][0] == spec["res"], "train.py's stage 1 must run at step_256's size"
    start = time.time()
    encoders = write_encoders(os.path.join(ctx.work, "encoders"), size, ctx.device)
    jsonl, lengths = write_images(os.path.join(ctx.work, "data"), size, encoders["tokenizer"], spec["cap_len"])
    ctx.rec.update(setup_seconds=time.time() - start, images=size["images"], image_px=size["image_px"],
                   caption_tokens=dict(min=min(lengths), max=max(lengths)), batch=spec["batch"],
                   compiled=ctx.compile)
    run_dir = os.path.join(ctx.work, "run")
    if train.PRESETS[preset]["dino"] is not None:
        # A small preset makes its own encoders unless encoders.json already names some: point it at ours.
        os.makedirs(run_dir, exist_ok=True)
        write_json({k: encoders[k] for k in ("dino", "gemma", "stats")}, os.path.join(run_dir, "encoders.json"))
    B = str(spec["batch"])
    cmd = [sys.executable, TRAIN, "--stage", "1", "--preset", preset, "--out", run_dir, "--data", jsonl,
           "--dino", encoders["dino"], "--gemma", encoders["gemma"], "--stats", encoders["stats"],
           "--global-batch-size", B, "--micro-batch-size", B, "--max-steps", "1000000", "--ckpt-every", "1000000",
           "--preview-every", "0", "--compile" if ctx.compile else "--no-compile",
           *([] if ctx.device.type == "cuda" else ["--workers", "0"])]
    log = os.path.join(ctx.work, "train.log")
    rows = []
    try:
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            while proc.poll() is None and len(rows) < rows_wanted:
                time.sleep(0.5)
                if len(log_rows(run_dir)) > len(rows):
                    rows = log_rows(run_dir)
                    ctx.rec.update(rows=rows, images_per_second=rows[-1]["images_per_s"],
                                   compiles=rows[-1].get("compiles"))
            if proc.poll() is not None:
                raise RuntimeError(f"train.py exited with {proc.returncode}:\n" + "\n".join(tail(log, 12)))
            proc.terminate()
            proc.wait()
    finally:
        shutil.rmtree(os.path.join(ctx.work, "encoders"), ignore_errors=True)   # 5 GB of Gemma-2 on CUDA


# ----- Part 4: sampling at 1024 px -------------------------------------------------------------------------

def part_sample_1024(ctx):
    size, device, s = ctx.size, ctx.device, ctx.size["sample"]
    cfg = dit_config(size)
    # The released file layout (sample.find_parts' _find_released_parts): a decoder .ckpt, a *stats*.pt and a
    # Gemma-2 folder. The DiT is handed over in memory (dit_model=): 10 GB less to write and read back.
    folder = os.path.join(ctx.work, "release")
    write_encoders(folder, size, device, gemma_layers=s["gemma_layers"], gemma_name="gemma-2-2b")
    decoder = ae_lib.Decoder(z_channels=cfg["in_channels"], **s["decoder"])
    torch.save({"state_dict": {f"decoder.{k}": v for k, v in decoder.state_dict().items()}},
               os.path.join(folder, "svg_autoencoder_P_stage3.ckpt"))
    with torch.device(device):
        dit = reference.randomize_(dit_lib.NextDiT(**cfg), seed=0).eval()  # default init predicts exactly 0

    def image(dtype, steps):
        pipe = sample.load_pipeline(folder, device=device, dit_model=copy.deepcopy(dit), dtype=dtype)
        pipe.generate([PROMPT], size=(s["res"], s["res"]), steps=2, cfg=s["cfg"], shift=s["shift"], solver="dpm",
                      progress=False)                               # warm-up: kernels, cuDNN algorithm choice
        sync(device)
        start = time.perf_counter()
        img = pipe.generate([PROMPT], seed=0, size=(s["res"], s["res"]), steps=steps, cfg=s["cfg"], shift=s["shift"],
                            solver="dpm", progress=False)[0]
        sync(device)
        return np.asarray(img, dtype=np.float64), time.perf_counter() - start
    low, seconds = image(torch.bfloat16, s["steps"])
    ctx.rec.update(resolution=s["res"], steps=s["steps"], cfg=s["cfg"], shift=s["shift"], solver="dpm",
                   dtype="bfloat16",
                   seconds_per_image=seconds)
    # The float32 reference lets matmuls use TF32 (10 mantissa bits to bf16's 7; ~7x the speed of true fp32
    # on an H200): precise enough to measure what bf16 costs, in seconds instead of a minute.
    torch.backends.cuda.matmul.allow_tf32 = True
    high, seconds_fp32 = image(torch.float32, s["steps"])
    ctx.rec.update(float32_seconds_per_image=seconds_fp32,
                   relative_difference=float(np.linalg.norm(low - high) / max(np.linalg.norm(high), 1e-12)),
                   mean_abs_pixel_difference=float(np.abs(low - high).mean()))


# ----- Part 4b: what batching buys in sampling -------------------------------------------------------------

def part_sample_batch(ctx):
    """sample.py's pipeline at 1024 px, 4 prompts generated one at a time and then as one batch of 4
    (--batch-size 1 vs 4): images/s of each and their ratio, and how far the batched images are from the
    one-at-a-time ones (float precision, not bit-exact: other kernels for other shapes)."""
    size, device, s = ctx.size, ctx.device, ctx.size["sample"]
    steps = 10 if size is FULL else 2             # the ratio, not the absolute time, is the figure here
    cfg = dit_config(size)
    folder = os.path.join(ctx.work, "release_batch")
    write_encoders(folder, size, device, gemma_layers=s["gemma_layers"], gemma_name="gemma-2-2b")
    decoder = ae_lib.Decoder(z_channels=cfg["in_channels"], **s["decoder"])
    torch.save({"state_dict": {f"decoder.{k}": v for k, v in decoder.state_dict().items()}},
               os.path.join(folder, "svg_autoencoder_P_stage3.ckpt"))
    with torch.device(device):
        dit = reference.randomize_(dit_lib.NextDiT(**cfg), seed=0).eval()
    pipe = sample.load_pipeline(folder, device=device, dit_model=dit, dtype=size["dtype"])
    prompts = [PROMPT, "a red circle", "a blue square in the top right and an orange triangle", "a green triangle"]
    options = dict(size=(s["res"], s["res"]), steps=steps, cfg=s["cfg"], shift=s["shift"], solver="dpm",
                   progress=False)
    pipe.generate(prompts[:1], **dict(options, steps=2))                           # warm-up
    ctx.rec.update(resolution=s["res"], steps=steps, images=len(prompts), dtype=str(size["dtype"]))
    results = {}
    for batch in (1, 4):
        sync(device)
        start = time.perf_counter()
        images = []
        for k in range(0, len(prompts), batch):
            images += pipe.generate(prompts[k:k + batch], seeds=list(range(k, k + batch)), **options)
        sync(device)
        seconds = time.perf_counter() - start
        results[batch] = [np.asarray(img, dtype=np.int64) for img in images]
        ctx.rec.update(**{f"batch_{batch}": dict(seconds=seconds, images_per_second=len(prompts) / seconds)})
    ctx.rec.update(speedup_batch_4=ctx.rec["batch_1"]["seconds"] / ctx.rec["batch_4"]["seconds"],
                   max_pixel_difference=int(max(np.abs(a - b).max() for a, b in zip(results[1], results[4]))))


# ----- Part 5: against diffusers -------------------------------------------------------------------------

def part_diffusers(ctx):
    if importlib.util.find_spec("diffusers") is None:
        ctx.rec.update(status="skipped", reason="diffusers is not installed here")
        return
    size, device, spec = ctx.size, ctx.device, ctx.size["lumina"]
    cfg = dit_config(size)
    with torch.device(device):
        ours = reference.randomize_(dit_lib.NextDiT(**cfg), seed=0).train()
        theirs = reference.diffusers_nextdit(ours)
    B, n, lens = spec["batch"], spec["latent"], spec["cap_lens"]
    x1 = torch.randn(B, cfg["in_channels"], n, n, device=device)
    x0, t = torch.randn_like(x1), torch.rand(B, device=device)
    x = flow.interpolate(x0, x1, t)
    feats = torch.randn(B, max(lens), cfg["cap_feat_dim"], device=device)
    mask = torch.arange(max(lens), device=device)[None] < torch.tensor(lens, device=device)[:, None]
    forwards = {"ours": lambda: ours(x, t, feats, mask),
                "diffusers": lambda: theirs(hidden_states=x, timestep=t, encoder_hidden_states=feats,
                                            encoder_attention_mask=mask, return_dict=False)[0]}
    with torch.no_grad(), autocast(device):
        a, b = forwards["ours"]().double(), forwards["diffusers"]().double()
    rel_err = ((a - b).abs().max() / b.abs().max()).item()

    def forward_backward(name):
        module = ours if name == "ours" else theirs
        module.zero_grad(set_to_none=True)
        with autocast(device):
            v = forwards[name]()
        flow.training_loss(v.float(), x0, x1).mean().backward()
    seconds = {name: timed(lambda: forward_backward(name), device, runs=size["runs"]) for name in forwards}
    ctx.rec.update(batch=B, image_tokens=n * n, caption_tokens=lens, rel_err=rel_err, seconds=seconds,
                   ratio=seconds["ours"] / seconds["diffusers"])


# ----- Part 6: a LoRA fine-tuning step of the 2B model at 1024 px -------------------------------------------------

def part_lora_1024(ctx, rank=8, steps=3):
    """train.py --lora's step at the stage-3/4 size (1024 px = 4,096 image tokens, batch 1, 128 caption tokens)
    with --grad-checkpointing: the base frozen in bf16 with the EMA sharing it (machinery.attach_adapters), rank-8
    adapters on the default targets in fp32, AdamW over them alone, bf16 autocast. Peak memory is
    torch.cuda.max_memory_allocated over the steps (the goal: <= 24 GB), against the README's formula."""
    size, device = ctx.size, ctx.device
    cfg = dit_config(size)
    spec = dict(size["step_1024"], batch=1)
    with torch.device(device):                       # random weights: a step costs the same whatever they are
        model = dit_lib.NextDiT(**cfg).train()
    ema = machinery.lora_ema_shell(cfg)                  # as train.py: the EMA shares the base, held once
    model.set_grad_checkpointing(True)
    args = argparse.Namespace(lora=rank, lora_alpha=None, lora_targets=None, seed=0, stage=4)
    machinery.attach_adapters(model, ema, args, 0, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=train.BETAS, eps=train.ADAM_EPS, weight_decay=0.0)
    latent = spec["res"] // size["encoder_patch"]
    B, L = spec["batch"], spec["cap_len"]
    x1 = torch.randn(B, cfg["in_channels"], latent, latent, device=device)
    x0, t = torch.randn_like(x1), torch.rand(B, device=device)
    feats = torch.randn(B, L, cfg["cap_feat_dim"], device=device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    ctx.rec.update(config=size["dit"], resolution=spec["res"], batch=B, caption_tokens=L, rank=rank,
                   grad_checkpointing=True, trainable_parameters=sum(p.numel() for p in params),
                   frozen_base_gib=frozen / 2 ** 30, base_dtype=str(next(
                       p for p in model.parameters() if not p.requires_grad).dtype).replace("torch.", ""),
                   resident_before_steps_gib=resident / 2 ** 30 if device.type == "cuda" else None)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            v = model(flow.interpolate(x0, x1, t), t, feats, mask)
        flow.training_loss(v.float(), x0, x1).mean().backward()
        machinery.clip_gradients(model, train.GRAD_CLIP)
        opt.step()
        train.update_ema(ema, model, 0.9999, 1)
    seconds = timed(step, device, runs=steps, warmup=1)
    shared = all(ema.get_parameter(name) is p for name, p in model.named_parameters() if not p.requires_grad)
    ctx.rec.update(seconds_per_step=seconds, base_shared_with_ema=shared,
                   peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
                   goal_gib=24)


# ----- Orchestration: each part in its own process, with a time limit -----------------------------------------

PARTS = {  # name: (function, seconds allowed on the GPU machine)
    "cli": (part_cli, 85),
    "step_256": (part_step_256, 35),
    "train_loop": (part_train_loop, 100),
    "step_1024": (part_step_1024, 40),
    "sample_1024": (part_sample_1024, 40),
    "sample_batch": (part_sample_batch, 60),
    "diffusers": (part_diffusers, 25),
    "lora_1024": (part_lora_1024, 60),
}


def run_part_here(args):
    """The child side: one part, its figures in --part-out as they come."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.part != "sample_1024"   # as train.py; sampling: see there
    rec = Record(args.part_out)
    ctx = argparse.Namespace(device=device, size=TINY if args.tiny else FULL, compile=args.compile, work=args.work,
                             rec=rec)
    torch.manual_seed(0)
    PARTS[args.part][0](ctx)


def stop(proc):
    """SIGTERM to the part's whole process group (torchrun passes it on to its workers), SIGKILL if need be."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(name, work, tiny, compile_on, timeout, report):
    """One part in a child process with a time limit; report(result) every few seconds while it runs (status
    "running", with the figures so far), so even a kill of this script leaves them in the JSON."""
    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    result_path, log = os.path.join(folder, "result.json"), os.path.join(folder, "log.txt")
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--work", folder, "--part-out", result_path,
           "--compile" if compile_on else "--no-compile", *(["--tiny"] if tiny else [])]
    # On a CPU, one thread per process: the tiny sizes gain nothing from more, and OpenMP threads spinning
    # on cores shared with other processes can slow a step a hundredfold.
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if tiny and not torch.cuda.is_available() else {}))
    start = time.time()

    def result(status):
        figures = {}
        if os.path.exists(result_path):
            with open(result_path) as f:
                figures = json.load(f)
        status = figures.pop("status", "ok") if status == "ok" else status   # a part may say "skipped"
        return dict(status=status, wall_seconds=round(time.time() - start, 1), **figures, log=log)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        while proc.poll() is None and time.time() < start + timeout:
            try:
                proc.wait(min(2.0, max(0.0, start + timeout - time.time())))
            except subprocess.TimeoutExpired:
                report(result("running"))
        if proc.poll() is None:
            stop(proc)
            done = result("timeout")
            done["error"] = [f"stopped at its limit of {timeout:.0f} s (--timeout-scale gives more)", *tail(log)]
        elif proc.returncode:
            done = dict(result("failed"), error=tail(log))
        else:
            done = result("ok")
    report(done)
    return done


def derive(parts):
    """Figures that need two parts: train.py's images/s against the model-only step's, same compile mode."""
    loop, step = parts.get("train_loop", {}), parts.get("step_256", {})
    mode = "compiled" if loop.get("compiled") else "eager"
    if loop.get("images_per_second") and step.get(mode):
        model_only = step[mode]["images_per_second"]
        loop["vs_model_only"] = dict(mode=mode, model_only_images_per_second=model_only,
                                     ratio=loop["images_per_second"] / model_only)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Parts: " + ", ".join(f"{n} ({s} s)" for n, (_, s) in PARTS.items()))
    p.add_argument("--out", default="benchmarks/results/gpu_check.json",
                   help="the JSON of results, rewritten after every part")
    p.add_argument("--parts", help="comma-separated parts to run (default: all, in the order listed below)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes even on CUDA (the default without CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="the compiled step rows and torch.compile in the train.py runs; --no-compile measures "
                        "eager only (default: on with CUDA, off on the CPU, where compiling costs minutes)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every part's time limit by this")
    p.add_argument("--work", help="scratch folder for run folders, weights, images and each part's log.txt "
                   "(default: a new temporary folder)")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)      # internal: run one part here
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.part:
        return run_part_here(args)
    names = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"gpu_check.py: --parts {','.join(unknown)}: no such part; choose from {', '.join(PARTS)}")
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    compile_on = cuda if args.compile is None else args.compile
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    results = dict(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
                   cuda=torch.version.cuda, size="tiny" if tiny else "full", compile=compile_on, work=work,
                   time_limits={n: max(1.0, PARTS[n][1] * args.timeout_scale) for n in names},
                   parts={n: dict(status="pending") for n in names})
    write_json(results, args.out)

    def report(name, result):
        results["parts"][name] = result
        derive(results["parts"])
        write_json(results, args.out)
    for name in names:
        run_part(name, work, tiny, compile_on, results["time_limits"][name], lambda result: report(name, result))
        print(f"{name:12s} {results['parts'][name]['status']:8s} {results['parts'][name]['wall_seconds']:6.1f} s",
              flush=True)
    print(f"wrote {args.out} (logs under {work})")
    return results


if __name__ == "__main__":
    main()
