"""Speed of our models against the reference implementations, as ratios measured side by side.

    python benchmarks/bench_speed.py [--quick] [--out benchmarks/results/speed.json] [--threads N]

What it measures: how fast each of our models runs against the implementation it is tested against, every
figure in one process, on the same inputs and the same weights, after warm-up, as the median of several
interleaved runs (A, B, A, B, ... so that drift in the machine's speed hits both sides alike), with the thread
count pinned:

  * Next-DiT training step (forward + backward + AdamW, float32) against diffusers'
    `Lumina2Transformer2DModel` of the same configuration, a small and a mid size; ours eager and under
    `torch.compile`, the reference eager. Plus the step's achieved FLOP/s against this CPU's measured
    float32 matmul rate, and its peak memory against the reference's (each in a fresh subprocess).
  * Sampling one prompt: 20 DPM-Solver++ steps with classifier-free guidance through the same `flow.sample`
    loop, once with our model the way sample.py drives it (caption path once; noise refiner once per step;
    cond and uncond as two unpadded passes) and once with diffusers' transformer on [cond ; uncond], which
    recomputes everything at every step.
  * DINOv3 ViT-S+/16 encode (batch 4 at 256 px) against transformers' `DINOv3ViTModel`.
  * Gemma-2 at the 2B width (a few layers) against transformers' `Gemma2Model` read the official way
    (`hidden_states[-2]` of the full stack), and per computed layer.
  * torch.compile graph breaks in the Next-DiT forward (torch._dynamo.explain), ours and the reference.
  * train.py's own step on the demo preset with the frozen encoders and with --cache-features (ours vs ours).

Before timing anything, each pair is checked to compute the same numbers. Ratios below 1 mean ours is
faster. Test-time dependencies (diffusers, transformers) are needed here, never at runtime.
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import dino       # noqa: E402  (after the path set-up above)
import flow       # noqa: E402
import model as dit_lib  # noqa: E402
import reference  # noqa: E402
import sample     # noqa: E402
import text       # noqa: E402

# ----- Configurations ------------------------------------------------------------------------------------------
# Next-DiT sizes from the issue: 256 image tokens (a 16 x 16 DINOv3 latent of a 256 px image, 384 channels),
# 32-64 caption tokens of Gemma-2 width (2304), batch 4-8. head_dim 64 = 16 (caption axis) + 24 + 24.
_DIT_COMMON = dict(patch_size=1, in_channels=384, n_refiner_layers=2, multiple_of=256, ffn_dim_multiplier=None,
                   norm_eps=1e-5, qk_norm=True, cap_feat_dim=2304, axes_dims=[16, 24, 24], axes_lens=[600, 512, 512])
DIT_SIZES = {
    "small": dict(model=dict(_DIT_COMMON, dim=256, n_layers=6, n_heads=4, n_kv_heads=2), batch=8, latent=16,
                  cap_lens=[48, 41, 33, 27, 48, 40, 36, 30]),
    "mid": dict(model=dict(_DIT_COMMON, dim=512, n_layers=8, n_heads=8, n_kv_heads=4), batch=4, latent=16,
                cap_lens=[64, 57, 45, 38]),
    # --quick: everything runs, at a size that takes seconds.
    "tiny": dict(model=dict(_DIT_COMMON, in_channels=32, cap_feat_dim=64, dim=128, n_layers=2, n_refiner_layers=1,
                            n_heads=2, n_kv_heads=1), batch=2, latent=8, cap_lens=[16, 9]),
}
SAMPLE_STEPS, SAMPLE_CFG = 20, 4.0            # 20 DPM-Solver++ steps, the official guidance scale
SAMPLE_PROMPT_LEN = 40                         # cond caption tokens; the empty prompt is 1 token (<bos>)
DINO_BATCH, DINO_SIZE = 4, 256
GEMMA_LAYERS = 4                               # the full stack the reference runs; ours builds 3 (hidden_states[-2])
GEMMA_VOCAB = 4096                             # embedding lookup cost does not depend on it; 256k would need 2.4 GB
GEMMA_LENGTHS = [64, 50, 37, 12]               # a right-padded batch of 4 prompts


# ----- Timing --------------------------------------------------------------------------------------------------

def interleaved_medians(fns, runs, warmup):
    """{name: fn} -> {name: median seconds}. Every fn runs `warmup` times, then they take turns `runs` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rel_err(a, b):
    """max |a - b| / max |b| (the tests' measure)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----- Machine ----------------------------------------------------------------------------------------------------

def machine_info(threads):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers
    import transformers
    return dict(cpu=cpu, cores=os.cpu_count(), threads=threads, torch=torch.__version__,
                diffusers=diffusers.__version__, transformers=transformers.__version__, python=platform.python_version())


def matmul_rate(n, runs):
    """Measured float32 matmul rate of this CPU (FLOP/s) on [n, n] @ [n, n], the ceiling for dense layers."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = interleaved_medians({"mm": lambda: torch.mm(a, b)}, runs, warmup=2)["mm"]
    return 2 * n ** 3 / seconds


