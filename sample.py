"""sample.py -- text to image: prompt(s) in, PNG files out (the official KlingTeam/SVG-T2I `svg_t2i/sample_svg_t2i.py`).

    prompt --Gemma-2--> features [n, L, 2304]                  once per batch, and once for the empty prompt
           --caption embedder + context refiner--> caption tokens           once, reused by every step
    noise x0 [n, C, H/p, W/p] --ODE solver, guided velocity at each step--> x1 (t = 0 noise -> t = 1 data)
    x1 --denormalise (latent statistics)--> DINOv3 features --pixel decoder--> image in [-1, 1] --> PNG

    python sample.py --prompt "a red circle in the top left"                   # the shipped demo model
    python sample.py --prompts prompts.txt --ckpt runs/mine --n 4               # 4 images and a grid per prompt
    python sample.py --prompt "a red circle in the top left" --trajectory       # also the guess of x1 at each step
    torchrun --nproc_per_node=8 sample.py --geneval evaluation_metadata.jsonl --ckpt release/ --out geneval/

`--ckpt` takes a training run folder (its highest finished stage's EMA weights) or a folder of the released files
(README "Using the released weights"). Two fixes relative to the official sampler: the seed is honoured (its
`manual_seed` call is commented out), and noise is laid out H first (it draws [W/16, H/16], so non-square sizes came
out transposed). The paper's two benchmarks are external scorers; `--geneval` and `--dpg` write the folders they
read: GenEval (Ghosh et al. 2023, arXiv 2310.11513) checks objects, counts, colours and positions of short prompts
with an object detector, DPG-Bench (from ELLA, Hu et al. 2024, arXiv 2403.05135) asks a VQA model about ~1,000
dense, many-object prompts.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import re
import sys
import types
from contextlib import contextmanager

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from tqdm import tqdm

import autoencoder as ae_lib
import dino
import flow
import machinery
import model as dit_lib
import text

DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")


class Pipeline:
    """Frozen text encoder + trained Next-DiT + latent statistics + pixel decoder (load_pipeline builds one)."""

    def __init__(self, dit, autoencoder, stats, gemma, tokenizer, defaults, max_cap_len, source, compile=False):
        self.dit, self.autoencoder, self.stats = dit, autoencoder, stats
        self.gemma, self.tokenizer = gemma, tokenizer
        self.defaults, self.max_cap_len, self.source = defaults, max_cap_len, source
        self.device = next(dit.parameters()).device
        # a latent cell is the encoder's patch of pixels and a DiT token patch_size² cells: sizes are multiples
        self.pixels_per_latent = autoencoder.decoder.upsample_factor
        self.latent_patch = self.pixels_per_latent * dit.config["patch_size"]
        # compile: the two DiT passes of every step (the caption path runs once per batch and stays eager)
        self.dit_passes = (torch.compile(dit.refine_image), torch.compile(dit)) if compile else (dit.refine_image, dit)

    def settings(self, size=None, steps=None, cfg=None, solver=None, shift=None):
        """Each argument, or this model's default where it is None, checked before the first sampling step
        -> (width, height, steps, cfg, solver, shift); size and (width, height) are in pixels."""
        d = self.defaults       # {} for a run with no finished stage yet: the official steps, cfg, solver; no shift
        steps = d.get("steps", flow.DEFAULT_STEPS) if steps is None else steps
        cfg = d.get("cfg", flow.DEFAULT_CFG) if cfg is None else cfg
        solver, shift = solver or d.get("solver", flow.DEFAULT_SOLVER), d.get("shift", 1.0) if shift is None else shift
        width, height = size or (d.get("size", 256),) * 2
        check_settings(self, width, height, steps, cfg, solver, shift)
        return width, height, steps, cfg, solver, shift

    @torch.no_grad()
    def generate(self, prompts, seed=0, size=None, steps=None, cfg=None, solver=None, shift=None,
                 renorm=flow.DEFAULT_RENORM, system="base", progress=True, seeds=None, cfg_trunc=None,
                 trajectory=False):
        """One image per prompt; image i uses noise seeded by `seeds[i]` (default `seed + i`), so a prompt
        generated alone or among others gives the same picture to float precision (padding is masked). None
        picks the model's default (see settings); renorm and cfg_trunc: see guided_velocity. trajectory=True:
        each image also gets `img.trajectory`, a strip of the model's guess of x1 at every step (predicting_x1).
        Returns PIL images, their settings as JSON in img.info["svg_t2i"]."""
        width, height, steps, cfg, solver, shift = self.settings(size, steps, cfg, solver, shift)
        n = len(prompts)
        seeds = [seed + i for i in range(n)] if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"generate: {len(seeds)} seeds for {n} prompts")

        # Text: each distinct prompt and the empty prompt in one Gemma call (n images of one prompt run Gemma once)
        distinct = list(dict.fromkeys(prompts))
        texts = [text.format_prompt(p, system) for p in distinct] + [""]
        feats, mask = text.encode_prompts(self.gemma, self.tokenizer, texts, self.max_cap_len)
        feats = feats.float()                                                       # [distinct + 1, L, D]
        rows = torch.tensor([distinct.index(p) for p in prompts], device=feats.device)
        velocity = guided_velocity(self.dit, feats[rows], mask[rows], feats[-1:].expand(n, -1, -1),
                                   mask[-1:].expand(n, -1), cfg, renorm=renorm, passes=self.dit_passes,
                                   cfg_trunc=cfg_trunc)
        guesses = []                                                  # [(noise level, x1 guess [n, C, h, w])]
        if trajectory:
            velocity = predicting_x1(velocity, guesses)

        C, h, w = self.dit.config["in_channels"], height // self.pixels_per_latent, width // self.pixels_per_latent
        noise = torch.cat([flow.seeded_noise(1, C, h, w, s) for s in seeds]).to(self.device)   # H first: [n, C, h, w]
        pixels = self.decode(flow.sample(velocity, noise, steps, solver=solver, shift=shift, progress=progress))
        meta = dict(seed=None, steps=steps, cfg=cfg, solver=solver, shift=shift, renorm=renorm, system=system,
                    size=f"{width}x{height}", checkpoint=self.source)
        if cfg_trunc is not None:
            meta["cfg_trunc"] = cfg_trunc
        images = []
        for i, prompt in enumerate(prompts):
            images.append(Image.fromarray(pixels[i]))
            images[i].info["svg_t2i"] = json.dumps(dict(meta, prompt=prompt, seed=seeds[i]))
        if trajectory:
            frames = [self.decode(x1) for _, x1 in guesses]                        # steps x [n, H, W, 3]
            for i, img in enumerate(images):
                img.trajectory = trajectory_strip([f[i] for f in frames], [sigma for sigma, _ in guesses], img)
        return images

    def decode(self, latents):
        """Normalised latents [n, C, h, w] -> uint8 pixels [n, H, W, 3] (numpy)."""
        # The DiT works in normalised latents; the decoder was trained on raw DINOv3 features.
        decoder_dtype = next(self.autoencoder.decoder.parameters()).dtype
        pixels = self.autoencoder.decode(self.stats.denormalize(latents).to(decoder_dtype)).float()  # [n, 3, H, W]
        # to uint8 as the official sampler does: (x + 1) / 2, clamp, x 255, truncate (sample_svg_t2i.py)
        return ((pixels + 1) / 2).clamp(0, 1).mul(255).byte().permute(0, 2, 3, 1).cpu().numpy()


def guided_velocity(dit, feats, mask, empty_feats, empty_mask, scale, renorm=flow.DEFAULT_RENORM, passes=None,
                    cfg_trunc=None):
    """velocity(x, t) with classifier-free guidance: the function the ODE solver calls at every step.

    feats/mask [n, L, D] / [n, L] are the prompts' Gemma features, empty_* the empty prompt's, repeated n times.
    Work is done as rarely as it can be: once, the caption path of both (it sees neither x nor t); once per step,
    the noise refiner (it sees only x and t), shared by both passes; twice per step, the joint blocks, a
    conditional and an unconditional pass, each cut to its own longest caption (the empty prompt is one token:
    padding it to the prompt's length would cost tokens and an attention mask). `renorm`: see flow.cfg_velocity.
    `passes` = (refine_image, forward), e.g. torch.compile'd. `cfg_trunc`: guide only while t < cfg_trunc, the
    conditional velocity alone after it (the official `cfg_trunc` of `forward_with_cfg`, model_dino.py): it
    spends guidance on the noisy steps, where the layout is decided, and saves the unconditional pass after.

    Precision: the DiT runs in its own dtype (bf16 on GPUs) but the solver's state stays float32: each of ~50
    steps adds a small update to x, which rounding x to bf16's 8 significant bits would mostly wipe out.
    """
    refine_image, forward = passes or (dit.refine_image, dit)
    dtype = dit.x_embedder.weight.dtype
    feats, mask = unpadded(feats, mask, dtype)                                  # [n, L, D], [n, L]
    empty_feats, empty_mask = unpadded(empty_feats, empty_mask, dtype)          # [n, 1, D], [n, 1]
    cap_tokens = dit.refine_captions(feats, mask)                               # [n, L, dim]
    empty_tokens = dit.refine_captions(empty_feats, empty_mask)
    cap_lens = mask.sum(1)

    def velocity(x, t):                                                         # x float32 -> v float32
        x = x.to(dtype)
        img_tokens = refine_image(x, t, cap_lens)                               # [n, N, dim]
        v_cond = forward(x, t, feats, mask, cap_tokens=cap_tokens, img_tokens=img_tokens).float()
        if scale == 1 or (cfg_trunc is not None and float(t[0]) >= cfg_trunc):   # t is a host-made grid value
            return v_cond
        v_uncond = forward(x, t, empty_feats, empty_mask, cap_tokens=empty_tokens, img_tokens=img_tokens).float()
        return flow.cfg_velocity(v_cond, v_uncond, scale, renorm=renorm)
    return velocity


def predicting_x1(velocity, guesses):
    """velocity(x, t) that also appends (noise level 1 − t, the model's guess of the clean latent) to `guesses`.

    On the path x_t = t·x1 + (1 − t)·x0 with v = x1 − x0, x1 = x_t + (1 − t)·v holds exactly; with the model's
    (guided) velocity it is what the model believes the image is at this step -- DPM-Solver++'s data prediction
    (flow.sample_dpm), and at the last step the output itself. The velocity is returned unchanged."""
    def recorded(x, t):
        v = velocity(x, t)
        guesses.append((1 - float(t[0]), x + (1 - t).view(-1, *[1] * (x.dim() - 1)) * v))   # [n, C, h, w]
        return v
    return recorded


# The command line, main (flags -> prompt files -> one pipeline -> PNGs as each batch finishes): below the banner.


# ==========================================================================================================
# Machinery. A first reading can skip everything below: finding files, checks, jobs, resuming, torchrun, files, flags.
# ==========================================================================================================

# ----- The command line ---------------------------------------------------------------------------------
def main(argv=None):
    """Flags -> prompts and their files (jobs) -> one pipeline -> images written as each batch finishes."""
    args = parse_args(argv)
    with one_line_errors(args) as run:           # ValueError / OSError / out of memory -> one line; Ctrl-C: resume
        run.jobs, run.layout = plan_jobs(args)   # the prompt files are read before gigabytes of weights
        rank, world, device = machinery.setup_distributed(torch.device(args.device or ("cuda" if torch.cuda.is_available()
                                                                             else "cpu")))
        pipe = load_pipeline(args.ckpt, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                             compile=args.compile, dit=args.dit, decoder=args.decoder, gemma=args.gemma,
                             stats=args.stats, lora=args.lora, lora_scale=args.lora_scale)
        # Every image of the run gets these settings; all flags are checked here, before the first step.
        width, height, steps, cfg, solver, shift = pipe.settings(args.size, args.steps, args.cfg, args.solver,
                                                                 args.shift)
        run.what = f"{args.batch_size} image(s) of {width}x{height} at once on {device}"
        check_layout(args, run.layout, width, height)
        if args.system == "enhance":
            load_enhancer(pipe)
        written = run_jobs(pipe, args, run.jobs, run.layout, rank, world, device,
                           dict(steps=steps, cfg=cfg, solver=solver, shift=shift, renorm=args.renorm,
                                system=args.system, size=f"{width}x{height}", checkpoint=pipe.source))
    if run.layout == "prompts":
        for path in written:                   # a line per write: under torchrun the ranks share one stdout, and
            sys.stdout.write(path + "\n")      # print's text and its newline are two writes another rank can split
            sys.stdout.flush()
    elif rank == 0:
        print(f"{args.out}: {len(run.jobs)} prompts in {dict(geneval='GenEval', dpg='DPG-Bench')[run.layout]}'s layout")


# ----- Finding the pieces of a model on disk -------------------------------------------------------------

def check_stage_config(config, where):
    """A stage's config.json as train.py writes it, its types checked (the sampler defaults and the caption
    limit sample.py takes from it): one ValueError naming `where` instead of a TypeError mid-way."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)
    kinds = dict(steps=whole, size=whole, cfg=number, shift=number, solver=lambda v: isinstance(v, str))
    sampler = config.get("sample", {}) if isinstance(config, dict) else None
    wrong = (["sample"] if not isinstance(sampler, dict)
             else [k for k, ok in kinds.items() if k in sampler and not ok(sampler[k])])
    if isinstance(config, dict) and "max_cap_len" in config and not whole(config["max_cap_len"]):
        wrong.append("max_cap_len")
    if not isinstance(config, dict) or wrong:
        raise ValueError(f"{where}: wrong types for {wrong or 'the whole file'} (steps, size and max_cap_len are whole "
                         "numbers, cfg and shift numbers, solver a name); restore the file train.py wrote")
    return config


def _highest(pattern):
    """The file matching `pattern` (with one {k} in a folder name) of the highest stage k, or None."""
    # Sorted by the stage *number*: a plain string sort would put stage10 before stage2.
    found = sorted(glob.glob(pattern.format(k="*")), key=lambda p: int(re.findall(r"stage(\d+)", p)[-1]))
    return found[-1] if found else None


def _find_run_parts(folder):
    """A training run folder (train.py's layout): DiT EMA weights of the last finished stage, its decoder."""
    # encoders.json names the frozen encoders: paths relative to the run folder for the small presets'
    # random encoders (so the folder can be moved or shipped, as assets/demo is), absolute for the user's
    # released DINOv3 / Gemma-2 files.
    path = os.path.join(folder, "encoders.json")
    enc = machinery.check_encoders_json(machinery.read_json(path), path)
    resolve = lambda p: machinery.resolve(folder, p)
    # A finished stage holds ema.safetensors, or for a LoRA stage (train.py --lora) adapter.safetensors.
    dit_path = max([p for p in (_highest(os.path.join(folder, "stage{k}", name))
                                for name in ("ema.safetensors", "adapter.safetensors")) if p],
                   key=lambda p: int(re.findall(r"stage(\d+)", p)[-1]), default=None)
    # The stage's config.json carries the sampler defaults the model was meant for (steps, cfg, shift,
    # size) and its caption limit; a stage still running has no ema.safetensors yet and is skipped.
    stage_cfg = {}
    if dit_path:
        path = os.path.join(os.path.dirname(dit_path), "config.json")
        stage_cfg = check_stage_config(machinery.read_json(path), path)
    stats = resolve(enc.get("stats")) or os.path.join(folder, "encoders", "latent_stats.pt")
    parts = dict(dit=dit_path, decoder=_highest(os.path.join(folder, "autoencoder_P", "stage{k}", "model.safetensors")),
                 dino=resolve(enc["dino"]), gemma=resolve(enc["gemma"]), stats=stats,
                 sample=stage_cfg.get("sample", {}), max_cap_len=stage_cfg.get("max_cap_len", text.MAX_LENGTH_SAMPLE))
    if dit_path and dit_path.endswith("adapter.safetensors"):
        parts.update(_lora_parts(os.path.dirname(dit_path), folder, stage_cfg))
    return parts


def _lora_parts(stage_dir, run_folder, stage_cfg):
    """A LoRA stage: its base DiT (config.json's `lora.base`, relative to the run folder, else the absolute
    path it was trained from) and its adapter, which load_pipeline applies to it."""
    lora = stage_cfg["lora"]
    base = next((p for p in (os.path.join(run_folder, lora["base"]), lora["base_abs"]) if os.path.exists(p)),
                lora["base_abs"])
    return dict(dit=base, lora=os.path.join(stage_dir, lora["adapter"]), lora_base_fingerprint=lora["base_fingerprint"])


def _find_released_parts(folder):
    """A folder of the released files, found by their names (README lists where each comes from)."""
    # The release names its files; users download them into one folder, perhaps keeping the hub's sub-folders.
    first = lambda *pats: next((p for pat in pats for p in sorted(glob.glob(os.path.join(folder, pat)))), None)
    gemma = next((os.path.dirname(p) for p in sorted(glob.glob(os.path.join(folder, "*", "config.json")))
                  if os.path.exists(os.path.join(os.path.dirname(p), "tokenizer.model"))), None)
    # dino=None: the released autoencoder .ckpt carries its own DINOv3 weights under `encoder.` (unused for
    # sampling, which only decodes). The sampler defaults are the official ones (svg_t2i/scripts/sample.sh).
    return dict(dit=first("consolidated.00-of-01.pth", "*/consolidated.00-of-01.pth"),
                decoder=first("*autoencoder*P*stage3*.ckpt", "*autoencoder*P*.ckpt", "*.ckpt"),
                dino=None, gemma=gemma, stats=first("*stats*.pt"),
                sample=dict(flow.RELEASE_SAMPLER, size=1024), max_cap_len=text.MAX_LENGTH_SAMPLE)


def find_parts(ckpt):
    """{dit, decoder, dino, gemma, stats, sample, max_cap_len} for a run folder, one of its stage folders, or a
    folder of released files (told apart by encoders.json, which only train.py writes)."""
    ckpt = ckpt or DEFAULT_CKPT
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt} is not a folder: pass a training run folder or a folder of released files")
    if os.path.exists(os.path.join(ckpt, "encoders.json")):
        return _find_run_parts(ckpt)
    if os.path.exists(os.path.join(os.path.dirname(ckpt.rstrip("/")), "encoders.json")):   # RUN_DIR/stageK
        parts = _find_run_parts(os.path.dirname(ckpt.rstrip("/")))
        parts.update(dit=os.path.join(ckpt, "ema.safetensors"), lora=None)
        if os.path.exists(os.path.join(ckpt, "adapter.safetensors")):                    # a LoRA stage folder
            path = os.path.join(ckpt, "config.json")
            parts.update(_lora_parts(ckpt, os.path.dirname(ckpt.rstrip("/")), check_stage_config(machinery.read_json(path), path)))
        return parts
    return _find_released_parts(ckpt)



