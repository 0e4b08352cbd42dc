"""sample.py -- text to image: prompt(s) in, PNG files out.

Where this sits: the end of the pipeline (the official KlingTeam/SVG-T2I `svg_t2i/sample_svg_t2i.py`). For
each prompt:

    prompt --Gemma-2--> cap_feats [1, L, D]          once per prompt (and once for the empty prompt)
           --caption embedder + context refiner--> cap_tokens   once, reused by every step
    noise [1, C, H/p, W/p] --Next-DiT x steps (flow ODE; CFG: noise refiner once, then a cond and an uncond
                               pass through the joint blocks)--> latent
    latent --denormalise (latent statistics)--> DINOv3 features --pixel decoder--> image in [-1, 1] --> PNG

    python sample.py --prompt "a red circle in the top left"                  # the shipped demo model
    python sample.py --prompt "a corgi astronaut" --ckpt path/to/release --size 1024x1024
    python sample.py --prompts prompts.txt --ckpt runs/mine --n 4              # a grid per prompt

`--ckpt` takes a training run folder (the highest finished stage's EMA weights are used) or a folder of the
released files (README "Using the released weights"): `consolidated.00-of-01.pth`, an Autoencoder-P
`.ckpt`, the latent statistics `.pt` and a `gemma-2-2b/` folder. Two fixes relative to the official
sampler: the seed is honoured (its `manual_seed` call is commented out), and noise is laid out H first (it
draws [W/16, H/16], so non-square sizes came out transposed).
"""

import argparse
import glob
import hashlib
import json
import math
import os
import re

import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

import autoencoder as ae_lib
import dino
import flow
import model as dit_lib
import text

DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")


# ----- Finding the pieces of a model on disk -------------------------------------------------------------

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
    with open(os.path.join(folder, "encoders.json")) as f:
        enc = json.load(f)
    resolve = lambda p: p if p is None or os.path.isabs(p) else os.path.join(folder, p)
    # A finished stage holds ema.safetensors, or for a LoRA stage (train.py --lora) adapter.safetensors.
    dit_path = max([p for p in (_highest(os.path.join(folder, "stage{k}", name))
                                for name in ("ema.safetensors", "adapter.safetensors")) if p],
                   key=lambda p: int(re.findall(r"stage(\d+)", p)[-1]), default=None)
    # The stage's config.json carries the sampler defaults the model was meant for (steps, cfg, shift,
    # size) and its caption limit; a stage still running has no ema.safetensors yet and is skipped.
    stage_cfg = {}
    if dit_path:
        with open(os.path.join(os.path.dirname(dit_path), "config.json")) as f:
            stage_cfg = json.load(f)
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
            with open(os.path.join(ckpt, "config.json")) as f:
                parts.update(_lora_parts(ckpt, os.path.dirname(ckpt.rstrip("/")), json.load(f)))
        return parts
    return _find_released_parts(ckpt)


# ----- The pipeline --------------------------------------------------------------------------------------