# ----- Next-DiT inputs and the two models -------------------------------------------------------------------------

def dit_inputs(size, seed=0):
    """A training batch: noisy latents x_t, times t, caption features and right-padded masks, the target."""
    spec = DIT_SIZES[size]
    cfg, B, n = spec["model"], spec["batch"], spec["latent"]
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, cfg["in_channels"], n, n, generator=gen)
    x0 = torch.randn(B, cfg["in_channels"], n, n, generator=gen)
    t = torch.rand(B, generator=gen)
    L = max(spec["cap_lens"])
    feats = torch.randn(B, L, cfg["cap_feat_dim"], generator=gen)
    mask = torch.arange(L)[None] < torch.tensor(spec["cap_lens"])[:, None]
    return dict(x=flow.interpolate(x0, x1, t), t=t, feats=feats, mask=mask, x0=x0, x1=x1)


def dit_pair(size, seed=0):
    """Our NextDiT (random weights) and diffusers' transformer with the same weights, both in train mode."""
    torch.manual_seed(seed)
    ours = reference.randomize_(dit_lib.NextDiT(**DIT_SIZES[size]["model"]), seed).train()
    return ours, reference.diffusers_nextdit(ours).train()


def ours_forward(model):
    return lambda b: model(b["x"], b["t"], b["feats"], b["mask"])


def diffusers_forward(ref):
    return lambda b: ref(hidden_states=b["x"], timestep=b["t"], encoder_hidden_states=b["feats"],
                         encoder_attention_mask=b["mask"], return_dict=False)[0]


def train_step_fn(forward, params, batch):
    """One training step: forward, flow-matching loss, backward, AdamW (train.py's hyper-parameters)."""
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = flow.training_loss(forward(batch), batch["x0"], batch["x1"]).mean()
        loss.backward()
        opt.step()
    return step


def dit_flops(model, batch):
    """FLOPs of one forward + backward: matmuls counted by FlopCounterMode, attention added by formula
    (the counter does not see the CPU flash-attention kernel): 4·B·H·S²·hd forward, twice that backward."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        flow.training_loss(ours_forward(model)(batch), batch["x0"], batch["x1"]).mean().backward()
    model.zero_grad(set_to_none=True)
    cfg, B = model.config, batch["x"].shape[0]
    L, N = batch["mask"].shape[1], batch["x"].shape[-2] * batch["x"].shape[-1] // cfg["patch_size"] ** 2
    hd = cfg["dim"] // cfg["n_heads"]
    seq_per_block = [L] * cfg["n_refiner_layers"] + [N] * cfg["n_refiner_layers"] + [L + N] * cfg["n_layers"]
    attention = sum(3 * 4 * B * cfg["n_heads"] * S * S * hd for S in seq_per_block)
    return counter.get_total_flops() + attention


def graph_breaks(fn, *args, **kwargs):
    """(graphs, breaks, first reasons) of torch._dynamo.explain on one call."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = sorted({r.reason.split("\n")[0][:120] for r in explained.break_reasons})
    return explained.graph_count, explained.graph_break_count, reasons[:3]


