"""Peak memory of a DiT training step: full fine-tuning against LoRA, each with and without --grad-checkpointing.

    python benchmarks/bench_memory.py                       # ~2 minutes on 2 CPU cores
    python benchmarks/bench_memory.py --dim 768 --layers 12 --tokens 1024 --batch 4 --out mem.json   # larger

What is measured: the training state as train.py holds it -- full: fp32 weights, gradients, AdamW's two moments
and an EMA copy (20 bytes per parameter); LoRA (machinery.attach_adapters): the frozen base once (the EMA shares it;
fp32 on a CPU, bf16 on CUDA), rank-r adapters with their gradients, moments and EMA -- plus the activations of
one forward + backward (and AdamW step). Each configuration runs in a fresh process, so one's freed memory
cannot hide another's peak. The figure is the peak resident set size (getrusage ru_maxrss) minus the resident
size just before the model is built (torch imported, nothing allocated): on a CPU, torch has no allocator
statistics, and RSS is what the machine must have. On CUDA the same script reports
torch.cuda.max_memory_allocated instead (benchmarks/gpu_check.py's `lora_1024` part measures the 2B at 1024 px).

The model is a NextDiT of the given width and depth (the 2B's shape of block: GQA 2:1, SwiGLU 4x, patch 1) on a
square latent of --tokens image tokens and a 64-token caption; random weights (memory does not depend on them).
"""
import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("full", "full+gc", "lora", "lora+gc")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(args):
    """The child: build, take two steps (AdamW allocates its moments in the first), print a JSON line."""
    sys.path.insert(0, ROOT)
    import copy

    import torch

    import flow
    import machinery
    import model as dit_lib
    import train
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = dict(patch_size=1, in_channels=64, dim=args.dim, n_layers=args.layers, n_refiner_layers=2,
               n_heads=args.dim // 64, n_kv_heads=args.dim // 128, multiple_of=256, ffn_dim_multiplier=None,
               norm_eps=1e-5, qk_norm=True, cap_feat_dim=64, axes_dims=[16, 24, 24], axes_lens=[600, 512, 512])
    with torch.device(device):
        model = dit_lib.NextDiT(**cfg).train()
    # as train.py: a full copy for full fine-tuning; for LoRA a storage-less shell that will share the base
    ema = machinery.lora_ema_shell(cfg) if args.config.startswith("lora") else copy.deepcopy(model).requires_grad_(False)
    model.set_grad_checkpointing(args.config.endswith("+gc"))
    model.norm_final.requires_grad_(False)
    if args.config.startswith("lora"):
        machinery.attach_adapters(model, ema, argparse.Namespace(lora=args.rank, lora_alpha=None, lora_targets=None,
                                                             seed=0, stage=4), 1, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=train.BETAS, eps=train.ADAM_EPS, weight_decay=0.0)
    side = int(args.tokens ** 0.5)
    x1 = torch.randn(args.batch, cfg["in_channels"], side, side, device=device)
    x0, t = torch.randn_like(x1), torch.rand(args.batch, device=device)
    feats = torch.randn(args.batch, 64, cfg["cap_feat_dim"], device=device)
    mask = torch.ones(args.batch, 64, dtype=torch.bool, device=device)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with autocast:
            v = model(flow.interpolate(x0, x1, t), t, feats, mask)
        flow.training_loss(v.float(), x0, x1).mean().backward()
        machinery.clip_gradients(model, train.GRAD_CLIP)
        opt.step()
        train.update_ema(ema, model, 0.999, step + 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps(dict(config=args.config, parameters=sum(p.numel() for p in model.parameters()),
                          trainable=sum(p.numel() for p in params), peak_bytes=peak,
                          cuda_peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="image tokens (a square latent grid)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)      # internal: one configuration
    args = p.parse_args(argv)
    if args.config:
        return one(args)
    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--config", config, *[
            a for k in ("dim", "layers", "tokens", "batch", "rank") for a in (f"--{k}", str(getattr(args, k)))]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{config:8s} peak {rows[-1]['peak_bytes'] / 2 ** 20:8.0f} MiB   parameters {rows[-1]['parameters']:,}"
              f"   trainable {rows[-1]['trainable']:,}", flush=True)
    full = rows[0]["peak_bytes"]
    for row in rows:
        print(f"{row['config']:8s} {row['peak_bytes'] / full:.2f} x full fine-tuning")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(settings={k: getattr(args, k) for k in ("dim", "layers", "tokens", "batch", "rank")},
                           rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