def load_pipeline(ckpt=None, device=None, dit_model=None, dtype=None, compile=False, lora=None, lora_scale=1.0,
                  **overrides):
    """Build a Pipeline from a run folder, a folder of released files, or (ckpt=None) the shipped demo.

    `dit_model` may be a NextDiT already in memory (train.py previews its EMA weights this way); it is moved and
    cast in place. `dtype` is the DiT's, the decoder's and Gemma-2's (default: torch.bfloat16 on CUDA, as the
    official sampler, which casts the DiT to bf16; torch.float32 on CPUs, where bf16 matrix products are
    fast only with bf16 units such as AMX and far slower without); the sampler's own state stays float32 either way (guided_velocity). `compile`: torch.compile the
    DiT's per-step passes. Keyword overrides (dit, decoder, gemma, stats: file paths) replace individual files.
    `lora`: an adapter file (train.py --lora) folded into the DiT with weight `lora_scale`; a LoRA run folder
    names its own (applied unless `dit_model` is given). Raises FileNotFoundError naming the missing piece."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Find every piece first and fail before loading gigabytes if one is missing.
    parts = find_parts(ckpt)
    parts.update({k: v for k, v in overrides.items() if v is not None})
    if dit_model is None and not (parts.get("dit") and os.path.exists(parts["dit"])):
        raise FileNotFoundError(f"{ckpt or DEFAULT_CKPT}: no finished DiT stage (stage*/ema.safetensors) or "
                                "consolidated.00-of-01.pth (train one with `train.py --stage 1`, or pass --dit)")
    for piece, hint in (("decoder", "train one with `train.py --autoencoder P` or pass --decoder"),
                        ("gemma", "a Gemma-2 folder with config.json and tokenizer.model (--gemma)"),
                        ("stats", "the latent statistics file (--stats)")):
        if not parts.get(piece) or not os.path.exists(parts[piece]):
            raise FileNotFoundError(f"{ckpt or DEFAULT_CKPT}: no {piece} found ({hint})")
    dit = dit_model if dit_model is not None else dit_lib.load_nextdit(parts["dit"], map_location="cpu")
    adapter = lora or (parts.get("lora") if dit_model is None else None)
    if adapter:                  # folded in (model.apply_lora) in float32, before any cast: then sampling costs as before
        _check_lora_base(adapter, parts, explicit=lora is not None)
        dit_lib.apply_lora(dit, adapter, lora_scale)
    dit = dit.to(device, dtype).eval()
    encoder = dino.load_dinov3(parts["dino"]) if parts.get("dino") else None
    # Sampling decodes the DiT's DINOv3 latents alone, which is what Autoencoder-P does (R also needs residual
    # features that no sampler produces): an R file is refused here, not after the last sampling step.
    autoencoder = ae_lib.load_autoencoder(parts["decoder"], encoder=encoder, kind="P").to(device, dtype).eval()
    stats = dino.LatentStats.load(parts["stats"])
    # The DiT's latents, the statistics and the decoder must have the same channels. A released-style .pth
    # stores no patch size and is read as patch 1, so the .pth of a patch-2 model shows up here as 4x the channels.
    channels = dict(DiT=dit.config["in_channels"], statistics=stats.mean.numel(),
                    decoder=autoencoder.decoder.z_channels)
    if len(set(channels.values())) > 1:
        raise ValueError(f"{parts.get('dit') or 'the DiT'}, {parts['stats']} and {parts['decoder']} do not fit "
                         f"together: latent channels {channels}; pass files of one model (a patch-2 DiT must be "
                         "its .safetensors)")
    gemma = text.load_gemma2(parts["gemma"], dtype=dtype).to(device).eval()
    tokenizer = text.Tokenizer(os.path.join(parts["gemma"], "tokenizer.model"))
    source = os.path.relpath(parts["dit"]) if parts.get("dit") else "in-memory"
    pipe = Pipeline(dit, autoencoder, stats, gemma, tokenizer, parts["sample"], parts["max_cap_len"], source,
                    compile=compile)
    pipe.gemma_folder = parts["gemma"]           # load_enhancer reads the whole model from it
    return pipe


def _check_lora_base(adapter, parts, explicit):
    """An adapter is trained on one base: a LoRA run's base that changed since (another fingerprint) is an error;
    an adapter passed with --lora on another base is applied, with a warning (that may be what is wanted)."""
    import data                  # data.fingerprint: file names, sizes, first and last MiB
    if not parts.get("dit") or not os.path.exists(parts["dit"]):
        return
    expected = parts.get("lora_base_fingerprint") if not explicit else \
        dit_lib.read_lora(adapter)[1].get("base_fingerprint")
    if expected and data.fingerprint(parts["dit"]) != expected:
        msg = f"{adapter} was trained on a base with fingerprint {expected}, and {parts['dit']} is another file"
        if not explicit:
            raise ValueError(msg + "; put the base back (or pass --dit BASE) or train the adapter again")
        tqdm.write(f"warning: {msg}; applying it anyway (--lora)")


def load_enhancer(pipe):
    """Replace the pipeline's text encoder by the whole Gemma-2 causal LM (all layers, final norm, tied LM head),
    which computes the same caption features and can also rewrite prompts (--system enhance)."""
    pipe.gemma = text.load_gemma2(pipe.gemma_folder, dtype=pipe.gemma.embed_tokens.weight.dtype,
                                  use_softcapping=pipe.gemma.use_softcapping, causal_lm=True).to(pipe.device).eval()


# ----- Checks: every setting before the first sampling step ------------------------------------------------

def check_settings(pipe, width, height, steps, cfg, solver, shift):
    """Pipeline.settings' checks: a bad value is refused before the first sampling step, not in the middle."""
    flow.check_sampler(steps, solver, shift)
    if not math.isfinite(cfg):
        raise ValueError(f"--cfg {cfg}: the guidance scale must be a finite number (1 = no guidance)")
    # Whole latent cells, and no more tokens per side than the DiT's RoPE tables have positions.
    cell = pipe.latent_patch
    if min(width, height) < cell or width % cell or height % cell:
        round_down = lambda v: max(cell, v // cell * cell)
        raise ValueError(f"--size {width}x{height}: width and height must be positive multiples of {cell} (one "
                         f"latent cell of this model), e.g. {round_down(width)}x{round_down(height)}")
    max_h, max_w = (n * cell for n in pipe.dit.axes_lens[1:])      # RoPE positions: rows, then columns
    if height > max_h or width > max_w:
        raise ValueError(f"--size {width}x{height}: this model places at most {max_w}x{max_h} pixels (its RoPE "
                         f"tables hold {max_h // cell} rows and {max_w // cell} columns of tokens)")


def check_layout(args, layout, width, height):
    if layout == "dpg" and width != height:
        raise ValueError(f"--size {width}x{height}: DPG-Bench crops its grid into square quarters; pass a square "
                         f"size, e.g. {width}x{width}")


def unpadded(feats, mask, dtype):
    """A batch's caption features [n, L, D] (in `dtype`) and mask [n, L], cut to its longest caption: a single
    prompt then has no padding at all, and attention runs unmasked (the faster kernel)."""
    length = int(mask.sum(1).max())
    return feats[:, :length].to(dtype), mask[:, :length]


@contextmanager
def one_line_errors(args):
    """main's error handling. Everything that can be wrong with the flags and files is found before the first
    sampling step; such an error (ValueError, OSError) ends in one line, running out of memory says which flags to
    lower, Ctrl-C says how to finish the run; any other exception is a bug and keeps its traceback. Yields what
    main has learnt so far (jobs, layout, what), for the messages."""
    run = types.SimpleNamespace(jobs=[], layout=None, what=f"{args.batch_size} image(s) at once")
    try:
        yield run
    except KeyboardInterrupt:
        again = "the same command" + (" with --resume" if run.layout == "prompts" and not args.resume else "")
        print(f"sample.py: interrupted; every file written is complete, none is half-written -- run {again} to "
              "write the rest", file=sys.stderr)
        raise SystemExit(130)
    except (ValueError, OSError, RuntimeError) as err:
        if is_out_of_memory(err):
            raise SystemExit(f"sample.py: out of memory generating {run.what}: lower --batch-size (now "
                             f"{args.batch_size}) or --size") from None
        if isinstance(err, RuntimeError):
            raise
        raise SystemExit(f"sample.py: {err}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

# ----- Jobs: what to generate, and where it goes ----------------------------------------------------------
# A job is one prompt: its n images (each with its own seed) and the files they end up in. Four layouts:
#   --prompt / --prompts   OUT/<words>_<hash>_<seed>.png, and OUT/<words>_<hash>_grid.png when n > 1
#   --geneval META.jsonl   OUT/<00000>/metadata.jsonl (the prompt's line), OUT/<00000>/samples/<0000>.png,
#                          OUT/<00000>/grid.png when n > 1: what GenEval's evaluation/evaluate_images.py reads
#   --dpg PROMPTS_DIR      OUT/<id>.png, one 2x2 grid of 4 images per <id>.txt: what ELLA's
#                          dpg_bench/compute_dpg_bench.py reads (it crops the four quarters)
# Seeds: image j of a --prompts prompt uses seed + j (every prompt the same noise, as before); in the benchmark
# layouts image j of prompt i uses seed + i*n + j, as the official eval/generation/svg_generate.py seeds them.

def read_text_file(path, what):
    """The text of a UTF-8 file (a byte-order mark is dropped, as editors on Windows write one), or one error
    naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {what} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at position "
                         f"{err.start}); save it as UTF-8") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: {what} is a folder, not a file") from None


def read_prompts(path):
    prompts = [line.strip() for line in read_text_file(path, "--prompts").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def read_geneval(path):
    """GenEval's evaluation_metadata.jsonl: one JSON object per line, each with a "prompt" (and "tag", "include",
    ...; kept as they are, since metadata.jsonl hands them to the scorer)."""
    entries = []
    for number, line in enumerate(read_text_file(path, "--geneval").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg}); GenEval's metadata has one per line") \
                from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ValueError(f'{path}:{number}: needs a "prompt" string, as GenEval\'s evaluation_metadata.jsonl has')
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no prompts (one JSON object per line)")
    return entries


def read_dpg(folder):
    """ELLA's DPG-Bench prompts: a folder of <id>.txt files, one prompt each -> [(id, prompt)] sorted by id."""
    if not os.path.isdir(folder):
        raise ValueError(f"--dpg {folder}: not a folder; pass DPG-Bench's prompts folder (ELLA dpg_bench/prompts)")
    items = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt") and not name.startswith("."):
            prompt = " ".join(read_text_file(os.path.join(folder, name), "the prompt").split())
            if not prompt:
                raise ValueError(f"{os.path.join(folder, name)}: empty prompt")
            items.append((name[:-len(".txt")], prompt))
    if not items:
        raise ValueError(f"--dpg {folder}: no <id>.txt prompt files in it")
    return items


def plan_jobs(args):
    """-> (jobs, layout): every prompt of the run, in order, with its seeds and files (the same on every rank)."""
    n, seed, out = args.n, args.seed, args.out
    jobs = []
    if args.geneval:
        for i, entry in enumerate(read_geneval(args.geneval)):
            folder = os.path.join(out, f"{i:05d}")
            jobs.append(dict(prompt=entry["prompt"], seeds=[seed + i * n + j for j in range(n)],
                             images=[os.path.join(folder, "samples", f"{j:04d}.png") for j in range(n)],
                             grid=os.path.join(folder, "grid.png") if n > 1 else None,
                             extra={os.path.join(folder, "metadata.jsonl"): json.dumps(entry) + "\n"},
                             trajectories=[None] * n))
        return jobs, "geneval"
    if args.dpg:
        for i, (name, prompt) in enumerate(read_dpg(args.dpg)):
            jobs.append(dict(prompt=prompt, seeds=[seed + i * n + j for j in range(n)], images=[None] * n,
                             grid=os.path.join(out, f"{name}.png"), extra={}, trajectories=[None] * n))
        return jobs, "dpg"
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    if args.resume:                              # a repeated prompt has the same files: generate it once
        prompts = list(dict.fromkeys(prompts))
    for prompt in prompts:                       # --tag: one more word in every name (NAME_TAG_SEED.png)
        stem = os.path.join(out, file_stem(prompt) + (f"_{args.tag}" if args.tag else ""))
        jobs.append(dict(prompt=prompt, seeds=[seed + j for j in range(n)],
                         images=[f"{stem}_{seed + j}.png" for j in range(n)],
                         grid=f"{stem}_grid.png" if n > 1 else None, extra={},
                         trajectories=[f"{stem}_{seed + j}_trajectory.png" if args.trajectory else None
                                       for j in range(n)]))
    return jobs, "prompts"


# ----- Resuming: which files are there already, and were they made with these settings ----------------------

def png_settings(path):
    """The svg_t2i settings of a PNG this script wrote (read from the header chunks, no pixels decoded)."""
    try:
        with Image.open(path) as img:
            return json.loads(img.info["svg_t2i"])
    except (OSError, KeyError, ValueError):
        raise ValueError(f"{path} is there but was not written by sample.py (no readable svg_t2i settings); "
                         "move it away or pass another --out") from None


def check_existing(path, expected):
    """A file already there is kept (never overwritten) and counted as done -- if it was made with the settings of
    this run. Another model or other settings would silently mix two experiments in one folder: an error."""
    found = png_settings(path)
    for key, value in expected.items():
        theirs = found.get(key)
        same = theirs == value or (key == "checkpoint" and isinstance(theirs, str)
                                   and os.path.realpath(theirs) == os.path.realpath(value))
        if not same:
            raise ValueError(f"{path} was made with {key} {theirs!r}, this run uses {value!r}; pass another --out, "
                             "or the settings that folder was made with")


def remove_stale_temporaries(path):
    """A process killed while writing (kill -9, power loss) leaves its temporary file; the next run removes it."""
    folder, name = os.path.split(path)
    for stale in glob.glob(os.path.join(glob.escape(folder or "."), f".{glob.escape(name)}.tmp*")):
        os.remove(stale)


def resume_state(job, expected):
    """For a job of a run that skips what is done: -> (todo, done): the image indices to generate and
    {index: image} of those read back from disk because the grid still needs them. Checks every file found.
    With --trajectory an image is done when its trajectory is there too; otherwise both are made again (and
    the image file already there is kept)."""
    meta = lambda j: dict(expected, prompt=job["prompt"], seed=job["seeds"][j])
    for path in [*job["images"], job["grid"], *job["extra"], *job["trajectories"]]:
        if path:
            remove_stale_temporaries(path)
    for path, content in job["extra"].items():
        if os.path.exists(path) and read_text_file(path, "metadata") != content:
            raise ValueError(f"{path} holds another prompt's metadata than this run's; pass another --out")
    have = {j for j, path in enumerate(job["images"]) if path and os.path.exists(path)}
    for j in have:
        check_existing(job["images"][j], meta(j))
    for j, path in enumerate(job["trajectories"]):
        if path and os.path.exists(path):
            check_existing(path, meta(j))
        elif path:
            have.discard(j)
    grid_done = job["grid"] is None or os.path.exists(job["grid"])
    if job["grid"] and grid_done:
        check_existing(job["grid"], dict(meta(0), n=len(job["seeds"])))
    if grid_done:
        return [j for j, path in enumerate(job["images"]) if path and j not in have], {}
    todo = [j for j in range(len(job["seeds"])) if j not in have]
    done = {}
    for j in have:
        with Image.open(job["images"][j]) as img:
            done[j] = img.convert("RGB")
        done[j].info["svg_t2i"] = json.dumps(png_settings(job["images"][j]))
    return todo, done


# ----- Files ---------------------------------------------------------------------------------------------

def make_grid(images, cols=None):
    # Row-major, at most 4 wide, on white: n images per prompt become one picture to glance at.
    cols = cols or min(len(images), 4)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


TRAJECTORY_FRAME = 256      # --trajectory: pixels on a frame's long side at most (50 frames of 1024 px are 51k wide)


def trajectory_strip(frames, sigmas, image):
    """One row of frames [H, W, 3] uint8 (Pipeline.generate's guesses of x1), each with its noise level below it;
    its settings are `image`'s and the noise levels."""
    h, w = frames[0].shape[:2]
    scale = min(1.0, TRAJECTORY_FRAME / max(h, w))
    fw, fh = max(1, round(w * scale)), max(1, round(h * scale))
    font = ImageFont.load_default()
    strip = Image.new("RGB", (fw * len(frames), fh + 14), "white")
    draw = ImageDraw.Draw(strip)
    for k, (frame, sigma) in enumerate(zip(frames, sigmas)):
        strip.paste(Image.fromarray(frame).resize((fw, fh), Image.LANCZOS) if scale < 1 else Image.fromarray(frame),
                    (k * fw, 0))
        draw.text((k * fw + 2, fh + 1), f"noise {sigma:.2f}" if fw >= 56 else f"{sigma:.2f}", fill="black", font=font)
    levels = [round(sigma, 4) for sigma in sigmas]
    strip.info["svg_t2i"] = json.dumps(dict(json.loads(image.info["svg_t2i"]), trajectory=levels))
    return strip

def write_new_file(path, write, number=False):
    """Write a file that appears whole or not at all, and never over an existing one. `write(f)` fills an open
    binary file. The bytes go to a temporary name beside `path` (".NAME.tmpPID", which neither benchmark scorer
    reads), are flushed to disk, then linked to the final name: the link fails if that name exists, so nothing is
    overwritten even by a process that wrote the name a moment ago. number=True: a taken `stem.png` becomes
    `stem-1.png`, `stem-2.png`, ... (as image tools number their outputs); otherwise a taken name is an error.
    A full disk or a kill leaves no file under the final name. Returns the path written."""
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise OSError(f"{path}: could not be written ({err.strerror or err}); nothing was left under that name "
                          "-- free some space and run the same command again") from None
        stem, ext = os.path.splitext(path)
        k = 0
        while True:
            candidate = path if k == 0 else f"{stem}-{k}{ext}"
            try:
                os.link(tmp, candidate)          # atomic, and fails if the name exists
                return candidate
            except FileExistsError:
                if not number:
                    raise OSError(f"{candidate} appeared while this run wrote it (is another sample.py writing to "
                                  "the same --out?); it was left as it is") from None
                k += 1
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(img, path, meta, number=True):
    """Write `img` to `path` (atomically, never over an existing file: see write_new_file), with `meta` in a
    svg_t2i text chunk. Returns the path written."""
    # A tEXt chunk travels with the file: anyone can reproduce the image from the PNG alone.
    info = PngImagePlugin.PngInfo()
    info.add_text("svg_t2i", meta)             # prompt, seed, steps, cfg, solver, shift, checkpoint
    return write_new_file(path, lambda f: img.save(f, format="PNG", pnginfo=info), number=number)


def file_stem(prompt, limit=60):
    """A file name for a prompt: its lower-case words joined by "_" (cut to `limit` characters) and 6 hex
    digits of its hash, so prompts that differ only in case, punctuation or non-Latin letters never share
    a name ("a red circle" -> "a_red_circle_35a5b3")."""
    words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:limit] or "prompt"
    return f"{words}_{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