# ----- Next-DiT training step ------------------------------------------------------------------------------------

def bench_dit_training(size, runs, compile_ours, matmul_flops):
    ours, ref = dit_pair(size)
    batch = dit_inputs(size)
    with torch.no_grad():
        err = rel_err(ours_forward(ours)(batch), diffusers_forward(ref)(batch))
    steps = {"ours": train_step_fn(ours_forward(ours), list(ours.parameters()), batch),
             "diffusers": train_step_fn(diffusers_forward(ref), list(ref.parameters()), batch)}
    result = dict(size=size, config=DIT_SIZES[size]["model"], batch=batch["x"].shape[0],
                  caption_tokens=batch["mask"].shape[1], image_tokens=batch["x"].shape[-1] ** 2, rel_err=err)
    if compile_ours:
        # A second copy of our weights, so the compiled model has its own optimizer state.
        compiled_model = dit_lib.NextDiT(**ours.config).train()
        compiled_model.load_state_dict(ours.state_dict())
        torch._dynamo.reset()
        compiled = torch.compile(compiled_model)
        steps["ours_compiled"] = train_step_fn(ours_forward(compiled), list(compiled_model.parameters()), batch)
        start = time.perf_counter()
        steps["ours_compiled"]()                       # compiles forward and backward
        result["compile_seconds"] = time.perf_counter() - start
    medians = interleaved_medians(steps, runs, warmup=2)
    flops = dit_flops(ours, batch)
    result.update(seconds=medians, flops_per_step=flops,
                  achieved_flops={k: flops / s for k, s in medians.items()},
                  fraction_of_matmul_rate={k: flops / s / matmul_flops for k, s in medians.items()})
    return result


# ----- Peak memory of a training step (each implementation in a fresh process) ---------------------------------

def _rss_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_probe(impl, size, threads):
    """Child process: peak resident memory of one training step above the memory held between steps.

    One step runs first (so weights, inputs and AdamW state exist); freed memory is handed back to the OS
    (malloc_trim), the kernel's high-water mark is reset (/proc/self/clear_refs, "5"), and a second step's
    peak (VmHWM) minus the resident size before it (VmRSS) is the step's transient memory: activations
    saved for backward, gradients and workspace."""
    torch.set_num_threads(threads)
    ours, ref = dit_pair(size)
    batch = dit_inputs(size)
    model, forward = (ours, ours_forward(ours)) if impl == "ours" else (ref, diffusers_forward(ref))
    del ours, ref
    step = train_step_fn(forward, list(model.parameters()), batch)
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes("VmRSS")
    step()
    print(json.dumps(dict(peak_step_bytes=_rss_bytes("VmHWM") - before, resident_before=before)))


def bench_memory(size, threads):
    out = {}
    for impl in ("ours", "diffusers"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-probe", impl, "--size", size,
                               "--threads", str(threads)], capture_output=True, text=True, check=True)
        out[impl] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_step_bytes"]
    return dict(size=size, peak_step_bytes=out, ratio=out["ours"] / out["diffusers"])


# ----- Sampling ----------------------------------------------------------------------------------------------------

