"""train.py -- the training of SVG-T2I: four DiT stages, and the autoencoder stages that come before them.

Every other file is a part; this one is the assembly line (paper §3.3, §4). At every optimizer step a DiT stage:

  1. turns each image into a DINOv3 latent x1 [C, h, w], normalised per channel (dino.py, "From pixels to the
     DiT's latent"), and each caption (a system prompt in front, 1 in 10 dropped to "" for classifier-free
     guidance) into Gemma-2 features [L, D]; both encoders are frozen;
  2. draws a flow time t and noise x0 and regresses the Next-DiT's velocity at x_t = t·x1 + (1 − t)·x0 onto the
     straight line's x1 − x0 (flow.flow_matching_loss; t = 0 is noise, t = 1 data: the reverse of minRF, SD3);
  3. clips the gradient, takes an AdamW step, and updates the EMA copy of the weights that sampling uses.

Stage 1 trains at 256 px, stage 2 at 512 px, stage 3 at 1024 px; stage 4 is the SFT stage (supervised
fine-tuning: the same loss, a short stage on a small curated set) at 1024 px. Stage K > 1 starts from stage K-1's
final weights with a fresh optimizer. An autoencoder stage (`--autoencoder P|R`) trains the pixel decoder.

Reading order: the stage table; `train_dit`, then the steps it calls, in order; `train_autoencoder` alike; `main`
runs one stage, or with --demo all: autoencoder P, then DiT 1-4 (SFT on shapes:clean). A
`machinery.` call is what a first reading can skip (machinery.py: processes, files, checkpoints, DDP/FSDP, caches).
"""

import argparse
import os
import time

import torch
from tqdm import tqdm

import data
import dino
import flow
import machinery
import model as dit_lib
import sample
import text

# ----- The stage table --------------------------------------------------------------------------------
# Read it like nanoGPT's config block: a preset fixes every network's size and the resolution ladder, a stage picks
# one rung. README "Training" says why a ladder, and lists the official defaults (KlingTeam/SVG-T2I) used here.

LR, BETAS, ADAM_EPS, WEIGHT_DECAY, GRAD_CLIP = 2e-4, (0.9, 0.95), 1e-15, 0.0, 2.0    # AdamW: dit_optimizer says why
CAPTION_DROPOUT = 0.1                 # whole caption (system prompt included) -> "" = just [BOS]
AE_LR, AE_BETAS, AE_DISC_START = 1e-4, (0.5, 0.9), 2500   # the autoencoder's Adams; its GAN on after 2,500 steps

_RELEASED = dict(
    dino=None, gemma=None,                       # the real encoders: --dino, --gemma, --stats
    dit_res=(256, 512, 1024, 1024),              # stage 1, 2, 3, 4 (SFT)
    dit_steps=(120_000, 120_000, 60_000, 10_000),  # a guide: the release's are not published
    micro_batch=(16, 8, 2, 2), global_batch=(512, 512, 128, 128),
    ae_res=(256, 512, 1024), ae_steps=(100_000, 50_000, 20_000), ae_micro_batch=(64, 64, 3),
    ae_crop=("random", "random", "bucket"),     # per GPU on 8, as the release's configs (README "Training")
    decoder=dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2),
    max_cap_len=text.MAX_LENGTH_TRAIN,           # what the official training really used (text.py says why)
    ema_decay=0.9999,                            # a 10k-step horizon (the official 0.95 is ~20 steps)
    compile=True, sample=flow.RELEASE_SAMPLER,   # torch.compile the DiT; config.json's sampler: the official one
    finetune=dict(lora_lr=1e-4),                 # --init-from / --lora: steps from the table; LoRA's usual rate
    preview_every=5000, log_every=10,
)