def tag_name(s):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+=-]{0,39}", s):
        raise argparse.ArgumentTypeError(f"{s!r}: a tag is 1 to 40 letters, digits, '.', '+', '=' or '-' (it goes "
                                         "into file names, where '_' separates the parts), starting with a letter "
                                         "or digit")
    return s


def parse_size(s):
    m = re.fullmatch(r"(\d+)x(\d+)", s or "")
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected WIDTHxHEIGHT in pixels, both >= 1, e.g. 1024x768")
    return int(m.group(1)), int(m.group(2))


def number(kind, minimum=None, above=None):
    """An argparse type: an int, or a finite float, that is >= `minimum` and > `above` where given. A value
    that would mean nothing (0 steps, a NaN scale) is refused at the command line, before anything loads."""
    need = ("an integer" if kind is int else "a finite number") + "".join(
        f" {rule} {bound}" for rule, bound in ((">=", minimum), (">", above)) if bound is not None)

    def parse(s):
        try:
            value = kind(s)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (minimum is not None and value < minimum) or \
                (above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"got {s!r}, need {need}")
        return value
    return parse


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has one the help text does not already state."""
    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Once(argparse.Action):
    """A flag that may be given once: argparse would silently keep the last of `--prompt a --prompt b`."""
    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"argument {option_string}: given twice; for several prompts write them one per line "
                         "in a file and pass --prompts FILE")
        setattr(namespace, self.dest, values)


def is_out_of_memory(err):
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and (
        "out of memory" in str(err) or "can't allocate memory" in str(err)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Generate images from text prompts with SVG-T2I.", formatter_class=_HelpWithDefaults,
        epilog="Several GPUs: torchrun --nproc_per_node=N sample.py ... (each prompt on one process, the same "
               "files as one process, one progress bar). Files appear whole or not at all (a temporary name, then "
               "a rename). Stopped half-way, a --geneval / --dpg run, or a --prompts run with --resume, started "
               "again with the same command skips every file already there and writes the rest.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action=_Once, help="one prompt")
    src.add_argument("--prompts", help="a UTF-8 text file with one prompt per line")
    src.add_argument("--geneval", metavar="METADATA.jsonl", help="GenEval's evaluation_metadata.jsonl: writes "
                     "OUT/<00000>/metadata.jsonl, OUT/<00000>/samples/<0000>.png (--n per prompt, default 4) and "
                     "OUT/<00000>/grid.png, the layout GenEval's evaluate_images.py scores; resumes by itself")
    src.add_argument("--dpg", metavar="PROMPTS_DIR", help="DPG-Bench's folder of <id>.txt prompts (ELLA "
                     "dpg_bench/prompts): writes OUT/<id>.png, a 2x2 grid of 4 square images, the layout "
                     "compute_dpg_bench.py scores; resumes by itself")
    p.add_argument("--ckpt", help="a training run folder or a folder of released files (default: the shipped demo)")
    p.add_argument("--out", default="samples", help="output folder; a file already there is never overwritten: "
                   "with --prompt/--prompts the new image gets the next free name (NAME-1.png, NAME-2.png, ...); "
                   "with --resume, --geneval and --dpg a file already there counts as done (it must have been made "
                   "with the same settings, else the run stops and says which)")
    p.add_argument("--resume", action="store_true", help="with --prompt/--prompts: skip every image (and grid) "
                   "whose file is there already, and write only the rest -- how a stopped run is finished")
    p.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT in pixels (default: the model's training size)")
    p.add_argument("--steps", type=number(int, minimum=1),
                   help="model evaluations, for every solver (default: the model's, 50 for the release); even "
                   "for midpoint. The official --num_sampling_steps N is N for dpm, N-1 for euler, 2(N-1) for "
                   "midpoint (it counts grid points)")
    p.add_argument("--cfg", type=number(float), help="classifier-free guidance scale, 1 = no guidance (default: the "
                   "model's, 4 for the release)")
    p.add_argument("--cfg-trunc", type=number(float, above=0), help="guidance only while t < this value (t = 0 is "
                   "noise, 1 data), the conditional velocity alone after it: the official cfg_trunc, a speed / "
                   "quality knob: each step at t >= this value skips the unconditional DiT pass (how many steps that "
                   "is depends on --shift, which puts most steps near noise). Default: guidance on every step")
    p.add_argument("--renorm", action=argparse.BooleanOptionalAction, default=flow.DEFAULT_RENORM,
                   help="CFG renorm, as the official sampler: clip the guided velocity's norm to the conditional "
                   "one's. --no-renorm lets it grow (over-saturated colours at high --cfg)")
    p.add_argument("--solver", choices=sorted(flow.SOLVERS), help="ODE solver (default dpm: DPM-Solver++ 2M)")
    p.add_argument("--shift", type=number(float, above=0),
                   help="time shift of the step grid toward noise, > 0 (release: 10)")
    p.add_argument("--seed", type=number(int, minimum=0), default=0, help="image j of a prompt uses seed + j; in "
                   "--geneval / --dpg image j of prompt i uses seed + i*n + j (as the official eval scripts)")
    p.add_argument("--n", "--num-images", dest="n", type=number(int, minimum=1), help="images per prompt; more "
                   "than one also writes a grid (default 1; 4 for --geneval; --dpg always 4). Under torchrun spell it "
                   "--num-images: torchrun reads --n as an abbreviation of its own --nnodes / --nproc-per-node")
    p.add_argument("--batch-size", type=number(int, minimum=1), default=4, help="images generated at once, "
                   "from one prompt or several; each image is the one it would be alone (to float precision). "
                   "Lower it when memory runs out")
    p.add_argument("--system", default="base", choices=sorted([*text.SYSTEM_PROMPTS, "enhance"]),
                   help="system prompt prepended. enhance: Gemma-2 first rewrites the prompt into a more detailed "
                   "one (greedy, at most 196 new tokens, the official instruction and clean-up), which is then "
                   "encoded after the 'align' system prompt; the PNG keeps both. Needs the whole Gemma-2 "
                   "(google/gemma-2-2b), not the small presets' encoder-only folders")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; under torchrun one GPU per process)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="precision of the DiT, decoder and Gemma-2 "
                   "(default: bfloat16 on CUDA, as the official sampler; float32 on CPU, where bf16 matrix products "
                   "are fast only with bf16 units such as AMX). The ODE solver's state is float32 either way")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's per-step passes: faster steps "
                   "after a one-off compilation (seconds to minutes), worth it for many images of one size")
    p.add_argument("--tag", type=tag_name, metavar="LABEL", help="a label for this variant of an experiment: it "
                   "goes into every file name (NAME_LABEL_SEED.png, NAME_LABEL_grid.png) and into the PNG's settings, "
                   "so variants written into one --out keep apart, and benchmarks/compare.py labels them by it")
    p.add_argument("--trajectory", action="store_true", help="also write NAME_SEED_trajectory.png for each image: "
                   "one row of the model's guess of the clean image, x1 = x_t + (1 - t) v, decoded at every model "
                   f"evaluation and labelled with its noise level 1 - t (frames at most {TRAJECTORY_FRAME} px); costs "
                   "one decode per step, the images themselves are unchanged")
    p.add_argument("--dit", help="override: DiT weights file")
    p.add_argument("--decoder", help="override: autoencoder .ckpt / .safetensors")
    p.add_argument("--gemma", help="override: Gemma-2 folder")
    p.add_argument("--stats", help="override: latent statistics .pt")
    p.add_argument("--lora", metavar="FILE", help="an adapter (train.py --lora: stage{K}/adapter.safetensors) to fold "
                   "into the DiT; a LoRA run folder passed as --ckpt applies its own without this flag")
    p.add_argument("--lora-scale", type=number(float), default=1.0, metavar="S", help="weight of the adapter's "
                   "update: 0 = the base, 1 = as trained")
    args = p.parse_args(argv)
    if args.dpg and args.n not in (None, 4):
        p.error(f"argument --n: DPG-Bench scores a 2x2 grid of 4 images per prompt; --dpg takes --n 4 (got {args.n})")
    for flag in ("tag", "trajectory"):
        if getattr(args, flag) and (args.geneval or args.dpg):
            p.error(f"argument --{flag}: names files of --prompt / --prompts runs; the GenEval and DPG-Bench layouts "
                    "have fixed names (and their scorers read every file there)")
    if args.resume and (args.geneval or args.dpg):
        p.error("argument --resume: --geneval and --dpg always resume (their file names are fixed); drop --resume")
    args.n = args.n or (4 if args.geneval or args.dpg else 1)
    return args


def run_jobs(pipe, args, jobs, layout, rank, world, device, expected):
    """Generate this process's share of `jobs`, --batch-size images at a time, writing each file as soon as it is
    complete. -> the paths written. Each prompt is generated by one process; files are named by prompt and seed
    alone, so N processes write what one does. `expected`: the settings every image gets, which files already
    there must have been made with."""
    resume = args.resume or layout != "prompts"
    # A file without the key was guided on every step, and has no tag: None.
    expected = dict(expected, cfg_trunc=args.cfg_trunc, tag=args.tag)
    written = []

    def write_grid(job):
        images = [job["ready"][j] for j in range(len(job["seeds"]))]
        meta = dict(json.loads(images[0].info["svg_t2i"]), seed=job["seeds"][0], n=len(images))  # first seed, count
        written.append(save_png(make_grid(images, cols=None if layout == "prompts" else 2), job["grid"],
                                json.dumps(meta), number=not resume))
        job["ready"] = {}                        # on disk now: memory stays flat over a long run

    # Batches are made inside groups of B // n consecutive prompts (at least one), and the groups are dealt out
    # round robin: which images share a batch then does not depend on the number of processes, so N processes
    # write the very same bytes as one. What is left to do is (job, image index) pairs. metadata.jsonl comes
    # first (a folder the scorer reads always has it); a job whose images are all on disk but whose grid is not
    # gets its grid now, from the files.
    batch, per_group = args.batch_size, max(1, args.batch_size // args.n)
    groups = [jobs[k:k + per_group] for k in range(0, len(jobs), per_group)]
    batches, finished = [], 0
    for group in groups[rank::world]:
        todo = []
        for job in group:
            left, job["ready"] = resume_state(job, expected) if resume else (list(range(len(job["seeds"]))), {})
            for path, content in job["extra"].items():
                if not os.path.exists(path):
                    written.append(write_new_file(path, lambda f, c=content: f.write(c.encode())))
            job["grid_left"] = job["grid"] is not None and (not resume or not os.path.exists(job["grid"]))
            if not left and job["grid_left"]:
                write_grid(job)
            finished += not left
            job["left"] = len(left)
            todo += [(job, j) for j in left]
        batches += [todo[k:k + batch] for k in range(0, len(todo), batch)]

    # One progress bar, on rank 0, over every prompt of the run. After each batch every process adds the prompts
    # it finished (one all-reduce, nothing next to a batch of sampling); all iterate as often as the busiest one,
    # so that the collectives pair up.
    skipped = machinery.total_over_ranks(finished, device)
    iterations = machinery.total_over_ranks(len(batches), device, op=dist.ReduceOp.MAX)
    bar = tqdm(total=len(jobs), initial=skipped, desc="prompts", disable=rank != 0 or len(jobs) == 1)
    if skipped and rank == 0:
        tqdm.write(f"{args.out}: {skipped} of {len(jobs)} prompts complete already, skipped"
                   + ("" if iterations else "; nothing left to do"), file=sys.stderr)
    enhanced = {}
    try:
        for b in range(iterations):
            chunk, completed = (batches[b] if b < len(batches) else []), 0
            if args.system == "enhance":         # once per prompt (greedy decoding: the same text every time)
                for job, _ in chunk:
                    if job["prompt"] not in enhanced:
                        enhanced[job["prompt"]] = text.enhance_prompt(pipe.gemma, pipe.tokenizer, job["prompt"])
            encoded = [enhanced.get(job["prompt"], job["prompt"]) for job, _ in chunk]
            images = pipe.generate(encoded, size=args.size, steps=args.steps, cfg=args.cfg, solver=args.solver,
                                   shift=args.shift, renorm=args.renorm,
                                   system="align" if args.system == "enhance" else args.system,
                                   progress=rank == 0 and len(jobs) == 1, seeds=[job["seeds"][j] for job, j in chunk],
                                   cfg_trunc=args.cfg_trunc, trajectory=args.trajectory) if chunk else []
            for (job, j), img, prompt in zip(chunk, images, encoded):
                for png in [img, getattr(img, "trajectory", None)]:
                    if png is None:
                        continue
                    meta = json.loads(png.info["svg_t2i"])
                    if args.system == "enhance":   # the user's prompt stays "prompt"; what was encoded goes beside it
                        meta.update(prompt=job["prompt"], system="enhance", enhanced_prompt=prompt)
                    if args.tag:
                        meta["tag"] = args.tag
                    png.info["svg_t2i"] = json.dumps(meta)
                # Resumed, an image file already there (its trajectory was missing) is kept as it is.
                if job["images"][j] and not (resume and os.path.exists(job["images"][j])):
                    written.append(save_png(img, job["images"][j], img.info["svg_t2i"], number=not resume))
                if job["trajectories"][j]:
                    written.append(save_png(img.trajectory, job["trajectories"][j], img.trajectory.info["svg_t2i"],
                                            number=not resume))
                if job["grid_left"]:
                    job["ready"][j] = img
                job["left"] -= 1
                if job["left"] == 0:
                    if job["grid_left"]:
                        write_grid(job)
                    completed += 1
            bar.update(machinery.total_over_ranks(completed, device))
    finally:
        bar.close()
    return written


if __name__ == "__main__":
    main()