def bench_sampling(size, runs, steps):
    """One prompt, `steps` DPM-Solver++ steps, CFG: our pipeline pattern against diffusers recomputing all."""
    ours, ref = dit_pair(size)
    ours.eval(), ref.eval()
    cfg = ours.config
    gen = torch.Generator().manual_seed(1)
    L = SAMPLE_PROMPT_LEN
    feats = torch.randn(2, L, cfg["cap_feat_dim"], generator=gen)               # [cond ; uncond]
    mask = torch.arange(L)[None] < torch.tensor([L, 1])[:, None]                # uncond = <bos> alone
    n = DIT_SIZES[size]["latent"]
    noise = torch.randn(1, cfg["in_channels"], n, n, generator=gen)

    def run_ours():
        # sample.py's own code: caption path once, noise refiner once per step, a cond and an uncond pass
        velocity = sample.guided_velocity(ours, feats[:1], mask[:1], feats[1:], mask[1:], SAMPLE_CFG)
        return flow.sample(velocity, noise, steps, solver="dpm", shift=flow.DEFAULT_SHIFT)

    def run_reference():
        def velocity(x, t):
            v = ref(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), encoder_hidden_states=feats,
                    encoder_attention_mask=mask, return_dict=False)[0]
            v_cond, v_uncond = v.chunk(2)
            return flow.cfg_velocity(v_cond, v_uncond, SAMPLE_CFG)
        return flow.sample(velocity, noise, steps, solver="dpm", shift=flow.DEFAULT_SHIFT)

    with torch.no_grad():
        err = rel_err(run_ours(), run_reference())
        medians = interleaved_medians({"ours": run_ours, "diffusers": run_reference}, runs, warmup=1)
    return dict(size=size, steps=steps, cfg=SAMPLE_CFG, caption_tokens=L, rel_err=err, seconds=medians)


# ----- DINOv3 ------------------------------------------------------------------------------------------------------

def bench_dino(runs, quick):
    import tempfile
    config = dict(dino.DINOV3_CONFIGS["vits16plus"], **({"depth": 2} if quick else {}))
    hf = reference.randomize_(reference.hf_dinov3(config), seed=0)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = dino.load_dinov3(folder)                 # the public HF path, weights converted on load
    size = 64 if quick else DINO_SIZE
    x = torch.randn(DINO_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    n_prefix = 1 + config["n_storage_tokens"]
    fns = {"ours": lambda: ours.encode(x),
           "transformers": lambda: hf(pixel_values=x).last_hidden_state}
    with torch.no_grad():
        got = ours.forward_features(x)["x_norm_patchtokens"]
        err = rel_err(got, fns["transformers"]()[:, n_prefix:])
        medians = interleaved_medians(fns, runs, warmup=1)
    return dict(config="vits16plus" + (" (2 blocks)" if quick else ""), batch=DINO_BATCH, pixels=size,
                rel_err=err, seconds=medians)


# ----- Gemma-2 -------------------------------------------------------------------------------------------------------

def bench_gemma(runs, quick):
    base = dict(text.GEMMA2_CONFIGS["2b"], vocab_size=GEMMA_VOCAB, num_hidden_layers=GEMMA_LAYERS)
    if quick:
        base.update(hidden_size=256, intermediate_size=1024, head_dim=64, query_pre_attn_scalar=64)
    hf = reference.randomize_(reference.hf_gemma2(base), seed=0)
    # Ours as SVG-T2I uses it (stops at hidden_states[-2]: GEMMA_LAYERS - 1 layers), and one built a layer
    # deeper, which computes exactly as many layers as the reference: the per-layer comparison.
    official = text.Gemma2Encoder(**base).eval()
    official.load_state_dict(reference.gemma2_state_for_ours(hf, official))
    same_depth = text.Gemma2Encoder(**dict(base, num_hidden_layers=GEMMA_LAYERS + 1)).eval()
    hf_state = hf.state_dict()
    same_depth.load_state_dict({k: hf_state[k] for k in same_depth.state_dict()})

    gen = torch.Generator().manual_seed(0)
    L = max(GEMMA_LENGTHS) if not quick else 16
    lengths = [min(n, L) for n in GEMMA_LENGTHS]
    ids = torch.randint(4, GEMMA_VOCAB, (len(lengths), L), generator=gen)
    ids[:, 0] = text.BOS_ID
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, text.PAD_ID)
    fns = {"ours": lambda: official(ids, mask), "ours_same_depth": lambda: same_depth(ids, mask),
           "transformers": lambda: hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]}
    with torch.no_grad():
        real = mask.bool()
        err = rel_err(fns["ours"]()[real], fns["transformers"]()[real])
        medians = interleaved_medians(fns, runs, warmup=1)
    return dict(width=base["hidden_size"], reference_layers=GEMMA_LAYERS, ours_layers=GEMMA_LAYERS - 1,
                batch=len(lengths), tokens=L, rel_err=err, seconds=medians)