PRESETS = {
    "2B": dict(_RELEASED, dit="2B"),
    "0.8B": dict(_RELEASED, dit="0.8B"),
    # The CPU demo (README "The demo"): every network small, encoders random. 8-px DINOv3 patches: a 128-px image
    # is a 16x16 latent grid as at the real stage 1, which the DiT's patch 2 makes 8x8 = 64 tokens (the 2B: 256).
    "demo": dict(
        dit="demo",
        dino=dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, ffn_layer="mlp", ffn_ratio=4.0,
                  n_storage_tokens=4, qkv_bias=True, layerscale_init=1.0, pos_embed_rope_base=100.0),
        gemma=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                   vocab_size=512),
        # Half the DiT's steps go to the SFT stage (on shapes:clean): README "The demo" measures why.
        dit_res=(64, 96, 128, 128), dit_steps=(1200, 400, 500, 2250), lr=5e-4,   # small model: 2.5x the official lr
        micro_batch=(32, 32, 32, 32), global_batch=(32, 32, 32, 32),
        ae_res=(64, 128), ae_steps=(700, 150), ae_micro_batch=(16, 8), ae_crop=("random", "random"),
        decoder=dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1),
        residual=dict(embed_dim=64, depth=2, num_heads=4, img_size=128),
        max_cap_len=64, ema_decay=0.998, compile=False,     # on 2 CPU cores compiling costs more than it saves
        sample=dict(steps=20, cfg=3.0, solver="dpm", shift=3.0),   # CFG 3: squarer squares than 4 (README)
        # --init-from / --lora (README "Fine-tuning", the star exercise): a short stage; LoRA at a higher rate.
        # LoRA: 350 steps at 5e-3 beat 600 at 2e-3 (stars 0.825 vs 0.775 on seed 0, 4 min 10 s vs 8 min 12 s);
        # with data.py's 45% stars: 0.975 on seeds 0-1, 3 min 51 s (README, the star exercise)
        finetune=dict(steps=600, lr=5e-4, lora_steps=350, lora_lr=5e-3),
        preview_every=500, log_every=10,
    ),
}


# ----- One DiT stage -----------------------------------------------------------------------------------

