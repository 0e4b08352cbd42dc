"""The released-size figures that need a GPU: one short script, run as is on a CUDA machine.

    python benchmarks/gpu_bench.py [--out benchmarks/results/gpu.json]

  1. The accelerator's measured bf16 matmul rate (8192³ matmuls): the ceiling the step is compared with.
  2. A stage-1 training step of the 2B Next-DiT at 256 px: batch 8 of 16x16 DINOv3 latents (256 image tokens)
     and 128-token captions, bf16 autocast with fp32 master weights and fused AdamW, as train.py runs it;
     eager and torch.compile. Reported: seconds per step, tokens per second, peak memory, and model FLOPs
     utilisation = (6 · params · tokens + attention) / step time / measured bf16 rate.
  3. Sampling one 1024x1024 image: 50 DPM-Solver++ steps with guidance (the official settings), caption path
     computed once (sample.py's way), then the Autoencoder-P decoder; seconds per image.

Weights are random (a step costs the same whatever the weights); nothing is downloaded. On a machine without
CUDA the script refuses unless --dit / --res name a small configuration (the test suite runs it that way to
keep it working); the README's performance section gives the formula for the figures it leaves open.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import autoencoder as ae_lib  # noqa: E402
import flow  # noqa: E402
import model as dit_lib  # noqa: E402


def timed(fn, device, runs, warmup=2):
    """Median seconds of fn() over `runs` calls after `warmup`, synchronising the device around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_rate(device, dtype, n):
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


def bench_training(args, device, peak_rate):
    cfg = dict(dit_lib.NEXTDIT_CONFIGS[args.dit])
    latent = args.res // args.encoder_patch                                  # 256 px / 16 -> 16x16
    image_tokens = (latent // cfg["patch_size"]) ** 2
    model = dit_lib.NextDiT(**cfg).to(device).train()
    model.norm_final.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.95),
                            eps=1e-15, weight_decay=0.0, fused=device.type == "cuda")
    B, L = args.batch, args.cap_len
    x1 = torch.randn(B, cfg["in_channels"], latent, latent, device=device)
    x0, t = torch.randn_like(x1), torch.rand(B, device=device)
    feats = torch.randn(B, L, cfg["cap_feat_dim"], device=device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bfloat16")
    result = dict(config=args.dit, params=params, resolution=args.res, batch=B, image_tokens=image_tokens,
                  caption_tokens=L)
    for name, forward in (("eager", model), ("compiled", torch.compile(model) if args.compile else None)):
        if forward is None:
            continue

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                v = forward(flow.interpolate(x0, x1, t), t, feats, mask)
            flow.training_loss(v.float(), x0, x1).mean().backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()                                                             # compiles, if compiling
        first = time.perf_counter() - start
        seconds = timed(step, device, runs=args.runs)
        flops = step_flops(cfg, B, image_tokens, L, params)
        result[name] = dict(seconds_per_step=seconds, first_step_seconds=first,
                            tokens_per_second=B * (image_tokens + L) / seconds,
                            images_per_second=B / seconds, model_flops_per_step=flops,
                            mfu=flops / seconds / peak_rate,
                            peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None)
        print(f"train {name:8s}: {seconds:.3f} s/step, {result[name]['tokens_per_second']:,.0f} tokens/s, "
              f"MFU {result[name]['mfu']:.1%}", flush=True)
    del model, opt
    return result


@torch.no_grad()
def bench_sampling(args, device):
    cfg = dict(dit_lib.NEXTDIT_CONFIGS[args.dit])
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = dit_lib.NextDiT(**cfg).to(device, dtype).eval()
    decoder = ae_lib.Decoder(z_channels=cfg["in_channels"], **args.decoder).to(device, dtype).eval()
    latent = args.sample_res // decoder.upsample_factor                      # 1024 px -> 64x64
    feats = torch.randn(2, args.cap_len, cfg["cap_feat_dim"], device=device, dtype=dtype)
    mask = torch.ones(2, args.cap_len, dtype=torch.bool, device=device)
    mask[1, 1:] = False                                                      # the empty prompt: [BOS] only

    def one_image():
        cap_tokens = model.refine_captions(feats, mask)

        def velocity(x, t):
            v = model(torch.cat([x, x]), torch.cat([t, t]).to(dtype), feats, mask, cap_tokens=cap_tokens)
            return flow.cfg_velocity(*v.float().chunk(2), 4.0, renorm=True)
        noise = torch.randn(1, cfg["in_channels"], latent, latent, device=device, dtype=dtype)
        z = flow.sample(lambda x, t: velocity(x.to(dtype), t), noise, args.sample_steps, solver="dpm", shift=10.0)
        return decoder(z.to(dtype))
    seconds = timed(one_image, device, runs=args.sample_runs, warmup=1)
    print(f"sample {args.sample_res}px, {args.sample_steps} steps + CFG + decode: {seconds:.2f} s/image", flush=True)
    return dict(resolution=args.sample_res, steps=args.sample_steps, cfg=4.0, seconds_per_image=seconds,
                image_tokens=(latent // cfg["patch_size"]) ** 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dit", default="2B", choices=sorted(dit_lib.NEXTDIT_CONFIGS), help="Next-DiT configuration")
    p.add_argument("--res", type=int, default=256, help="training resolution in pixels (stage 1: 256)")
    p.add_argument("--encoder-patch", type=int, default=16, help="pixels per latent cell (DINOv3: 16)")
    p.add_argument("--batch", type=int, default=8, help="training micro-batch")
    p.add_argument("--cap-len", type=int, default=128, help="caption tokens (system prompt included)")
    p.add_argument("--runs", type=int, default=10, help="timed training steps (median)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile row")
    p.add_argument("--sample-res", type=int, default=1024, help="sampling resolution in pixels")
    p.add_argument("--sample-steps", type=int, default=50, help="DPM-Solver++ steps")
    p.add_argument("--sample-runs", type=int, default=3, help="timed images (median)")
    p.add_argument("--decoder", type=json.loads, default=json.dumps(ae_lib.DECODER_CONFIG),
                   help="decoder config as JSON (default: the released Autoencoder-P)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    p.add_argument("--matmul-size", type=int, default=8192, help="side of the matmul that measures the peak rate")
    p.add_argument("--out", default="benchmarks/results/gpu.json", help="where to write the JSON")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and args.dit in ("2B", "0.8B"):
        raise SystemExit("gpu_bench.py: no CUDA device here. The released sizes need one; pass --dit tiny "
                         "--res 64 --sample-res 64 --dtype float32 to check the script itself on a CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    peak = matmul_rate(device, dtype, args.matmul_size)
    print(f"{device}: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"measured {args.dtype} matmul {peak / 1e12:.1f} TFLOP/s", flush=True)
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                   dtype=args.dtype, matmul_flops=peak, training=bench_training(args, device, peak),
                   sampling=bench_sampling(args, device))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