# ----- Feature cache -----------------------------------------------------------------------------------------------

def bench_feature_cache(runs, quick):
    """train.py's own DiT step on the demo preset (stage 1, batch 32 of 64-px shapes), with the frozen encoders
    run every step and with their outputs read from --cache-features. Seconds per optimizer step, the median
    over the logged windows after the first (warm-up); the runs alternate, each in a fresh run folder that
    shares one set of encoders. The cache is built in the first cached run, before its timed steps."""
    import shutil
    import tempfile

    import train
    preset, steps, every = ("tiny", 15, 5) if quick else ("demo", 40, 10)
    seconds = {"encoders": [], "cache": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "encoders_only")
        common = ["--preset", preset, "--stage", "1", "--max-steps", str(steps), "--data-limit", "512", "--workers",
                  "0", "--preview-every", "0", "--no-compile", "--ckpt-every", str(10 * steps)]
        train.main(["--out", base, *common, "--max-steps", "1"])          # makes the random frozen encoders
        for k in range(max(2, runs // 2)):
            for name in seconds:
                out = os.path.join(tmp, f"{name}{k}")
                os.makedirs(out)
                shutil.copy(os.path.join(base, "encoders.json"), out)
                shutil.copytree(os.path.join(base, "encoders"), os.path.join(out, "encoders"))
                extra = ["--cache-features", os.path.join(tmp, "cache")] if name == "cache" else []
                train.main(["--out", out, *common, *extra])
                with open(os.path.join(out, "log.jsonl")) as f:
                    rows = [json.loads(line) for line in f][1:]            # the first window warms up
                batch = train.PRESETS[preset]["global_batch"][0]
                seconds[name] += [batch / row["images_per_s"] for row in rows]
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    return dict(preset=preset, stage=1, resolution=train.PRESETS[preset]["dit_res"][0],
                batch=train.PRESETS[preset]["global_batch"][0], log_every=every, seconds=medians,
                speedup=medians["encoders"] / medians["cache"])


# ----- Report --------------------------------------------------------------------------------------------------------

def table_rows(results):
    """(what, ours s, reference s, ratio, target) rows for the printed table."""
    rows = []
    for r in results["dit_training"]:
        s = r["seconds"]
        rows.append((f"DiT train step {r['size']} eager", s["ours"], s["diffusers"], s["ours"] / s["diffusers"], 1.0))
        if "ours_compiled" in s:
            rows.append((f"DiT train step {r['size']} compiled", s["ours_compiled"], s["diffusers"],
                         s["ours_compiled"] / s["diffusers"], 0.8))
    s = results["sampling"]["seconds"]
    rows.append((f"sampling {results['sampling']['steps']} steps CFG", s["ours"], s["diffusers"],
                 s["ours"] / s["diffusers"], 0.95))
    s = results["dino"]["seconds"]
    rows.append(("DINOv3 ViT-S+/16 encode", s["ours"], s["transformers"], s["ours"] / s["transformers"], 1.0))
    s = results["gemma"]["seconds"]
    rows.append(("Gemma-2 hidden_states[-2]", s["ours"], s["transformers"], s["ours"] / s["transformers"], 1.0))
    rows.append(("Gemma-2 same layer count", s["ours_same_depth"], s["transformers"],
                 s["ours_same_depth"] / s["transformers"], 1.0))
    if "feature_cache" in results:                   # ours vs ours: the step with and without the encoders
        c = results["feature_cache"]
        rows.append((f"{c['preset']} step, cached features", c["seconds"]["cache"], c["seconds"]["encoders"],
                     c["seconds"]["cache"] / c["seconds"]["encoders"], 1.0))
    return rows


def print_report(results):
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
          f"diffusers {m['diffusers']}, transformers {m['transformers']}")
    print(f"float32 matmul rate: {results['matmul_gflops']:.1f} GFLOP/s\n")
    print(f"{'':38s} {'ours':>10s} {'reference':>10s} {'ratio':>7s} {'target':>7s}")
    for what, ours, ref, ratio, target in table_rows(results):
        flag = "ok" if ratio <= target else "MISS"
        print(f"{what:38s} {ours * 1e3:8.1f}ms {ref * 1e3:8.1f}ms {ratio:7.3f} {'<=' + str(target):>7s} {flag}")
    for r in results["dit_training"]:
        frac = r["fraction_of_matmul_rate"]
        print(f"DiT {r['size']}: {r['flops_per_step'] / 1e9:.1f} GFLOP/step; achieved / matmul rate: "
              + ", ".join(f"{k} {v:.2f}" for k, v in frac.items())
              + (f"; compile {r['compile_seconds']:.0f} s" if "compile_seconds" in r else "")
              + f"; rel err vs diffusers {r['rel_err']:.1e}")
    mem = results["memory"]
    print(f"peak step memory ({mem['size']}): ours {mem['peak_step_bytes']['ours'] / 2**20:.0f} MiB, diffusers "
          f"{mem['peak_step_bytes']['diffusers'] / 2**20:.0f} MiB, ratio {mem['ratio']:.3f}")
    print(f"sampling rel diff {results['sampling']['rel_err']:.1e}; DINOv3 rel err {results['dino']['rel_err']:.1e}; "
          f"Gemma-2 rel err {results['gemma']['rel_err']:.1e}")
    for name, (graphs, breaks, reasons) in results["graph_breaks"].items():
        print(f"graph breaks, {name} forward: {breaks} ({graphs} graphs)" + (f" e.g. {reasons[0]}" if reasons else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and one timed run each: a smoke run (~1 min)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "speed.json"))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (pinned for every run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (they take minutes)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (the median is reported)")
    p.add_argument("--memory-probe", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--size", default="mid", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.size, args.threads)

    start = time.time()
    runs = 1 if args.quick else args.runs
    sizes = ["tiny"] if args.quick else ["small", "mid"]
    results = dict(machine=machine_info(args.threads), command=" ".join(sys.argv), quick=args.quick)
    results["matmul_gflops"] = matmul_rate(1024 if args.quick else 2048, 3 if args.quick else 10) / 1e9
    print(f"matmul {results['matmul_gflops']:.1f} GFLOP/s", flush=True)

    ours, ref = dit_pair(sizes[-1])
    batch = dit_inputs(sizes[-1])
    results["graph_breaks"] = {
        "ours (batched tensor)": graph_breaks(ours, batch["x"], batch["t"], batch["feats"], batch["mask"]),
        "diffusers": graph_breaks(ref, hidden_states=batch["x"], timestep=batch["t"],
                                  encoder_hidden_states=batch["feats"], encoder_attention_mask=batch["mask"],
                                  return_dict=False)}
    del ours, ref
    results["dit_training"] = []
    for size in sizes:
        results["dit_training"].append(bench_dit_training(size, runs, not args.no_compile,
                                                          results["matmul_gflops"] * 1e9))
        print(f"DiT {size}: {results['dit_training'][-1]['seconds']}", flush=True)
    results["memory"] = bench_memory(sizes[-1], args.threads)
    results["sampling"] = bench_sampling(sizes[-1], max(1, runs - 2), 4 if args.quick else SAMPLE_STEPS)
    print(f"sampling: {results['sampling']['seconds']}", flush=True)
    results["dino"] = bench_dino(runs, args.quick)
    results["gemma"] = bench_gemma(runs, args.quick)
    results["feature_cache"] = bench_feature_cache(runs, args.quick)
    results["table"] = [dict(what=w, ours_s=o, reference_s=r, ratio=q, target=t) for w, o, r, q, t in table_rows(results)]
    results["wall_seconds"] = time.time() - start
    print_report(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten to {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