def train_dit(args, preset, rank, world, device):
    """DiT stage `args.stage` in the run folder `args.out`: start (from the seeded initialisation, from stage
    K-1's result, or resumed from this stage's latest/), take the optimizer steps, write the result."""
    args = machinery.finetune_args(args, preset, rank)   # --init-from / --lora: their defaults, files and checks
    k, run_dir = args.stage, args.out
    stage_dir, res = os.path.join(run_dir, f"stage{k}"), preset["dit_res"][k - 1]
    max_steps, global_batch, micro, accum = machinery.dit_batch_plan(args, preset, world)
    latest, settings = machinery.resume_point(stage_dir, args, rank, dict(
        seed=args.seed, global_batch=global_batch, **machinery.finetune_settings(args)))
    frozen = machinery.open_encoders(args, preset, rank, device, make_random_encoders)   # frozen DINOv3, Gemma-2
    cfg = dict(dit_lib.NEXTDIT_CONFIGS[preset["dit"]], in_channels=frozen.dino.embed_dim,   # small presets take
               cap_feat_dim=frozen.gemma.config["hidden_size"])                            # widths from the encoders
    patch = frozen.dino.patch_size * cfg["patch_size"]       # one DiT token's side in pixels: buckets count these
    dataset = machinery.open_dit_dataset(args, res, patch, latest, settings, frozen, rank, world, device)
    machinery.check_previous_stage(run_dir, k, cfg, args.preset, latest)

    # The sampler hands each rank its share of a step's global batch (micro x accum images), which the loop cuts
    # into `accum` micro-batches: accumulating gradients over them equals one big batch.
    sampler = data.BucketBatchSampler(dataset, micro * accum, rank=rank, world_size=world, seed=args.seed + 100 * res)
    model, ema, step, trainer = machinery.start_dit(cfg, args, latest, sampler, rank, device)
    wrapped = machinery.wrap_dit(model, ema, args.fsdp, world, device)          # DDP, FSDP or the model itself
    optimizer = dit_optimizer(model, args.lr if args.lr is not None else preset.get("lr", LR))
    machinery.load_optimizer_state(model, optimizer, trainer, latest)         # a resume: AdamW's moments too
    fwd, compiles = machinery.maybe_compile(wrapped, preset["compile"] if args.compile is None else args.compile)
    shift = flow.resolution_shift((res // patch) ** 2)               # image tokens at this stage -> s
    batches, counts = machinery.batches_forever(dataset, sampler, args.workers, device)
    preview_every = args.preview_every if args.preview_every is not None else preset["preview_every"]

    bar = tqdm(total=max_steps, initial=step, desc=f"stage {k} @ {res}px", disable=rank != 0, dynamic_ncols=True)
    t0, seen = time.time(), 0
    model.train()
    while step < max_steps:
        optimizer.zero_grad(set_to_none=True)
        batch, weight = next(batches)                  # this rank's micro x accum images
        # One generator per sample, keyed by its place in the global batch: its caption dropout, t and noise.
        gens = machinery.keyed_generators(args.seed, k, step, rank * micro * accum, len(batch["captions"]))
        loss_sum = torch.zeros((), device=device)      # this step's loss, added up on the device
        for i in range(accum):
            part, part_gens, part_weight = machinery.micro_batch(batch, gens, weight, i, micro)
            x1, *caption = dit_inputs(frozen, part, part_gens)     # [b, C, h, w]; features [b, L, D], mask [b, L]
            # DDP/FSDP communicate gradients only on the last micro-step; the others just accumulate locally.
            with machinery.grad_sync(wrapped, sync=i == accum - 1):
                # bf16 on CUDA only, fp32 master weights either way; / accum: the big batch's mean gradient
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = flow.flow_matching_loss(fwd, x1, part_gens, shift, *caption) * (part_weight / accum)
                loss.backward()
            loss_sum += loss.detach()                  # no .item(): it would wait for the GPU every micro-step
            seen += len(x1) * world
        grad_norm = machinery.clip_gradients(model, GRAD_CLIP)     # the whole gradient's norm, before clipping
        optimizer.step()
        step += 1
        update_ema(ema, model, preset["ema_decay"], step)
        bar.update(1)

        if step % preset["log_every"] == 0 or step == max_steps:
            row = machinery.dit_log_row(k, step, loss_sum, grad_norm, seen / (time.time() - t0), counts, compiles(),
                                        world)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
            machinery.append_log(run_dir, rank, row)
            t0, seen = time.time(), 0
        if step % args.ckpt_every == 0 or step == max_steps:
            machinery.save_dit_checkpoint(stage_dir, rank, model, ema, optimizer, sampler, step, settings)
        if preview_every and (step % preview_every == 0 or step == max_steps):
            machinery.write_preview(run_dir, ema, cfg, args.fsdp, k, step, res, rank, device, PREVIEW_PROMPTS)
    bar.close()
    (machinery.finish_lora if args.lora else machinery.finish_dit)(stage_dir, model, ema, cfg, rank, config=dict(
        stage=k, resolution=res, steps=step, global_batch=global_batch, preset=args.preset, dit=cfg,
        sample=dict(preset["sample"], size=res), max_cap_len=preset["max_cap_len"], data=args.data, seed=args.seed,
        **machinery.finetune_config(args)))


def make_random_encoders(folder, preset, seed):
    """The small presets' frozen encoders, random, made once in the released file layouts (so the real loading
    code reads them): a sentencepiece tokenizer trained on the shapes' captions and system prompts, a small Gemma-2
    and a small DINOv3. Random is enough: the DiT learns from any features that tell captions and pictures apart."""
    gemma_dir = os.path.join(folder, "gemma")
    os.makedirs(gemma_dir, exist_ok=True)
    torch.manual_seed(seed)
    captions = data.all_captions() + [text.SYSTEM_PROMPTS[k] for k in text.SYSTEM_PROMPTS]
    tok_path = text.train_tokenizer(captions, os.path.join(gemma_dir, "tokenizer.model"), preset["gemma"]["vocab_size"])
    text.save_gemma2(text.Gemma2Encoder(**dict(preset["gemma"], vocab_size=text.Tokenizer(tok_path).vocab_size)),
                     gemma_dir)
    dino.save_dinov3(dino.DINOv3(**preset["dino"]), os.path.join(folder, "dino.safetensors"))


def dit_inputs(frozen, batch, gens):
    """A micro-batch -> x1 [b, C, h, w] (DINOv3 latents, normalised per channel), caption features [b, L, D] (fp32)
    and mask [b, L]; each caption dropped to "" (the unconditional input of classifier-free guidance) with
    probability CAPTION_DROPOUT, its sample's first draw. --cache-features: the encoders' outputs are read back."""
    keep = [torch.rand(1, generator=g).item() >= CAPTION_DROPOUT for g in gens]
    to_device = lambda x: x.to(frozen.device, non_blocking=True)     # the host queues the copy and goes on
    if "latents" in batch:
        x1 = frozen.stats.normalize(to_device(batch["latents"]))
        cap_feats, cap_mask = text.pad_features([to_device(f) if kept else frozen.empty_feats
                                                 for f, kept in zip(batch["cap_feats"], keep)])
    else:
        x1 = frozen.stats.normalize(dino.images_to_latents(frozen.dino, to_device(batch["images"])))
        cap_feats, cap_mask = frozen.encode_captions([text.format_prompt(c, system) if kept else "" for c, system, kept
                                                      in zip(batch["captions"], batch["systems"], keep)])
    return x1, cap_feats.float(), cap_mask


def dit_optimizer(model, lr):
    """AdamW over the trainable weights, built after wrapping (fully_shard replaces each parameter by its shard).
    AdamW steps each weight by lr · m / (√v + eps), m and v running means of its gradient and squared gradient.
    beta2 0.95 (default 0.999) makes v a mean over ~1/(1 − 0.95) = 20 steps, not 1,000: when the gradient's scale
    jumps (a loss spike, a new stage's resolution) the denominator catches up within tens of steps, where a stale,
    small v would let too large steps go on for hundreds -- the usual choice for large-batch transformers. eps
    1e-15 (default 1e-8) keeps the step independent of the gradient's scale: under 1e-8 a weight whose gradient
    RMS is 1e-8 would take half its step, at 1e-9 a tenth, and a batch of 512 shrinks gradient noise √512 ≈ 23x.
    The moments are fp32 even under bf16 autocast (fp32 master weights), where 1e-15 is a normal number."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=BETAS,
                             eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """ema ← decay·ema + (1 − decay)·model after every step: the weights sampling uses, an average over the last
    ~1/(1 − decay) steps (10,000 at 0.9999) that smooths out the step-to-step noise a constant learning rate leaves
    in the weights. The decay warms up as (1 + step) / (10 + step): a short run forgets its random init."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:                      # a frozen weight equals its EMA already (--lora: the whole base)
            e.lerp_(p.detach().float(), 1 - decay)   # under FSDP both are DTensor shards cut alike: no gathers


# ----- One autoencoder stage ---------------------------------------------------------------------------
# The decoder (and, for R, the residual ViT) learns to invert the frozen DINOv3 as the official recipe does
# (KlingTeam/SVG-T2I `autoencoder/ldm/models/dinov3_decoder_imagenet.py`): a generator, then a discriminator update.

def train_autoencoder(args, preset, rank, world, device):
    """Autoencoder stage `args.stage` of kind `args.autoencoder` (P or R) in the run folder `args.out`."""
    k, kind, run_dir = args.stage, args.autoencoder, args.out
    stage_dir = os.path.join(run_dir, f"autoencoder_{kind}", f"stage{k}")
    res, max_steps, micro = machinery.autoencoder_plan(args, preset)
    latest, settings = machinery.resume_point(stage_dir, args, rank, dict(seed=args.seed, global_batch=micro * world))
    # "random": the official 256/512-px crops (shorter side to res, a random square); "bucket": as the DiT stages.
    random_crops = preset["ae_crop"][k - 1] == "random"
    dino_model = machinery.open_dino(args, preset, rank, device, make_random_encoders)   # frozen, as in a DiT stage
    dataset = machinery.open_data(args, res, dino_model.patch_size, latest, settings, rank, world, square=random_crops)
    sampler = data.BucketBatchSampler(dataset, micro, rank=rank, world_size=world, seed=args.seed + 100 * res)
    # The seeded decoder (and R's residual ViT), the loss with its discriminator, an Adam each; or resumed
    ae, loss_fn, opt_g, opt_d, step = machinery.start_autoencoder(dino_model, args, preset, latest, sampler, rank,
                                                                  device, AE_LR, AE_BETAS, AE_DISC_START)
    batches, counts = machinery.batches_forever(dataset, sampler, args.workers, device)

    bar = tqdm(total=max_steps, initial=step, desc=f"autoencoder {kind} stage {k} @ {res}px", disable=rank != 0)
    ae.train()                                    # the decoder trains; Autoencoder.train keeps DINOv3 in eval
    while step < max_steps:
        batch, weight = next(batches)
        images = batch["images"]                  # [B, 3, H, W], or with random crops a list of [3, >=res, >=res]
        if random_crops:                          # crop positions keyed by step, as a DiT stage's draws
            gens = machinery.keyed_generators(args.seed, k, step, rank * micro, len(images))
            images = data.random_square_crops(images, res, gens)
        losses = autoencoder_step(ae, loss_fn, opt_g, opt_d, images.to(device, non_blocking=True), weight, step, world)
        step += 1
        bar.update(1)
        if step % preset["log_every"] == 0 or step == max_steps:   # read back to the host once per log interval
            row = machinery.autoencoder_log_row(kind, k, step, losses, counts, world)
            bar.set_postfix(l1=f"{row['l1']:.4f}")
            machinery.append_log(run_dir, rank, row)
        if step % args.ckpt_every == 0 or step == max_steps:
            machinery.save_autoencoder_checkpoint(stage_dir, rank, ae, loss_fn, opt_g, opt_d, sampler, step, settings)
    bar.close()
    machinery.finish_autoencoder(stage_dir, ae, rank, kind, k)


def autoencoder_step(ae, loss_fn, opt_g, opt_d, images, weight, step, world):
    """One iteration, as the official Lightning loop: a generator update, then (once the GAN is on) a
    discriminator update on the detached reconstructions. images [B, 3, H, W] in [-1, 1] are both the encoder's
    input and the loss target. Returns the losses as tensors on the device."""
    recon = ae(images)                        # encode (DINOv3 frozen, no grad) then decode: [B, 3, H, W]
    loss_g, losses = loss_fn.generator_loss(recon, images, step, last_layer=ae.decoder.conv_out.weight)
    opt_g.zero_grad(set_to_none=True)
    (loss_g * weight).backward()
    machinery.average_gradients(opt_g, world)
    opt_g.step()
    if loss_fn.disc_active(step):             # before disc_start the discriminator loss is exactly 0
        loss_d, losses_d = loss_fn.discriminator_loss(recon.detach(), images, step)
        opt_d.zero_grad(set_to_none=True)
        (loss_d * weight).backward()
        machinery.average_gradients(opt_d, world)
        opt_d.step()
        losses.update(losses_d)
    return losses


def main(argv=None):
    args = parse_args(argv)                       # every flag checked before any work (parse_args, below)
    preset = PRESETS[args.preset]
    rank, world, device = machinery.setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda"   # TF32 on CUDA
    # Initial weights come from `seeded` and the training draws from their own generators; the global RNG, seeded
    # per rank, is left for what else draws from it (DataLoader worker seeds), so that is reproducible too.
    torch.manual_seed(args.seed * 1000 + rank)
    with machinery.run_session(args, rank):       # the run folder's lock; a user's error becomes one line
        if args.demo:                             # every stage: autoencoder P, then DiT 1-4 (SFT on shapes:clean)
            stage = lambda **changes: argparse.Namespace(**{**vars(args), **changes})
            for k, steps in enumerate(preset["ae_steps"], start=1):
                if steps:
                    train_autoencoder(stage(stage=k, autoencoder="P"), preset, rank, world, device)
            for k in range(1, 5):
                data_k = "shapes:clean" if k == 4 and args.data == "shapes" else args.data
                train_dit(stage(stage=k, data=data_k), preset, rank, world, device)
        elif args.autoencoder:
            train_autoencoder(args, preset, rank, world, device)
        else:
            train_dit(args, preset, rank, world, device)
        if args.export and rank == 0:
            machinery.export(args.out, args.export)


# ==========================================================================================================
# The command line. A first reading can skip everything below: the test preset, the preview prompts, the flags.
# ==========================================================================================================

# The preset the tests train (seconds per stage), and the prompts of the preview grids a stage draws every
# `preview_every` steps (machinery.write_preview).
PRESETS["tiny"] = dict(
    dit="tiny",
    dino=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, ffn_layer="mlp", ffn_ratio=2.0,
              n_storage_tokens=4, qkv_bias=True, layerscale_init=1.0, pos_embed_rope_base=100.0),
    gemma=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
               vocab_size=512),
    dit_res=(32, 32, 64, 64), dit_steps=(20, 10, 10, 10),
    micro_batch=(4, 4, 4, 4), global_batch=(4, 4, 4, 4),
    ae_res=(32, 32, 64), ae_steps=(20, 10, 10), ae_micro_batch=(4, 4, 4), ae_crop=("random", "random", "bucket"),
    decoder=dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    residual=dict(embed_dim=32, depth=1, num_heads=2, img_size=64),
    max_cap_len=64, ema_decay=0.9, compile=False,
    sample=dict(steps=4, cfg=2.0, solver="dpm", shift=1.0),
    preview_every=0, log_every=5,
)