class Pipeline:
    """Frozen text encoder + trained Next-DiT + latent statistics + pixel decoder, ready to sample."""

    def __init__(self, dit, autoencoder, stats, gemma, tokenizer, defaults, max_cap_len, source, compile=False):
        self.dit, self.autoencoder, self.stats = dit, autoencoder, stats
        self.gemma, self.tokenizer = gemma, tokenizer
        self.defaults, self.max_cap_len, self.source = defaults, max_cap_len, source
        self.device = next(dit.parameters()).device
        # pixels per latent cell = the encoder's patch, which the decoder's upsampling undoes; the DiT then
        # groups patch_size x patch_size cells into one token, so sizes must be multiples of both
        self.pixels_per_latent = autoencoder.decoder.upsample_factor
        self.latent_patch = self.pixels_per_latent * dit.config["patch_size"]
        # compile: torch.compile the two DiT passes every step makes (noise refiner, joint blocks); the caption
        # path runs once per batch and stays eager. A new size or caption length can cost another compilation.
        self.dit_passes = (torch.compile(dit.refine_image), torch.compile(dit)) if compile else (dit.refine_image, dit)

    def settings(self, size=None, steps=None, cfg=None, solver=None, shift=None):
        """The sampler settings a generate call uses -- each argument, or this model's default where it is None
        -- checked, so that a bad value is refused before the first sampling step, not in the middle of it.
        -> (width, height, steps, cfg, solver, shift); size and (width, height) are in pixels."""
        d = self.defaults
        # A run with no finished stage yet (train.py's previews during stage 1) has no defaults: the official
        # steps, cfg and solver, and no shift.
        steps = d.get("steps", flow.DEFAULT_STEPS) if steps is None else steps
        cfg = d.get("cfg", flow.DEFAULT_CFG) if cfg is None else cfg
        solver, shift = solver or d.get("solver", flow.DEFAULT_SOLVER), d.get("shift", 1.0) if shift is None else shift
        flow.check_sampler(steps, solver, shift)
        if not math.isfinite(cfg):
            raise ValueError(f"--cfg {cfg}: the guidance scale must be a finite number (1 = no guidance)")
        # Whole latent cells, and no more tokens per side than the DiT's RoPE tables have positions.
        width, height = size or (d.get("size", 256),) * 2
        cell = self.latent_patch
        if min(width, height) < cell or width % cell or height % cell:
            round_down = lambda v: max(cell, v // cell * cell)
            raise ValueError(f"--size {width}x{height}: width and height must be positive multiples of {cell} (one "
                             f"latent cell of this model), e.g. {round_down(width)}x{round_down(height)}")
        max_h, max_w = (n * cell for n in self.dit.axes_lens[1:])      # RoPE positions: rows, then columns
        if height > max_h or width > max_w:
            raise ValueError(f"--size {width}x{height}: this model places at most {max_w}x{max_h} pixels (its RoPE "
                             f"tables hold {max_h // cell} rows and {max_w // cell} columns of tokens)")
        return width, height, steps, cfg, solver, shift

    @torch.no_grad()
    def generate(self, prompts, seed=0, size=None, steps=None, cfg=None, solver=None, shift=None,
                 renorm=flow.DEFAULT_RENORM, system="base", progress=True):
        """One image per prompt; image i uses noise seeded by `seed + i`, so a prompt's image does not depend on
        what else is in the batch. `size` is (width, height) in pixels; None picks the model's default for it
        and for steps, cfg, solver and shift (see settings). renorm=False: CFG without the renorm clip
        (flow.cfg_velocity). Returns a list of PIL images, their settings in img.info["svg_t2i"]."""
        width, height, steps, cfg, solver, shift = self.settings(size, steps, cfg, solver, shift)
        n = len(prompts)

        # Text: every prompt and the empty prompt in one Gemma call; then the caption path of the DiT, once.
        texts = [text.format_prompt(p, system) for p in prompts] + [""]
        feats, mask = text.encode_prompts(self.gemma, self.tokenizer, texts, "", self.max_cap_len)
        feats = feats.float()                                                       # [n + 1, L, D]
        velocity = guided_velocity(self.dit, feats[:n], mask[:n], feats[n:].expand(n, -1, -1), mask[n:].expand(n, -1),
                                   cfg, renorm=renorm, passes=self.dit_passes)

        # Noise, H first: [n, C, H/p, W/p]
        C, h, w = self.dit.config["in_channels"], height // self.pixels_per_latent, width // self.pixels_per_latent
        noise = torch.cat([flow.seeded_noise(1, C, h, w, seed + i) for i in range(n)]).to(self.device)

        latents = flow.sample(velocity, noise, steps, solver=solver, shift=shift, progress=progress)
        # The DiT works in normalised latents; the decoder was trained on raw DINOv3 features.
        decoder_dtype = next(self.autoencoder.decoder.parameters()).dtype
        pixels = self.autoencoder.decode(self.stats.denormalize(latents).to(decoder_dtype)).float()  # [n, 3, H, W]
        # to uint8 as the official sampler does: (x + 1) / 2, clamp, x 255, truncate (sample_svg_t2i.py)
        pixels = ((pixels + 1) / 2).clamp(0, 1).mul(255).byte().permute(0, 2, 3, 1).cpu().numpy()
        meta = dict(seed=None, steps=steps, cfg=cfg, solver=solver, shift=shift, renorm=renorm, system=system,
                    size=f"{width}x{height}", checkpoint=self.source)
        images = []
        for i, prompt in enumerate(prompts):
            img = Image.fromarray(pixels[i])
            img.info["svg_t2i"] = json.dumps(dict(meta, prompt=prompt, seed=seed + i))
            images.append(img)
        return images


def guided_velocity(dit, feats, mask, empty_feats, empty_mask, scale, renorm=flow.DEFAULT_RENORM, passes=None):
    """velocity(x, t) with classifier-free guidance: the function the ODE solver calls at every step.

    feats/mask [n, L, D] / [n, L] are the prompts' Gemma features, empty_* the empty prompt's, repeated n
    times. Work is done as rarely as it can be:
      - once: the caption path (embedder + context refiner) of both, which sees neither x nor t;
      - once per step: the noise refiner, which sees only x and t (NextDiT.refine_image), shared by both passes;
      - twice per step: the joint blocks, a conditional and an unconditional pass, each cut to its own longest
        caption. The empty prompt is one token, and padding it to the prompt's length would cost tokens and an
        attention mask; a single prompt has no padding at all, so attention runs unmasked (the faster kernel).
    `renorm`: clip the guided velocity's norm to the conditional one's (flow.cfg_velocity says why). `passes` =
    (refine_image, forward) of the DiT, e.g. torch.compile'd ones (default: the DiT's own).

    Precision: the DiT runs in its own dtype (bf16 on GPUs, as the official sampler), but the ODE solver's state
    -- x and the DPM-Solver++ history -- stays float32. Each of ~50 steps adds a small update to x, and bf16
    keeps 8 significant bits: rounding x to it every step would wipe out much of each update. So the DiT's inputs
    are cast to its dtype and its velocities back to float32; t stays float32 (the timestep embedding casts after
    its sinusoids).
    """
    refine_image, forward = passes or (dit.refine_image, dit)
    dtype = dit.x_embedder.weight.dtype

    def unpadded(f, m):
        length = int(m.sum(1).max())
        return f[:, :length].to(dtype), m[:, :length]
    feats, mask = unpadded(feats, mask)                                         # [n, L, D], [n, L]
    empty_feats, empty_mask = unpadded(empty_feats, empty_mask)                 # [n, 1, D], [n, 1]
    cap_tokens = dit.refine_captions(feats, mask)                               # [n, L, dim]
    empty_tokens = dit.refine_captions(empty_feats, empty_mask)
    cap_lens = mask.sum(1)

    def velocity(x, t):                                                         # x float32 -> v float32
        x = x.to(dtype)
        img_tokens = refine_image(x, t, cap_lens)                               # [n, N, dim]
        v_cond = forward(x, t, feats, mask, cap_tokens=cap_tokens, img_tokens=img_tokens).float()
        if scale == 1:
            return v_cond
        v_uncond = forward(x, t, empty_feats, empty_mask, cap_tokens=empty_tokens, img_tokens=img_tokens).float()
        return flow.cfg_velocity(v_cond, v_uncond, scale, renorm=renorm)
    return velocity


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
    return Pipeline(dit, autoencoder, stats, gemma, tokenizer, parts["sample"], parts["max_cap_len"], source,
                    compile=compile)


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


def save_png(img, path, meta):
    """Write `img` to `path`, or, if that name is taken, to `stem-1.png`, `stem-2.png`, ... (as image tools number
    their outputs): an existing file is never overwritten. Returns the path written."""
    # A tEXt chunk travels with the file: anyone can reproduce the image from the PNG alone.
    info = PngImagePlugin.PngInfo()
    info.add_text("svg_t2i", meta)             # prompt, seed, steps, cfg, solver, shift, checkpoint
    stem, k = path.removesuffix(".png"), 0
    while True:
        candidate = path if k == 0 else f"{stem}-{k}.png"
        try:
            with open(candidate, "xb") as f:   # "x": fails if the file exists, even one made a moment ago
                img.save(f, format="PNG", pnginfo=info)
            return candidate
        except FileExistsError:
            k += 1


def file_stem(prompt, limit=60):
    """A file name for a prompt: its lower-case words joined by "_" (cut to `limit` characters) and 6 hex
    digits of its hash, so prompts that differ only in case, punctuation or non-Latin letters never share
    a name ("a red circle" -> "a_red_circle_35a5b3")."""
    words = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:limit] or "prompt"
    return f"{words}_{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate images from text prompts with SVG-T2I.",
                                formatter_class=_HelpWithDefaults)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--ckpt", help="a training run folder or a folder of released files (default: the shipped demo)")
    p.add_argument("--out", default="samples", help="output folder; a file name already there is never overwritten "
                   "(the new image gets the next free name: NAME-1.png, NAME-2.png, ...)")
    p.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT in pixels (default: the model's training size)")
    p.add_argument("--steps", type=number(int, minimum=1),
                   help="model evaluations, for every solver (default: the model's, 50 for the release); even "
                   "for midpoint. The official --num_sampling_steps N is N for dpm, N-1 for euler, 2(N-1) for "
                   "midpoint (it counts grid points)")
    p.add_argument("--cfg", type=number(float), help="classifier-free guidance scale, 1 = no guidance (default: the "
                   "model's, 4 for the release)")
    p.add_argument("--renorm", action=argparse.BooleanOptionalAction, default=flow.DEFAULT_RENORM,
                   help="CFG renorm, as the official sampler: clip the guided velocity's norm to the conditional "
                   "one's. --no-renorm lets it grow (over-saturated colours at high --cfg)")
    p.add_argument("--solver", choices=sorted(flow.SOLVERS), help="ODE solver (default dpm: DPM-Solver++ 2M)")
    p.add_argument("--shift", type=number(float, above=0),
                   help="time shift of the step grid toward noise, > 0 (release: 10)")
    p.add_argument("--seed", type=number(int, minimum=0), default=0, help="image j of a prompt uses seed + j")
    p.add_argument("--n", type=number(int, minimum=1), default=1,
                   help="images per prompt; more than one also writes a grid")
    p.add_argument("--system", default="base", choices=sorted(text.SYSTEM_PROMPTS), help="system prompt prepended")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="precision of the DiT, decoder and Gemma-2 "
                   "(default: bfloat16 on CUDA, as the official sampler; float32 on CPU, where bf16 matrix products "
                   "are fast only with bf16 units such as AMX). The ODE solver's state is float32 either way")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's per-step passes: faster steps "
                   "after a one-off compilation (seconds to minutes), worth it for many images of one size")
    p.add_argument("--dit", help="override: DiT weights file")
    p.add_argument("--decoder", help="override: autoencoder .ckpt / .safetensors")
    p.add_argument("--gemma", help="override: Gemma-2 folder")
    p.add_argument("--stats", help="override: latent statistics .pt")
    p.add_argument("--lora", metavar="FILE", help="an adapter (train.py --lora: stage{K}/adapter.safetensors) to fold "
                   "into the DiT; a LoRA run folder passed as --ckpt applies its own without this flag")
    p.add_argument("--lora-scale", type=number(float), default=1.0, metavar="S", help="weight of the adapter's "
                   "update: 0 = the base, 1 = as trained")
    args = p.parse_args(argv)

    # Everything that can be wrong with the flags and files is found here, before the first sampling step. Such
    # an error (ValueError, OSError) ends in one line; any other exception is a bug and keeps its traceback.
    try:
        if args.prompt is not None:
            prompts = [args.prompt]
        else:
            with open(args.prompts) as f:
                prompts = [line.strip() for line in f if line.strip()]
            if not prompts:
                raise ValueError(f"{args.prompts}: no prompts (one per line)")
        # One pipeline for all prompts: the encoders and weights load once. Images of a prompt share its text
        # features; each image's noise is seeded by --seed + j, so a result never depends on what else ran.
        pipe = load_pipeline(args.ckpt, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                             compile=args.compile, dit=args.dit, decoder=args.decoder, gemma=args.gemma,
                             stats=args.stats, lora=args.lora, lora_scale=args.lora_scale)
        pipe.settings(args.size, args.steps, args.cfg, args.solver, args.shift)
        os.makedirs(args.out, exist_ok=True)
    except (ValueError, OSError) as err:
        raise SystemExit(f"sample.py: {err}")
    written = []
    for prompt in tqdm(prompts, desc="prompts", disable=len(prompts) == 1):
        # n copies of the prompt in one batch: the caption path runs once for all of them
        images = pipe.generate([prompt] * args.n, seed=args.seed, size=args.size, steps=args.steps, cfg=args.cfg,
                               solver=args.solver, shift=args.shift, renorm=args.renorm, system=args.system,
                               progress=True)
        # Names carry the prompt's hash and the seed; save_png never overwrites, it numbers a taken name.
        for img in images:
            meta = json.loads(img.info["svg_t2i"])
            written.append(save_png(img, os.path.join(args.out, f"{file_stem(prompt)}_{meta['seed']}.png"),
                                    img.info["svg_t2i"]))
        if args.n > 1:                          # the grid's metadata names the first seed and the count
            written.append(save_png(make_grid(images), os.path.join(args.out, f"{file_stem(prompt)}_grid.png"),
                                    json.dumps(dict(meta, seed=args.seed, n=args.n))))
    print("\n".join(written))


if __name__ == "__main__":
    main()