PREVIEW_PROMPTS = ["a red circle in the top left", "a blue square in the center",
                   "a yellow triangle in the bottom right", "a green square in the top right and a purple "
                   "circle in the bottom left"]


def parse_args(argv=None):
    # Every number is checked here, before any work: 0 steps or a NaN rate mean nothing (never "the default").
    positive, natural = sample.number(int, minimum=1), sample.number(int, minimum=0)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Stages: DiT 1=256px 2=512px 3=1024px 4=SFT@1024px; autoencoder 1=256 2=512 "
                                       "3=1024 (small presets scale these down; see PRESETS in train.py).")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="which stage to train (required unless --demo)")
    p.add_argument("--autoencoder", choices=("P", "R"), help="train the pixel decoder (P) or decoder + residual ViT (R) "
                   "instead of the DiT")
    p.add_argument("--data", default="shapes", help="a JSONL file of {path, prompt}, an image folder with .txt "
                   "captions, or 'shapes' / 'shapes:clean' (the built-in procedural dataset) / 'shapes:star' (with stars, for "
                   "fine-tuning: README 'Fine-tuning')")
    p.add_argument("--out", required=True, help="the run folder; every stage of one model lives in the same one")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model sizes and resolution ladder")
    p.add_argument("--max-steps", type=positive, help="optimizer steps for this stage (default: the stage table)")
    p.add_argument("--global-batch-size", type=positive, help="images per optimizer step over all processes, a "
                   "multiple of micro batch x processes; larger than that means gradient accumulation")
    p.add_argument("--micro-batch-size", type=positive, help="images per process per forward pass")
    p.add_argument("--ckpt-every", type=positive, default=500, help="write RUN_DIR/stage{K}/latest/ every N steps")
    p.add_argument("--preview-every", type=natural, help="sample a preview grid every N steps (0: never)")
    p.add_argument("--seed", type=natural, default=0, help="seeds the data order, t, noise and caption dropout")
    p.add_argument("--force-resume", action="store_true", help="continue a stage's latest/ checkpoint even though "
                   "--seed, --global-batch-size or the data (paths, captions) differ from the run that wrote it "
                   "(refused otherwise: the result would be neither run)")
    p.add_argument("--lr", type=sample.number(float, minimum=0), help=f"AdamW learning rate, constant, no warm-up "
                   f"(default {LR} as official; the demo preset uses its own)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the DiT (default for the 2B/0.8B presets)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the DiT eagerly (default for the small presets: on a CPU, compiling costs minutes)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute joint blocks in backward (saves memory)")
    p.add_argument("--fsdp", action="store_true", help="DiT stages: shard weights, gradients, AdamW and EMA over the "
                   "processes (FSDP2 fully_shard, one group per block; bf16 weights / fp32 gradient reduction on CUDA) "
                   "instead of DDP's full copies; for the 2B model. The autoencoder always uses plain averaging")
    p.add_argument("--data-limit", type=positive, metavar="N", help="use only the first N items of --data (an "
                   "epoch is then N items; the shapes data has 100,000)")
    p.add_argument("--cache-features", metavar="DIR", help="DiT stages: run the frozen DINOv3 and Gemma-2 over the "
                   "stage's data once, store their outputs under DIR (safetensors shards, fp32 latents: "
                   "C x (res/patch)^2 x 4 bytes per image) and train from them; pays off from the second epoch")
    p.add_argument("--workers", type=natural, default=2, help="DataLoader worker processes per rank")
    p.add_argument("--dino", help="DINOv3 weights (.pth or HF folder) for the released presets")
    p.add_argument("--gemma", help="Gemma-2-2B folder (config.json, *.safetensors, tokenizer.model)")
    p.add_argument("--stats", help="latent statistics file (.pt with mean/std); computed once if omitted")
    p.add_argument("--lpips", help="LPIPS v0.1 vgg.pth for the autoencoder loss (without it: L1 + GAN only)")
    p.add_argument("--vgg", help="torchvision vgg16 .pth for LPIPS")
    p.add_argument("--demo", action="store_true", help="walk every stage of the preset: autoencoder P stages, then "
                   "DiT 1..4 (stage 4 on shapes:clean when --data is shapes)")
    p.add_argument("--init-from", metavar="PATH", help="DiT stages: start from these weights instead of the seeded "
                   "initialisation or stage K-1 (model and EMA from the source's EMA weights): the released DiT (a "
                   "folder with consolidated.00-of-01.pth, or the file), a run or stage folder of this project, or an "
                   "export such as assets/demo; its encoders and decoder are copied into --out. A resume continues "
                   "from latest/ as usual")
    p.add_argument("--partial-load", action="store_true", help="with --init-from: load the keys whose names and "
                   "shapes fit and keep the fresh initialisation for the rest (reported), instead of refusing a "
                   "source of another architecture")
    p.add_argument("--lora", type=positive, metavar="RANK", help="DiT stages: freeze the base (the --init-from "
                   "source, else stage K-1) and train rank-RANK adapters (LoRA); the stage writes "
                   "stage{K}/adapter.safetensors. Not with --fsdp")
    p.add_argument("--lora-alpha", type=sample.number(float, above=0), help="LoRA scale numerator: the update is "
                   "(alpha / rank) * B A (default: alpha = rank, scale 1)")
    p.add_argument("--lora-targets", metavar="NAMES", help="comma-separated ends of the Linear module names to "
                   f"adapt (default: {','.join(dit_lib.LORA_TARGETS)}: attention qkv and out, SwiGLU w1 w2 w3 of "
                   "every joint and refiner block)")
    p.add_argument("--export", metavar="DIR", help="after training, copy the files sample.py needs to DIR "
                   "(`--demo --export assets/demo` rebuilds the shipped demo). DIR must be new, empty or an "
                   "earlier export (it holds export.json); an earlier export is replaced only once the new one "
                   "is complete")
    args = p.parse_args(argv)
    if not args.demo and args.stage is None:
        raise SystemExit("pass --stage K (1-4), or --demo to walk every stage")
    if (args.init_from or args.lora) and (args.demo or args.autoencoder):
        raise SystemExit("--init-from and --lora start one DiT stage: pass --stage K, not --demo or --autoencoder")
    if args.autoencoder and args.fsdp and not args.demo:
        raise SystemExit("--fsdp shards the DiT only; the autoencoder is small and trains without it")
    if args.export:                               # refused now, not after hours of training
        machinery.check_export_dest(args.out, args.export)
    return args


if __name__ == "__main__":
    main()
