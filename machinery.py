"""machinery.py -- what train.py leans on that is not the training itself, and a first reading can skip.

train.py holds the idea: the stage table, the loops, the steps in the order they run. Each `machinery.` call
there is one of these: processes and devices (torchrun, NCCL/gloo, DDP, FSDP2); files written so that a kill at
any moment loses nothing (atomic files, latest/ checkpoints, the checks a resume must pass); making and loading
the frozen encoders' files; the data's hash, the feature cache and the DataLoader; torch.compile over many
shapes; previews; the stage's result files and export; fine-tuning's files (--init-from, --lora); the run
folder's lock; one line for a user's error. Nothing here changes the maths: README "Operations" tells what it
guarantees, tests/test_failsafe.py and tests/test_train.py check it. `setup_distributed` and `resolve` serve
sample.py as well (one copy each).
"""

# ==========================================================================================================
# The machinery of training. A first reading can skip everything below: processes, files, DDP/FSDP, caches.
# ==========================================================================================================

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import warnings

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import autoencoder as ae_lib
import data
import dino
import model as dit_lib
import text

# sample.py imports this file (setup_distributed, resolve), so this one imports sample.py inside the functions
# that use it (previews, export, --init-from): a module-level import both ways would load sample.py twice when it
# is the script being run.


# ----- The run: one per run folder, one line per user error ---------------------------------------------

@contextlib.contextmanager
def run_session(args, rank, program="train.py"):
    """The body of train.py's main: the run folder made and locked (a second run on it stops at once), and an
    encoders.json of another --preset refused before anything else. Every check in this code base raises
    ValueError (bad data, a bad or truncated file, a wrong kind) or an OSError (a missing file, no permission, a
    full disk): the user's to fix, so one line says what. Any other exception is a bug and keeps its traceback."""
    lock = None
    try:
        os.makedirs(args.out, exist_ok=True)
        lock = lock_run_folder(args.out, rank)
        encoders = os.path.join(args.out, "encoders.json")
        if os.path.exists(encoders):
            check_encoders_json(read_json(encoders), encoders, args.preset)
        yield
        # Leave together: a rank that tears down its gloo threads while a peer is still finishing its last
        # collective can abort at exit ("terminate called without an active exception", seen once in CI).
        barrier()
    except (ValueError, OSError) as err:
        raise SystemExit(f"{program}: {err}") from None
    except KeyboardInterrupt:                     # Ctrl-C: latest/ holds the last checkpoint, intact
        print(f"{program}: interrupted; resume with the same command", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        if lock is not None:
            unlock_run_folder(lock)
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve(folder, path):
    """A path as a run folder's files write it (encoders.json, a stage's config.json): absolute, or relative to
    `folder`, the folder holding them. None stays None (no statistics file, say)."""
    return path if path is None or os.path.isabs(path) else os.path.join(folder, path)


# ----- A stage's plan: batch sizes, the resume point, the data ----------------------------------------------

def dit_batch_plan(args, preset, world):
    """(optimizer steps, global batch, micro batch, accumulation steps) of this stage: the flags given, else the
    stage table. One optimizer step = `accum` micro-batches per rank x `world` ranks = the global batch."""
    pick = lambda flag, table: table[args.stage - 1] if flag is None else flag
    max_steps = pick(args.max_steps, preset["dit_steps"])
    global_batch = pick(args.global_batch_size, preset["global_batch"])
    if global_batch < world:
        raise SystemExit(f"--global-batch-size {global_batch} is smaller than the {world} processes: each needs at "
                         f"least one image per step; pick a multiple of {world}")
    micro = min(pick(args.micro_batch_size, preset["micro_batch"]), global_batch // world)
    if global_batch % (micro * world):
        raise SystemExit(f"--global-batch-size {global_batch} is not a multiple of micro batch {micro} x "
                         f"{world} processes; pick a multiple of {micro * world}")
    return max_steps, global_batch, micro, global_batch // (micro * world)


def autoencoder_plan(args, preset):
    """(resolution, optimizer steps, images per process per step) of an autoencoder stage."""
    k = args.stage
    if k > len(preset["ae_res"]):
        raise SystemExit(f"the autoencoder has stages 1-{len(preset['ae_res'])}; got --stage {k}")
    max_steps = args.max_steps if args.max_steps is not None else preset["ae_steps"][k - 1]
    micro = args.micro_batch_size if args.micro_batch_size is not None else preset["ae_micro_batch"][k - 1]
    return preset["ae_res"][k - 1], max_steps, micro


def resume_point(stage_dir, args, rank, settings):
    """(this stage's latest/ or None, `settings`). A finished stage is never trained over, and a resumed one must
    go on as it began: `settings` (seed, global batch, ...) are checked against latest/'s now, before any heavy
    work; the data's hash joins them once the data is open (open_data)."""
    latest = find_latest(stage_dir)
    refuse_to_overwrite(stage_dir, latest)
    check_resume(args, latest, settings, rank)
    return latest, settings


def open_data(args, res, patch, latest, settings, rank, world, square=False):
    """The stage's dataset (data.open_dataset), its hash the same on every rank and, on a resume, the same as the
    run that wrote latest/ -- checked before the latent statistics or the feature cache cost any time."""
    dataset = data.open_dataset(args.data, res, seed=args.seed, patch=patch, limit=args.data_limit, square=square)
    settings["data"] = same_on_every_rank(data_hash(dataset), "--data", world)
    check_resume(args, latest, dict(data=settings["data"]), rank)
    return dataset


def open_dino(args, preset, rank, device, make_random_encoders):
    """The run's frozen DINOv3 alone (an autoencoder stage): encoders.json made once, its DINOv3 file loaded."""
    paths = prepare_encoders(args.out, preset, args, rank, make_random_encoders)
    return load_encoders(args.out, paths, device)[0]


def open_encoders(args, preset, rank, device, make_random_encoders):
    """The run's FrozenEncoders: encoders.json made once (prepare_encoders), the files it names loaded."""
    paths = prepare_encoders(args.out, preset, args, rank, make_random_encoders)
    return FrozenEncoders(*load_encoders(args.out, paths, device), preset["max_cap_len"], device, paths)


class FrozenEncoders:
    """The frozen half of the pipeline, loaded: DINOv3, Gemma-2 with its tokenizer, and (once the data is open)
    the latent statistics. train.dit_inputs turns a batch into the DiT's inputs with them. Nothing here trains."""

    def __init__(self, dino_model, gemma, tokenizer, max_cap_len, device, paths):
        self.dino, self.gemma, self.tokenizer = dino_model, gemma, tokenizer
        self.max_cap_len, self.device, self.paths = max_cap_len, device, paths
        self.stats = None                         # set once the data is open (open_dit_dataset)
        # A dropped caption is the empty prompt: [BOS] alone, the same features every time.
        feats, mask = self.encode_captions([""])
        self.empty_feats = feats[0, :int(mask.sum())]                          # [1, D]

    def encode_captions(self, texts):
        """Formatted captions -> Gemma features [B, L, D], mask [B, L] (L padded to a multiple of 8)."""
        return text.encode_prompts(self.gemma, self.tokenizer, texts, self.max_cap_len)


def open_dit_dataset(args, res, patch, latest, settings, frozen, rank, world, device):
    """A DiT stage's dataset (open_data: its hash checked before anything costs time), the latent statistics
    over it put into `frozen`, and under --cache-features the FeatureCache that yields the encoders' outputs."""
    dataset = open_data(args, res, patch, latest, settings, rank, world)
    frozen.stats = prepare_stats(args.out, frozen.paths, frozen.dino, dataset, device, rank)
    if args.cache_features:
        dataset = open_feature_cache(args, args.out, frozen.paths, dataset, res, patch, frozen, device, rank, world)
    return dataset


def batches_forever(dataset, sampler, workers, device):
    """((batch, loss weight) forever, counts of unreadable files) for a stage's loop: epoch_batches over the
    DataLoader. pin_memory on CUDA: batches arrive in page-locked memory, from which the host-to-device copies
    run asynchronously."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    counts = dict(skipped=set(), new=set())
    return epoch_batches(loader, sampler, counts), counts


def epoch_batches(loader, sampler, counts):
    """(batch, weight) forever, epoch after epoch.

    Counts what the training loop consumed (not what the loader prefetched) so a resumed run starts at the
    right batch, and adds up unreadable images in counts['skipped']. If every image of a micro-batch was
    unreadable, the previous batch stands in with loss weight 0: each rank must still run the same number
    of forward/backward passes, or DDP would wait forever for the one that skipped. A whole epoch's worth of
    batches in a row without one readable image would loop forever: that stops the run instead."""
    last, unusable = None, 0
    while True:
        for batch in loader:
            sampler.batches_done += 1
            counts["new"].update(batch["dropped_files"])
            if batch["captions"]:
                last, unusable = batch, 0
                yield batch, 1.0
                continue
            unusable += 1
            if unusable >= len(sampler):
                raise ValueError(f"--data: not one image could be read in a whole epoch ({unusable} batches in a "
                                 f"row, {len(counts['skipped'] | counts['new'])} unreadable images); the warnings "
                                 "above name the files")
            if last is not None:
                yield last, 0.0
        sampler.set_epoch(sampler.epoch + 1)      # a new epoch: the sampler reshuffles by (seed, epoch)


def keyed_generators(seed, stage, step, first, n):
    """n CPU generators for the samples first, first + 1, ... of a step's global batch, each seeded by (seed,
    stage, step, index in the global batch) alone. What is drawn from them -- caption dropout, t and noise in a
    DiT stage, crop positions in an autoencoder stage -- is then the same whatever the number of processes or
    the gradient accumulation, and a resumed run continues exactly without any RNG state. CPU generators on
    every device: a dropout decision is read on the host without waiting for the GPU, and the numbers do not
    depend on the device. The index takes the low 20 bits: up to 1,048,576 samples per global batch."""
    base = (((seed * 7919 + stage) * 1_000_003 + step) << 20) + first
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def micro_batch(batch, gens, weight, i, micro):
    """Micro-batch i of this rank's share: its items, their generators, its loss weight. Unreadable images can
    leave the share short; a micro-step left with nothing reruns micro-batch 0 with weight 0, because every rank
    must run the same number of forward/backward passes (DDP would wait forever for one that skipped)."""
    part = slice(i * micro, (i + 1) * micro)
    if not batch["captions"][part]:
        part, weight = slice(0, micro), 0.0
    return {key: value[part] for key, value in batch.items() if not key.startswith("dropped")}, gens[part], weight


# ----- Where a DiT stage starts, and what runs forward --------------------------------------------------

def start_dit(cfg, args, latest, sampler, rank, device):
    """(model, EMA, step, saved trainer state or None) where this stage starts: this stage's latest/ (a resume,
    exactly: weights, EMA, the sampler's position, the step, this rank's RNG), stage K-1's final weights (with a
    fresh optimizer), or the seeded initialisation.

    Every rank holds the same weights before wrapping (the seeded initialisation, or the same files), so DDP's
    broadcast of rank 0's changes nothing and fully_shard keeps each rank's slice of one model."""
    k, run_dir = args.stage, args.out
    with seeded(args.seed, "dit", k):            # initialised on the CPU, the same in every process
        model = dit_lib.NextDiT(**cfg).to(device)
        ema = dit_lib.NextDiT(**cfg).to(device).requires_grad_(False) if not args.lora else \
            lora_ema_shell(cfg)                  # --lora: the EMA will share the model's base (attach_adapters)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # `norm_final` is in the official model (KlingTeam/SVG-T2I `svg_t2i/models/model_dino.py` builds it, its
    # forward never calls it), kept so the released weights load key for key. No gradient ever reaches it, and
    # DDP would wait for one: freeze it.
    model.norm_final.requires_grad_(False)
    # --init-from: the source's weights (for --lora also on a resume: latest/ holds the adapters alone, so the
    # frozen base they sit on is loaded first); --lora: adapters attached, the base frozen.
    loaded = load_source_weights(model, args, latest, rank)
    if args.lora:
        attach_adapters(model, ema, args, rank, device)
    if latest:
        trainer = load_latest(latest, rank, model=model, ema=ema)     # weights, EMA, RNG; returns the rest
        sampler.load_state_dict(trainer["sampler"])
        log0(rank, f"stage {k}: resuming from {latest} at step {trainer['step']}")
        drop_log_rows_after(run_dir, rank, trainer["step"], stage=k)   # the steps after it are taken again
        return model, ema, trainer["step"], trainer
    if k > 1 and not loaded:
        prev = os.path.join(run_dir, f"stage{k - 1}", "model.safetensors")
        if not os.path.exists(prev):
            raise SystemExit(f"stage {k} starts from stage {k - 1}'s weights, but {prev} does not exist: "
                             f"run `train.py --stage {k - 1} --out {run_dir}` first")
        model.load_state_dict(dit_lib.load_nextdit(prev).state_dict())
        log0(rank, f"stage {k}: initialised from {prev}")
    ema.load_state_dict(model.state_dict())
    return model, ema, 0, None


def wrap_dit(model, ema, fsdp, world, device):
    """What runs forward and backward: the FSDP-sharded model (the EMA sharded alike, so that update_ema stays
    shard-local; `model` itself becomes the FSDP module), DDP around the model, or the model alone."""
    if fsdp:
        wrapped = shard_nextdit(model, device)
        shard_nextdit(ema, device)
        return wrapped
    return DDP(model) if world > 1 else model


def clip_gradients(model, max_norm):
    """Clip the whole gradient to norm `max_norm`; return its norm before clipping. Under FSDP each rank holds
    gradient shards (DTensors): clip_grad_norm_ reduces the squared shard norms across ranks, so it clips by,
    and returns, the norm of the whole gradient (as a DTensor, made a plain tensor here)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm


def average_gradients(optimizer, world):
    """Average the gradients of the optimizer's parameters over the ranks, by hand (the autoencoder stage): the two
    losses each run the discriminator more than once and take an autograd.grad for the adaptive weight, which
    DDP's hooks do not expect."""
    if world > 1:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world


# ----- A stage's log, checkpoints, previews and result -------------------------------------------------------

def append_log(run_dir, rank, row):
    """One JSON line in RUN_DIR/log.jsonl, written by rank 0."""
    if rank == 0:
        with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def dit_log_row(stage, step, loss_sum, grad_norm, images_per_s, counts, compiles, world):
    """One log.jsonl row. The loss is summed over ranks (every rank runs this), then read back to the host once
    per log interval; grad_norm is already the whole gradient's on every rank. `compiles`: graphs torch.compile
    has made in this process so far (0 when running eagerly)."""
    total_loss = total_over_ranks(loss_sum.clone()).item()
    return dict(stage=stage, step=step, loss=total_loss / world, grad_norm=grad_norm.item(),
                images_per_s=images_per_s, skipped_images=count_skipped(counts, world), compiles=compiles)


def autoencoder_log_row(kind, stage, step, losses, counts, world):
    """One log.jsonl row of an autoencoder stage: its losses read back to the host (once per log interval)."""
    return dict(autoencoder=kind, stage=stage, step=step, skipped_images=count_skipped(counts, world),
                **{n: v.item() for n, v in losses.items()})


def save_dit_checkpoint(stage_dir, rank, model, ema, optimizer, sampler, step, settings):
    """latest/ of a DiT stage. Weights, EMA and AdamW state are gathered whole (collectives under FSDP: every
    rank calls this); with them the sampler's position, the step, the settings and every rank's RNG state."""
    save_latest(stage_dir, rank, dict(
        weights=dict(model=trained_state(model), ema=trained_state(ema)),    # --lora: the adapters alone
        optimizer=full_optimizer_state(model, optimizer), sampler=sampler.state_dict(), step=step,
        settings=settings), dict(torch=torch.get_rng_state()))


def write_preview(run_dir, ema, cfg, fsdp, stage, step, res, rank, device, prompts):
    """A grid of `prompts` from the EMA weights, if a decoder exists yet (train one with --autoencoder P)."""
    import sample
    if fsdp:              # sampling needs whole weights: every rank helps gather the EMA into a plain model
        ema = plain_nextdit(cfg, full_state(ema))
    if rank != 0:
        return
    if dit_lib.lora_modules(ema):    # --lora: sample the merged copy; casting in place would touch the shared base
        ema = dit_lib.merge_lora(ema)
    try:
        # float32: the EMA itself is handed over, and load_pipeline casts in place (bf16 would round it for good)
        pipe = sample.load_pipeline(run_dir, device=device, dit_model=ema, dtype=torch.float32)
    except FileNotFoundError as e:
        if not getattr(write_preview, "warned", False):
            tqdm.write(f"no previews: {e}")
            write_preview.warned = True
        return
    images = pipe.generate(prompts, seed=0, size=(res, res), progress=False)
    os.makedirs(os.path.join(run_dir, "previews"), exist_ok=True)
    sample.make_grid(images).save(os.path.join(run_dir, "previews", f"stage{stage}_step{step:07d}.png"))


def finish_dit(stage_dir, model, ema, cfg, rank, config):
    """The stage's result in the form sample.py reads: model.safetensors, ema.safetensors, and config.json (what
    was trained, and the sampler settings and caption limit the model is meant for)."""
    model_state, ema_state = full_state(model), full_state(ema)      # every rank takes part
    if rank == 0:
        for name, state in (("model", model_state), ("ema", ema_state)):
            atomic_save(lambda tmp: dit_lib.save_nextdit(plain_nextdit(cfg, state), tmp),
                        os.path.join(stage_dir, f"{name}.safetensors"))
        atomic_json(config, os.path.join(stage_dir, "config.json"))
        log0(rank, f"stage {config['stage']} done: {stage_dir}/model.safetensors, ema.safetensors")
    barrier()


def start_autoencoder(dino_model, args, preset, latest, sampler, rank, device, lr, betas, disc_start):
    """(autoencoder, loss with its discriminator, Adam for each, step) where this stage starts: this stage's
    latest/ (a resume, exactly), the previous stage's decoder, or the seeded initialisation."""
    k, kind = args.stage, args.autoencoder
    residual = None
    with seeded(args.seed, "autoencoder", kind, k):   # the same initial weights on every rank, whatever ran before
        if kind == "R":   # the released R branch is a ViT-S/16; small presets shrink it and match the DINO patch
            residual = ae_lib.ResidualViT(**dict(ae_lib.RESIDUAL_VIT_CONFIG, **preset.get("residual", {}),
                                                 patch_size=dino_model.patch_size))
        z_channels = dino_model.embed_dim + (residual.out_dim if residual is not None else 0)
        decoder = ae_lib.Decoder(z_channels=z_channels, **preset["decoder"])
        ae = ae_lib.Autoencoder(dino_model, decoder, residual).to(device)
        loss_fn = ae_lib.AutoencoderLoss(lpips_path=args.lpips, vgg_path=args.vgg, disc_start=disc_start).to(device)
    opt_g = torch.optim.Adam(list(ae.trainable_parameters()), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(list(loss_fn.discriminator.parameters()), lr=lr, betas=betas)
    return (ae, loss_fn, opt_g, opt_d, resume_autoencoder(ae, loss_fn, opt_g, opt_d, args, latest, sampler, rank))


def resume_autoencoder(ae, loss_fn, opt_g, opt_d, args, latest, sampler, rank):
    """The step an autoencoder stage starts at: its latest/ (a resume, exactly), else 0 with the previous stage's
    decoder loaded (stage K > 1) or the seeded initialisation kept."""
    k, kind = args.stage, args.autoencoder
    if latest:
        trainer = load_latest(latest, rank, model=ae, discriminator=loss_fn.discriminator)
        opt_g.load_state_dict(trainer["opt_g"])
        opt_d.load_state_dict(trainer["opt_d"])
        sampler.load_state_dict(trainer["sampler"])
        log0(rank, f"autoencoder {kind} stage {k}: resuming from {latest} at step {trainer['step']}")
        drop_log_rows_after(args.out, rank, trainer["step"], stage=k, autoencoder=kind)
        return trainer["step"]
    if k > 1:
        prev = os.path.join(args.out, f"autoencoder_{kind}", f"stage{k - 1}", "model.safetensors")
        if not os.path.exists(prev):
            raise SystemExit(f"autoencoder stage {k} starts from {prev}, which does not exist: run stage {k - 1} first")
        ae.load_state_dict(ae_lib.load_autoencoder(prev).state_dict())
        log0(rank, f"autoencoder {kind} stage {k}: initialised from {prev}")
    return 0


def save_autoencoder_checkpoint(stage_dir, rank, ae, loss_fn, opt_g, opt_d, sampler, step, settings):
    """latest/ of an autoencoder stage: decoder (and residual ViT), discriminator, both Adams, the data position."""
    save_latest(stage_dir, rank, dict(
        weights=dict(model=cpu_state(ae), discriminator=cpu_state(loss_fn.discriminator)),
        opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(), sampler=sampler.state_dict(), step=step,
        settings=settings), dict(torch=torch.get_rng_state()))


def finish_autoencoder(stage_dir, ae, rank, kind, k):
    """The stage's result, model.safetensors (what sample.py and the next stage read)."""
    if rank == 0:
        atomic_save(lambda tmp: ae_lib.save_autoencoder(ae, tmp), os.path.join(stage_dir, "model.safetensors"))
        log0(rank, f"autoencoder {kind} stage {k} done: {stage_dir}/model.safetensors")
    barrier()


def export(run_dir, dest):
    """--export after training: the sampling files; a LoRA stage last has its adapter merged into the base."""
    import sample
    (export_merged if sample.find_parts(run_dir).get("lora") else export_for_sampling)(run_dir, dest)


# ----- Distributed bookkeeping -----------------------------------------------------------------------
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is a world of one. One process per
# device: NCCL on CUDA, gloo on CPU. NCCL reduces CUDA tensors only ("No backend type associated with device
# type cpu"), so every tensor this file hands to a collective lives on the training device. (The other way,
# a "cpu:gloo,cuda:nccl" group, would open a second set of connections per rank just to reduce numbers
# that start on the GPU and would have to be read back to the host first, a sync per reduction.)

def setup_distributed(device=None):
    """(rank, world size, device) of this process. `device`: where a plain single process runs (train.py: CUDA if
    there is one, else the CPU; sample.py passes its --device). Under torchrun a CUDA device becomes this
    process's own GPU, cuda:LOCAL_RANK."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def log0(rank, *msg):
    if rank == 0:
        tqdm.write(" ".join(str(m) for m in msg))


def total_over_ranks(value, device=None, op=None):
    """The sum over all ranks (or, with op=dist.ReduceOp.MAX, the max) of a tensor, reduced in place and returned,
    or of an int, returned as an int. The tensor must be on the training device, an int is reduced on `device`:
    NCCL reduces CUDA tensors only."""
    if not dist.is_initialized():
        return value
    tensor = value if torch.is_tensor(value) else torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor if torch.is_tensor(value) else int(tensor.item())


def from_every_rank(obj, world):
    """[rank 0's obj, rank 1's, ...] on every rank (every rank calls it)."""
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def same_on_every_rank(value, what, world):
    """`value` if every rank has the same, else SystemExit on every rank: two nodes whose local --data differ
    would otherwise train together on neither's data."""
    values = from_every_rank(value, world)
    if len(set(values)) > 1:
        raise SystemExit(f"{what} differs between the processes (hash per rank: {values}): every node must see "
                         "the same files and captions; copy the same data to each")
    return value


def count_skipped(counts, world):
    """How many distinct files could not be read so far, over all ranks (every rank calls it): each rank hands
    over the names it found since the last call, so a file that fails in every epoch counts once."""
    for names in from_every_rank(counts["new"], world):
        counts["skipped"].update(names)
    counts["new"] = set()
    return len(counts["skipped"])


@contextlib.contextmanager
def seeded(*key):
    """Run the block on the CPU RNG seeded by `key` alone, e.g. (seed, "dit", stage), and give the global RNG back
    as it was after. Weights initialised inside depend on nothing the process drew before (making the random
    encoders, an earlier stage) and are the same on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))
        yield


# ----- Atomic files ----------------------------------------------------------------------------------
# Every file this script writes goes to a temporary name first and is renamed into place: a kill at any
# moment leaves either the old file or the new one, never half of one.

def atomic_save(write_fn, path):
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"         # the extension kept: save_autoencoder insists on .safetensors
    with write_errors(path, cleanup=lambda: os.path.exists(tmp) and os.remove(tmp)):
        write_fn(tmp)
        make_readable(tmp)
        os.replace(tmp, path)


def make_readable(path):
    """Gives the files at `path` (a file, or every file under a folder) the permissions the user's umask allows,
    as `open()` would. safetensors (0.8) creates its files readable by their owner alone, so without this a
    checkpoint on a shared disk could not be read by anyone else."""
    mask = os.umask(0)
    os.umask(mask)
    files = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
    for f in files:
        os.chmod(f, 0o666 & ~mask)


@contextlib.contextmanager
def write_errors(path, cleanup):
    """A failed write (a full disk, no permission: OSError, torch.save's RuntimeError, SafetensorError) removes
    what it left (`cleanup`) and becomes one OSError naming `path`; whatever stood there before is untouched."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        cleanup()
        raise OSError(f"could not write {path} ({type(err).__name__}: {first_line(err)}); the previous files are "
                      "intact: free disk space (or fix permissions) and run the same command again") from err


def first_line(err, limit=200):
    text = str(err).strip().splitlines()
    return text[0][:limit] if text else type(err).__name__


def atomic_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_save(write, path)


def cpu_state(module):
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}


# ----- Checkpoints: latest/ while a stage runs ---------------------------------------------------------
# `latest/` holds everything needed to continue exactly: weights, EMA, optimizer, step, the sampler's
# position and every rank's RNG state. It is written as `latest.tmp/`, then swapped in by two renames;
# `find_latest` also accepts `latest.old/`, which exists only if a kill hit between the two renames.
# `settings.json` records what the result depends on (seed, global batch, data), so that a resume can check it.

def remove_tree(path):
    """shutil.rmtree, with an error that says what to do: a folder that silently stays (no permission, a busy
    mount) would make the next rename over it fail with a misleading "Directory not empty"."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise OSError(f"cannot delete {path} ({err}); fix its permissions or delete it by hand, then run the same "
                      "command again") from err


def save_latest(stage_dir, rank, state, rng_state):
    tmp, final, old = (os.path.join(stage_dir, n) for n in ("latest.tmp", "latest", "latest.old"))
    if rank == 0:
        remove_tree(tmp)
        os.makedirs(tmp)
    barrier()
    with write_errors(tmp, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):   # a full disk: space back
        torch.save(rng_state, os.path.join(tmp, f"rng_rank{rank}.pt"))   # every rank its own RNG state
        if rank == 0:
            for name, module_state in state.pop("weights").items():
                save_file(module_state, os.path.join(tmp, f"{name}.safetensors"))
            if "settings" in state:
                atomic_json(state.pop("settings"), os.path.join(tmp, "settings.json"))
            torch.save(state, os.path.join(tmp, "trainer.pt"))             # optimizer, step, sampler
    barrier()
    if rank == 0:
        make_readable(tmp)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write("ok\n")
        if os.path.exists(final):
            remove_tree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        remove_tree(old)
    barrier()


def find_latest(stage_dir):
    for name in ("latest", "latest.old"):
        path = os.path.join(stage_dir, name)
        if os.path.exists(os.path.join(path, "COMPLETE")):
            return path
    return None


# Every file of latest/ is read without running code: weights from safetensors, settings.json as JSON, and
# trainer.pt / rng_rank*.pt (dicts of tensors, numbers, strings: AdamW's state, the sampler's position, the
# step, the RNG's ByteTensor) by torch.load(weights_only=True), which refuses any other pickled object. A run
# folder someone else wrote can hold a wrong checkpoint, never a program.

def load_latest(latest, rank, **modules):
    """Load latest/{name}.safetensors into each module given (model=..., ema=...), put this rank's RNG back,
    and return trainer.pt's contents (optimizer state, sampler position, step)."""
    for name, module in modules.items():
        load_weights(module, os.path.join(latest, f"{name}.safetensors"))
    # mmap: with several ranks per machine, the pages of the full optimizer state are shared, not copied.
    trainer = read_torch_file(os.path.join(latest, "trainer.pt"), ("sampler", "step"), mmap=True)
    restore_rng(latest, rank)
    return trainer


def read_torch_file(path, keys, mmap=False):
    """A dict written by torch.save in save_latest, holding `keys`; one line naming the file otherwise."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - truncated, damaged, or a pickle of anything but plain data
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {first_line(err)}): it is truncated, "
                         "damaged, or holds objects other than tensors and numbers (refused: loading them could "
                         "run code); delete this latest/ folder to restart the stage") from None
    if not isinstance(obj, dict) or not set(keys) <= set(obj):
        raise ValueError(f"{path} is not a checkpoint of this train.py (expected a dict with {sorted(keys)}); "
                         "delete this latest/ folder to restart the stage")
    return obj


def load_weights(module, path):
    """module.load_state_dict from a safetensors file, with one line naming the file if it is truncated or
    holds another model's weights (a folder of another --preset)."""
    try:
        state = load_file(path)
        if dit_lib.lora_modules(module):          # a --lora stage's latest/ holds the adapters alone
            dit_lib.load_lora_state(module, state, path)
        else:
            module.load_state_dict(state)
    except (OSError, SafetensorError, RuntimeError) as err:
        raise ValueError(f"{path} does not load into this {type(module).__name__} ({type(err).__name__}: "
                         f"{first_line(err)}): it is truncated, or from another --preset; delete this latest/ "
                         "folder to restart the stage, or pass the --preset it was made with") from None


def restore_rng(latest, rank):
    """Put this rank's global RNG back. The training draws themselves (t, noise, caption dropout) do not need
    it -- they are keyed by step -- so a resume on a different number of processes is fine too."""
    path = os.path.join(latest, f"rng_rank{rank}.pt")
    if os.path.exists(path):
        rng = read_torch_file(path, ("torch",))["torch"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            raise ValueError(f"{path} holds no RNG state (a uint8 tensor under 'torch'); delete this latest/ "
                             "folder to restart the stage")
        torch.set_rng_state(rng)


def read_json(path):
    """A JSON object from `path`, or one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it, or delete it and what it describes") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(obj).__name__}")
    return obj


def refuse_to_overwrite(stage_dir, latest):
    """A finished stage without latest/ (deleted to free disk) would be trained again from scratch over its own
    result: refused. With latest/, the run continues it instead (e.g. with a larger --max-steps)."""
    done = [n for n in ("model.safetensors", "ema.safetensors", "config.json")
            if os.path.exists(os.path.join(stage_dir, n))]
    if done and not latest:
        raise SystemExit(f"{stage_dir} holds a finished stage ({', '.join(done)}) and no latest/ checkpoint to "
                         "continue it from: a new run would overwrite it. Pick another --out, or move or delete "
                         f"{stage_dir} yourself to train this stage again")


def check_previous_stage(run_dir, k, cfg, preset_name, latest):
    """Stage K starts from stage K-1's weights: refuse one trained as another network (another --preset)."""
    path = os.path.join(run_dir, f"stage{k - 1}", "config.json")
    if k == 1 or latest or not os.path.exists(path):
        return
    saved = read_json(path)
    if saved.get("dit") != json.loads(json.dumps(cfg)):
        raise SystemExit(f"{path}: stage {k - 1} trained another network (--preset {saved.get('preset')}, "
                         f"{saved.get('dit')}) than this stage's (--preset {preset_name}, {cfg}); pass the "
                         "--preset it was made with")


def drop_log_rows_after(run_dir, rank, step, **stage):
    """On a resume at `step`, forget the log rows of this stage past it: a kill after them lost those steps,
    which the resumed run now takes (and logs) again. Other rows stay as they are."""
    path = os.path.join(run_dir, "log.jsonl")
    if rank != 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)

    def later(line):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:                # a line cut by a kill: not this stage's row either way
            return False
        return (isinstance(row, dict) and row.get("step", -1) > step and row.get("stage") == stage["stage"]
                and row.get("autoencoder") == stage.get("autoencoder"))
    kept = [line for line in lines if not later(line)]
    if len(kept) < len(lines):
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
        atomic_save(write, path)


def check_resume(args, latest, settings, rank):
    """Refuse to continue `latest` with other settings than the run that wrote it (its settings.json): the
    result would be neither run's, and nothing would say so. --force-resume continues anyway and records the
    change in log.jsonl. Only the settings given are compared, so a caller can check some before heavy work.
    Nothing to check without a checkpoint (latest None) or one written by an older train.py (no settings.json)."""
    path = latest and os.path.join(latest, "settings.json")
    if not path or not os.path.exists(path):
        return
    saved = read_json(path)
    changed = {key: [saved[key], value] for key, value in settings.items() if key in saved and saved[key] != value}
    if not changed:
        return
    what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
    if "data" in changed:
        what += " (data: a hash of every item's path and caption, or of the shapes' settings)"
    if not args.force_resume:
        raise SystemExit(f"{latest} was written with other settings: {what}; pass the flags it was made with, "
                         "another --out, or --force-resume to continue anyway")
    log0(rank, f"--force-resume: continuing {latest} with {what}")
    append_log(args.out, rank, dict(forced_resume=latest, changed=changed))


# ----- Data parallelism: DDP or FSDP ---------------------------------------------------------------------
# DDP keeps full copies of the weights, gradients and AdamW moments on every device and averages gradients
# with one all-reduce per step: simple, and comfortable up to ~1 B parameters. The 2B DiT needs 10 GB of fp32
# weights, 10 GB of gradients, 21 GB of AdamW moments and 10 GB of EMA per device that way. `--fsdp` shards
# all of them over the ranks instead (FSDP2, `fully_shard`; the official run used FSDP as well): each rank
# stores 1/world of every tensor (dim 0) as a DTensor, all-gathers a block's full weights just before the
# block runs, frees them after, and reduce-scatters the block's gradients as soon as backward leaves it.

def shard_nextdit(dit, device):
    """FSDP2-wrap a NextDiT in place: one communication group per transformer block, then the root.

    The official run auto-wrapped `model.layers` only; the refiner blocks are the same kind of block, so
    they get their own groups too. The root group holds what is left (embedders, final layer, the unused
    norm_final) and starts every iteration. The EMA copy goes through this same function, so its shards line
    up with the model's and update_ema stays shard-local.
    """
    # On CUDA: bf16 weights in forward and backward, gradients reduced in fp32. The official scripts left
    # --grad_precision unset and so reduced in bf16 (`svg_t2i/train_svg_t2i.py`), unlike Lumina-Image-2.0's fp32
    # reduce: a sum over hundreds of ranks with 8 mantissa bits drops the small contributions. The sharded
    # master weights and AdamW stay fp32 either way. cast_forward_inputs=False: autocast already picks each
    # op's precision, and casting inputs would round t to bf16 before the timestep embedding.
    # On CPU: plain fp32, as everywhere on a CPU in this project: on CPUs without native bf16 units (AVX2 only,
    # say) bf16 matrix products run far slower than fp32; with them (AMX) faster, but fp32 keeps CPU runs exact.
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy()
    # No broadcast first (the official sync_module_states=True): every rank already holds the same weights, from
    # the same seeded initialisation (start_dit) or the same files, so each can keep its slice as it is.
    # NextDiT returns unpatchify's view of its output; FSDP2 warns that an in-place op on it would skip a
    # backward hook. The training loss reads it out of place, so the warning is noise here.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for blk in [*dit.noise_refiner, *dit.context_refiner, *dit.layers]:
        fully_shard(blk, mp_policy=mp)     # resharded after forward, re-gathered in backward (FULL_SHARD)
    fully_shard(dit, mp_policy=mp)         # the root keeps its small weights gathered until backward
    return dit


@contextlib.contextmanager
def grad_sync(wrapped, sync):
    """The context for one micro-step's forward *and* backward. With sync=False (every micro-step of a
    gradient-accumulation step but the last) gradients only add up locally; the last micro-step then averages
    the sum across ranks once. DDP has no_sync(); FSDP2 has a switch that its backward hooks read, which is
    why backward must run inside this context too."""
    if sync or not isinstance(wrapped, (DDP, FSDPModule)):   # a single process has nothing to sync
        yield
    elif isinstance(wrapped, DDP):
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


# Checkpoints hold full, unsharded tensors whatever the wrapper, so a run saved under FSDP resumes under DDP
# or in one process, and the reverse. Gathering is a collective: every rank calls these, rank 0 receives the
# tensors (on the CPU, one at a time, so no device holds a second full copy), the other ranks get {}.
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(dit):
    """{key: fp32 CPU tensor} of a plain, DDP-wrapped or FSDP-sharded model (all ranks call; rank 0 gets it)."""
    return {k: v.to(torch.float32) for k, v in get_model_state_dict(dit, options=FULL_ON_CPU).items()}


def full_optimizer_state(dit, optimizer):
    """AdamW's state keyed by parameter name ("layers.0.attention.qkv.weight"), full tensors (all ranks call)."""
    return get_optimizer_state_dict(dit, optimizer, options=FULL_ON_CPU)


def load_optimizer_state(dit, optimizer, trainer, latest):
    """On a resume (trainer: latest/trainer.pt's contents; None otherwise) AdamW's state as it was: each rank keeps
    its own slice of the full, name-keyed state written by full_optimizer_state."""
    if trainer is None:
        return
    state, path = trainer["optimizer"], os.path.join(latest, "trainer.pt")
    if any(isinstance(key, int) for key in state["state"]):
        raise SystemExit(f"{path}: the optimizer state is keyed by position (written by an older train.py), not "
                         "by parameter name; delete this latest/ folder to restart the stage")
    set_optimizer_state_dict(dit, optimizer, state, options=StateDictOptions(full_state_dict=True))


def plain_nextdit(cfg, state):
    """A plain NextDiT around a full state dict (no copy): what save_nextdit, sample.py and previews read."""
    with torch.device("meta"):             # no memory and no init for weights about to be replaced
        dit = dit_lib.NextDiT(**cfg)
    dit.load_state_dict(state, strict=True, assign=True)
    return dit


# ----- Frozen encoders: make once (small presets), then always load ------------------------------------

def prepare_encoders(run_dir, preset, args, rank, make_random_encoders):
    """Write RUN_DIR/encoders.json once and return its contents (paths to DINOv3, Gemma-2, stats).

    The released presets point at the user's files. The small presets make their own random frozen encoders
    once, with `make_random_encoders(folder, preset, seed)` (train.py), in a temporary folder renamed to
    RUN_DIR/encoders/ when complete.
    """
    path = os.path.join(run_dir, "encoders.json")
    if os.path.exists(path):
        return check_encoders_json(read_json(path), path, args.preset)
    # Never made twice: stages or statistics trained on encoders that encoders.json no longer names would go on
    # silently with new ones (another --seed makes other random encoders).
    made = sorted(n for n in os.listdir(run_dir) if (n == "encoders" or n.startswith(("stage", "autoencoder_")))
                  and os.path.isdir(os.path.join(run_dir, n)))
    if made:
        raise SystemExit(f"{run_dir} holds {', '.join(made)} but no encoders.json naming the encoders they were "
                         "trained with: restore encoders.json, or pick another --out")
    barrier()                                     # every rank has looked before rank 0 makes anything
    if rank == 0:
        if preset["dino"] is None:
            missing = [flag for flag, v in (("--dino", args.dino), ("--gemma", args.gemma)) if not v]
            if missing:
                raise SystemExit(f"preset {args.preset!r} uses the released encoders: pass {' and '.join(missing)}"
                                 " (README 'Using the released weights' says where each comes from)")
            paths = dict(dino=os.path.abspath(args.dino), gemma=os.path.abspath(args.gemma),
                         stats=os.path.abspath(args.stats) if args.stats else None)
        else:
            # Made in a temporary folder and renamed: a kill half-way leaves no encoders/ (and no refusal above).
            for stale in (n for n in os.listdir(run_dir) if n.startswith("encoders.tmp")):
                remove_tree(os.path.join(run_dir, stale))        # what a killed earlier attempt left
            enc_dir = os.path.join(run_dir, f"encoders.tmp{os.getpid()}")
            make_random_encoders(enc_dir, preset, args.seed)
            make_readable(enc_dir)
            os.replace(enc_dir, os.path.join(run_dir, "encoders"))
            paths = dict(dino="encoders/dino.safetensors", gemma="encoders/gemma", stats=None)
        atomic_json(dict(paths, preset=args.preset), path)     # the preset: the networks' sizes depend on it
    barrier()
    return check_encoders_json(read_json(path), path, args.preset)


def check_encoders_json(paths, path, preset_name=None):
    """encoders.json's contents, checked: file paths (stats may be null) and, when training (`preset_name`), the
    --preset the run was made with (files of an older train.py have none)."""
    for key in ("dino", "gemma", "stats"):
        if not isinstance(paths.get(key), str) and not (key == "stats" and paths.get(key) is None):
            raise ValueError(f"{path}: '{key}' must be a file path, got {paths.get(key)!r}; restore the file")
    if preset_name is not None and paths.setdefault("preset", preset_name) != preset_name:
        raise SystemExit(f"{path}: this run folder was made with --preset {paths['preset']}, not {preset_name}; "
                         f"pass --preset {paths['preset']}, or another --out for a {preset_name} model")
    return paths


def load_encoders(run_dir, paths, device):
    dino_model = dino.load_dinov3(resolve(run_dir, paths["dino"])).to(device).eval().requires_grad_(False)
    gemma_dir = resolve(run_dir, paths["gemma"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemma = text.load_gemma2(gemma_dir, dtype=dtype).to(device).eval().requires_grad_(False)
    tokenizer = text.Tokenizer(os.path.join(gemma_dir, "tokenizer.model"))
    return dino_model, gemma, tokenizer


def prepare_stats(run_dir, paths, dino_model, dataset, device, rank):
    """The per-channel latent statistics: the released file, or computed once over the first 2,048 images of the
    training data (dino.LatentStats.over_images; the small presets, whose random encoders have no released
    statistics) and kept in RUN_DIR/encoders/latent_stats.pt, so every later stage uses the same."""
    if paths.get("stats"):
        return dino.LatentStats.load(resolve(run_dir, paths["stats"]))
    path = os.path.join(run_dir, "encoders", "latent_stats.pt")
    if rank == 0 and not os.path.exists(path):
        n = min(len(dataset), 2048)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            stats = dino.LatentStats.over_images(dino_model, dataset, device, n=n)
        except ValueError as err:                   # no latents at all: not one image could be read
            raise ValueError(f"--data {getattr(dataset, 'source', '')}: not one of its first {n} images "
                             "could be read, so the latent statistics cannot be computed; the warnings above name "
                             "the files") from err
        atomic_save(stats.save, path)
        tqdm.write(f"computed latent statistics over {n} images -> {path}")
    barrier()
    return dino.LatentStats.load(path)


# ----- Feature cache (--cache-features) -----------------------------------------------------------------
# The frozen encoders' outputs for a stage's data, computed once and read back every epoch (data.py
# "Feature cache" writes and reads the files). The folder name carries a hash of everything the features
# depend on -- the data's content included -- so another resolution, dataset, caption, image or encoder gets
# its own folder instead of stale features. An image replaced in place is told by its file's size and
# modification time (`data.file_stamps`: one stat per file, where hashing the pixels would read the whole
# dataset at every start); a copy that keeps both, byte for byte another picture, is the one case it misses.

def data_hash(dataset):
    """A hash of what the data is: every item's image path, caption and system prompt (a JSONL or folder
    dataset; an edited caption changes it), or the settings the procedural shapes are a pure function of
    (but their seed, which is --seed and checked on its own)."""
    if hasattr(dataset, "records"):
        items = [[os.path.abspath(r["path"]), r["caption"], r["system"]] for r in dataset.records]
    else:
        items = dict(length=dataset.length, clean=dataset.clean, two_object_prob=dataset.two_object_prob)
        if dataset.star_fraction:                # shapes:star; absent otherwise, so older hashes stay valid
            items["star_fraction"] = dataset.star_fraction
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:16]


def open_feature_cache(args, run_dir, paths, dataset, res, patch, frozen, device, rank, world):
    """This stage's FeatureCache under --cache-features, built first if it is missing or unfinished with the
    frozen encoders (train.FrozenEncoders). Same items, same buckets, same order: only the encoders go."""

    @torch.no_grad()
    def encode(batch):
        """What the cache stores for a batch: raw DINOv3 latents [B, C, h, w], Gemma features [B, L, D] and mask
        [B, L], every caption kept (dropout is drawn afresh at every step)."""
        texts = [text.format_prompt(c, s) for c, s in zip(batch["captions"], batch["systems"])]
        return (dino.images_to_latents(frozen.dino, batch["images"].to(device)), *frozen.encode_captions(texts))

    identity = dict(data=os.path.abspath(args.data) if os.path.exists(args.data) else args.data, seed=args.seed,
                    limit=args.data_limit, resolution=res, bucket_patch=patch, length=len(dataset),
                    content=data_hash(dataset), images=data.file_stamps(dataset),
                    dino=data.fingerprint(resolve(run_dir, paths["dino"])),
                    gemma=data.fingerprint(resolve(run_dir, paths["gemma"])),
                    gemma_dtype="bfloat16" if device.type == "cuda" else "float32")
    identity = from_every_rank(identity, world)[0]   # rank 0's: file times may differ between nodes' copies
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    folder = os.path.join(args.cache_features, f"{res}px-{key}")
    if not os.path.exists(os.path.join(folder, "index.json")):
        data.build_feature_cache(folder, dataset, encode, identity, rank, world, args.workers, barrier)
    return data.FeatureCache(folder)


# ----- torch.compile over many shapes ---------------------------------------------------------------------
# A stage sees many latent grids (one per aspect bucket) and caption lengths (8-256 tokens, in steps of 8). Left
# to itself dynamo compiles a graph for the first shape, then again each time another of these sizes changes
# (4 compilations in 12 mixed steps of the tiny model, each a stall of seconds to minutes), and a function that
# reaches the recompile limit (8) silently runs eagerly from then on. Marked dynamic on every call, the latent's
# height and width and the caption length share one graph (1 compilation over the same 12 steps). The batch size
# stays static: it changes only when unreadable images shorten a batch, and costs a recompile then. Should the
# limit be hit anyway, that is an error, not a silent slow-down.
COMPILE_BACKEND = "inductor"     # tests swap in "aot_eager": the same capture, guards and recompiles, no codegen


def maybe_compile(module, use_compile):
    """(forward, compiles): compile_dit(module) if asked, else the module itself and a count that stays 0."""
    return compile_dit(module) if use_compile else (module, lambda: 0)


def compile_dit(module):
    """(forward, compiles): `module` under torch.compile with the sizes that vary marked dynamic, and a function
    returning how many graphs dynamo has compiled in this process since (from its own counter)."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    compiled = torch.compile(module, backend=COMPILE_BACKEND)
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    start = graphs()

    def forward(x, t, cap_feats, cap_mask):           # x [b, C, h, w], cap_feats [b, L, D], cap_mask [b, L]
        for tensor, dims in ((x, (2, 3)), (cap_feats, (1,)), (cap_mask, (1,))):
            for dim in dims:
                if tensor.shape[dim] > 1:             # a size-1 dim is always specialised; marking it would raise
                    torch._dynamo.mark_dynamic(tensor, dim)
        return compiled(x, t, cap_feats, cap_mask)
    return forward, lambda: graphs() - start


# ----- Export: the files sample.py needs, and nothing else ------------------------------------------------

EXPORT_MARKER = "export.json"       # what --export writes into every export: how a folder is recognised as one


def check_export_dest(run_dir, dest):
    """Refuse a --export folder that is not an export's to replace, before any training: the run folder or a
    folder holding it, and any non-empty folder without EXPORT_MARKER (the user's own files)."""
    run, target = os.path.realpath(run_dir), os.path.realpath(dest)
    if os.path.commonpath([run, target]) == target:
        raise SystemExit(f"--export {dest} is the run folder {run_dir} or holds it; export to a folder outside it")
    if os.path.exists(dest) and not (os.path.isdir(dest) and (not os.listdir(dest) or
                                                              os.path.exists(os.path.join(dest, EXPORT_MARKER)))):
        raise SystemExit(f"--export {dest} exists and is not an earlier export (it has no {EXPORT_MARKER}); "
                         "nothing was touched: pick a new or empty folder")
    if os.path.exists(os.path.join(dest, EXPORT_MARKER)):
        theirs = foreign_files(dest)
        if theirs:
            raise SystemExit(f"--export {dest}: the earlier export there holds files it did not write "
                             f"({', '.join(theirs[:5])}{', ...' if len(theirs) > 5 else ''}), which replacing it "
                             "would delete; nothing was touched: move them out, or export to another folder")


def foreign_files(export):
    """Files and folders in an earlier export that its export.json does not list (the user's own)."""
    listed = set(read_json(os.path.join(export, EXPORT_MARKER)).get("files", [])) | {EXPORT_MARKER}
    ours = lambda rel: any(rel == f or rel.startswith(f + os.sep) or f.startswith(rel + os.sep) for f in listed)
    found = []
    for root, dirs, files in os.walk(export):
        for name in sorted(dirs + files):
            rel = os.path.relpath(os.path.join(root, name), export)
            if not ours(rel):
                found.append(rel + ("/" if name in dirs else ""))
        dirs[:] = [d for d in dirs if ours(os.path.relpath(os.path.join(root, d), export))]
    return found


def swap_into_place(tmp, dest, old):
    """Put the finished export `tmp` at `dest`: the earlier export (if any) moves aside to `old` first and is
    deleted only once the new one is in place, so a kill leaves one complete export or the other."""
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    remove_tree(old)


def export_for_sampling(run_dir, dest):
    """Copy a run's sampling files to `dest` (how assets/demo/ is made): the encoders, the last decoder stage,
    the last DiT stage's EMA weights and config. Optimizer states, non-EMA weights and earlier stages stay.

    The copy is made in a temporary folder next to `dest` and renamed into place, so an earlier export (or
    an empty folder) is replaced only by a complete one; check_export_dest refuses anything else, an earlier
    export holding files of yours included."""
    import sample
    parts = sample.find_parts(run_dir)
    if not parts["dit"] or not parts["decoder"]:
        raise SystemExit(f"{run_dir} has no finished DiT stage and decoder to export")
    check_export_dest(run_dir, dest)
    dest = dest.rstrip("/")
    tmp, old = f"{dest}.tmp{os.getpid()}", f"{dest}.old{os.getpid()}"
    remove_tree(tmp)
    sources = (os.path.join(run_dir, "encoders.json"), os.path.join(run_dir, "encoders"), parts["decoder"],
               parts["dit"], os.path.join(os.path.dirname(parts["dit"]), "config.json"))
    for src in sources:
        target = os.path.join(tmp, os.path.relpath(src, run_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, target)
    atomic_json(dict(run=run_dir, files=[os.path.relpath(src, run_dir) for src in sources]),
                os.path.join(tmp, EXPORT_MARKER))
    swap_into_place(tmp, dest, old)
    tqdm.write(f"exported {run_dir} -> {dest}")


# ----- Fine-tuning: --init-from and --lora ------------------------------------------------------------------
# A stage can start from weights made elsewhere (the official `--init_from`, KlingTeam/SVG-T2I
# `svg_t2i/train_svg_t2i.py`, which loads `consolidated.00-of-01.pth` into the model and its EMA and starts a
# fresh optimizer): the released DiT (a folder holding consolidated.00-of-01.pth, or the file), a run folder or
# stage folder of this project, or an export such as assets/demo. Model and EMA both start from the source's
# EMA weights where it has them (a run's stage{K}/ema.safetensors; the release has one set of weights). The new
# run folder gets what sampling needs: the source's encoders.json and encoders/ (the demo's random encoders
# and latent statistics) and its decoder, copied (or, for a released .ckpt, converted) into autoencoder_P/.
# Unlike the official loader, which drops keys whose shapes differ without a word, a source that does not fit
# is refused with the list of keys, unless --partial-load asks for what fits.
#
# --lora R trains adapters on a frozen base (model.py "LoRA adapters"): the base is the --init-from source
# or, without it, stage K-1 of this run. The EMA shares the model's frozen base tensors (one copy in memory)
# and averages the adapters; latest/ holds the adapters, their EMA and AdamW's state for them, nothing else;
# the stage writes stage{K}/adapter.safetensors (EMA adapters: what sample.py applies), adapter_model.safetensors
# (the trained ones) and config.json naming its base with a fingerprint. --fsdp is refused with --lora: the
# adapted 2B model fits one GPU (README "Fine-tuning"), and sharding a base shared by two modules is not done.

def finetune_args(args, preset, rank):
    """args with the fine-tuning defaults filled in and the --init-from source resolved (args.init_source),
    the source's sampling files imported into the run folder. Unchanged when neither flag is given."""
    args = argparse.Namespace(**vars(args), init_source=None)
    if not (args.init_from or args.lora):
        return args
    if args.lora and args.fsdp:
        raise SystemExit("--lora with --fsdp is not supported: the frozen base (bf16) and the adapters fit one GPU "
                         "(2B at 1024 px with --grad-checkpointing: README 'Fine-tuning'); use DDP (no --fsdp)")
    if args.lora and not args.init_from and args.stage == 1:
        raise SystemExit("--lora trains adapters on a base model: pass --init-from PATH, or run it as stage K > 1 "
                         "of a run folder whose stage K-1 is finished")
    # A fine-tune is short: the preset's `finetune` entry gives its steps and learning rates (LoRA's is higher:
    # its updates start from B = 0 and live in a small subspace).
    defaults = preset.get("finetune", {})
    if args.max_steps is None:
        args.max_steps = defaults.get("lora_steps" if args.lora else "steps", defaults.get("steps"))
    if args.lr is None:
        args.lr = defaults.get("lora_lr" if args.lora else "lr")
    if args.init_from:
        args.init_source = resolve_init_source(args.init_from)
        if args.lora and args.init_source.get("lora"):
            raise SystemExit(f"--init-from {args.init_from} is itself a LoRA stage; merge it first "
                             "(`train.py --stage K --out RUN --export DIR` writes merged weights) and start from DIR")
        import_sampling_files(args, rank)
    return args


def finetune_settings(args):
    """What a resumed fine-tuning stage must share with the run that wrote its latest/ (check_resume)."""
    out = dict(lora=dict(rank=args.lora, alpha=args.lora_alpha, targets=list(lora_targets(args))) if args.lora
               else None)                       # a LoRA latest/ holds adapters only: no resume without --lora
    if args.init_from:
        out["init_from"] = data.fingerprint(args.init_source["weights"])
    return out


def finetune_config(args):
    """What a fine-tuning stage's config.json adds: where it started; for --lora the base (finish_lora)."""
    if args.init_source is None:
        return {}
    out = dict(init_from=args.init_from or args.init_source["weights"], init_weights=args.init_source["what"])
    return dict(out, lora_base=args.init_source["weights"]) if args.lora else out


def lora_targets(args):
    return tuple(t.strip() for t in (args.lora_targets or ",".join(dit_lib.LORA_TARGETS)).split(",") if t.strip())


def resolve_init_source(path):
    """--init-from PATH -> {weights, lora (an adapter on them, or None), run (a folder with encoders.json, or
    None), parts (sample.find_parts of a folder), what (for the log)}."""
    import sample
    if os.path.isfile(path):
        stage_dir = os.path.dirname(os.path.abspath(path))
        run = os.path.dirname(stage_dir) if os.path.exists(os.path.join(os.path.dirname(stage_dir), "encoders.json")) \
            else None
        parts = sample.find_parts(run) if run else {}
        return dict(weights=path, lora=None, run=run, parts=parts, what=f"the weights in {path}")
    if not os.path.isdir(path):
        raise SystemExit(f"--init-from {path} does not exist: pass a folder holding consolidated.00-of-01.pth, that "
                         "file, a run or stage folder of this project, or an export such as assets/demo")
    parts = sample.find_parts(path)
    if not parts.get("dit") or not os.path.exists(parts["dit"]):
        raise SystemExit(f"--init-from {path}: no DiT weights there (consolidated.00-of-01.pth, or a finished "
                         "stage{K}/ema.safetensors)")
    run = path if os.path.exists(os.path.join(path, "encoders.json")) else \
        os.path.dirname(path.rstrip("/")) if os.path.exists(os.path.join(os.path.dirname(path.rstrip("/")),
                                                                         "encoders.json")) else None
    ema = os.path.basename(parts["dit"]).startswith("ema")
    what = (f"the EMA weights {parts['dit']}" if ema else f"the weights {parts['dit']}") + \
        (f" with the adapter {parts['lora']} merged" if parts.get("lora") else "")
    return dict(weights=parts["dit"], lora=parts.get("lora"), run=run, parts=parts, what=what)


def import_sampling_files(args, rank):
    """Make the new run folder complete for sampling and training: the source run's encoders.json and encoders/
    (copied once; a run folder that has encoders already must have the same ones), and its decoder (copied, a
    released .ckpt converted to our safetensors). A released source also lends its Gemma-2 folder and latent
    statistics to --gemma / --stats when those are not given."""
    source, run_dir = args.init_source, args.out
    parts = source["parts"]
    if source["run"] is None:                          # the release: its files fill the flags the user left out
        args.gemma = args.gemma or parts.get("gemma")
        args.stats = args.stats or parts.get("stats")
    if rank == 0:
        mine = os.path.join(run_dir, "encoders.json")
        if source["run"] is not None:
            theirs = os.path.join(source["run"], "encoders.json")
            if not os.path.exists(mine):
                enc = os.path.join(source["run"], "encoders")
                if os.path.isdir(enc) and not os.path.exists(os.path.join(run_dir, "encoders")):
                    shutil.copytree(enc, os.path.join(run_dir, "encoders"))
                shutil.copy(theirs, mine + ".tmp")
                os.replace(mine + ".tmp", mine)
            elif same_encoders(source["run"], run_dir) is False:
                raise SystemExit(f"--init-from {args.init_from}: its encoders ({theirs}) differ from this run folder's "
                                 f"({mine}); a DiT only works with the encoders it was trained on: pick another --out")
        has_decoder = glob_first(os.path.join(run_dir, "autoencoder_P", "stage*", "model.safetensors"))
        if parts.get("decoder") and os.path.exists(parts["decoder"]) and not has_decoder:
            found = [int(n) for n in re.findall(r"stage(\d+)", parts["decoder"])]
            target = os.path.join(run_dir, "autoencoder_P", f"stage{found[-1] if found else 1}", "model.safetensors")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if parts["decoder"].endswith(".safetensors"):
                atomic_save(lambda tmp: shutil.copy(parts["decoder"], tmp), target)
            else:
                decoder = ae_lib.load_autoencoder(parts["decoder"], kind="P")
                atomic_save(lambda tmp: ae_lib.save_autoencoder(decoder, tmp + ".safetensors") or
                            os.replace(tmp + ".safetensors", tmp), target)
            log0(rank, f"--init-from: decoder {parts['decoder']} -> {target}")
    barrier()


def glob_first(pattern):
    return next(iter(sorted(glob.glob(pattern))), None)


def same_encoders(run_a, run_b):
    """True/False: do two run folders use the same DINOv3 and Gemma-2 files (by fingerprint)?"""
    prints = []
    for run in (run_a, run_b):
        with open(os.path.join(run, "encoders.json")) as f:
            paths = json.load(f)
        prints.append([data.fingerprint(resolve(run, paths[k])) for k in ("dino", "gemma")])
    return prints[0] == prints[1]


def source_state(path, lora=None):
    """{key: fp32 tensor} of a DiT file (released .pth or ours), an adapter merged in if given, and its stored
    config (ours; None for a .pth, whose config is inferred from shapes and so says nothing the shapes do not)."""
    src = dit_lib.load_nextdit(path)
    if lora:
        dit_lib.apply_lora(src, lora)
    stored = src.config if dit_lib._resolve_checkpoint(path).endswith(".safetensors") else None
    return {k: v.float() for k, v in src.state_dict().items()}, stored


def load_source_weights(model, args, latest, rank):
    """Load the --init-from source into `model` (a plain NextDiT): at the start of a stage, and for --lora also
    on a resume (the base under the adapters). --lora without --init-from: stage K-1's weights are the base.
    Every key that does not fit is reported; anything missing, unexpected or of another shape (or another
    architecture in the config) is refused unless --partial-load. -> True if weights were loaded."""
    source = args.init_source
    if source is None and args.lora and args.stage > 1:
        prev = os.path.join(args.out, f"stage{args.stage - 1}", "model.safetensors")
        if not os.path.exists(prev):
            raise SystemExit(f"--lora at stage {args.stage} needs a base: {prev} does not exist; run stage "
                             f"{args.stage - 1} first, or pass --init-from PATH")
        source = dict(weights=prev, lora=None, what=f"stage {args.stage - 1}'s weights {prev}")
        args.init_source = source
    if source is None or (latest and not args.lora):
        return False
    state, config = source_state(source["weights"], source.get("lora"))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, misshapen = dit_lib.key_report(expected, state)
    differ = {k: [config.get(k), v] for k, v in model.config.items()
              if config is not None and k != "axes_lens" and config.get(k) != v}
    if missing or unexpected or misshapen or differ:
        report = (f"--init-from {source['weights']} does not match this run's NextDiT (preset {args.preset!r}):\n"
                  f"  config (source vs model): {differ}\n"
                  f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}\n"
                  f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}\n"
                  f"  wrong shapes ({len(misshapen)}): {misshapen[:8]}{' ...' if len(misshapen) > 8 else ''}")
        if not args.partial_load:
            raise ValueError(report + "\npass the --preset the source was trained with, or --partial-load to load "
                                      "the keys that fit and keep the fresh initialisation for the rest")
        log0(rank, report + "\n--partial-load: the rest keeps its fresh initialisation")
        bad = {k.split(":")[0] for k in misshapen}
        state = {k: v for k, v in state.items() if k in expected and k not in bad}
    model.load_state_dict(state, strict=not args.partial_load)
    log0(rank, f"stage {args.stage}: initialised from {source['what']} ({len(state)} tensors); the EMA starts "
               "from the same weights" + (" (the frozen base of the adapters)" if args.lora else ""))
    return True


def attach_adapters(model, ema, args, rank, device):
    """--lora: the same seeded adapters on model and EMA (B = 0, so both still are the base), the base frozen
    (bf16 on CUDA: no gradient or optimizer state ever touches it, and autocast computes in bf16 anyway), and
    the EMA's base replaced by the model's own tensors, so the 2B base is held once."""
    targets = lora_targets(args)
    for module in (model, ema):
        with seeded(args.seed, "lora", args.stage):        # the same A on every rank and in both copies
            names = dit_lib.attach_lora(module, args.lora, args.lora_alpha, targets)
    ema.requires_grad_(False)
    for name, p in model.named_parameters():
        parent, _, leaf = name.rpartition(".")
        if not p.requires_grad:
            if device.type == "cuda":
                p.data = p.data.to(torch.bfloat16)
            ema.get_submodule(parent)._parameters[leaf] = p      # shared: the EMA's base is the model's
        elif ema.get_parameter(name).is_meta:                    # the EMA was a shell: its adapters start as copies
            ema.get_submodule(parent)._parameters[leaf] = nn_parameter(p)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log0(rank, f"--lora {args.lora}: adapters on {len(names)} Linear layers ({','.join(targets)}), {n:,} trainable "
               f"parameters, alpha {model.lora['alpha']:g}; the base is frozen")


def lora_ema_shell(cfg):
    """The EMA of a LoRA stage before attach_adapters: a NextDiT without storage (meta), so that the base is
    never held twice, not even at start-up (the 2B's fp32 copy alone would be 10 GB)."""
    with torch.device("meta"):
        return dit_lib.NextDiT(**cfg).requires_grad_(False)


def nn_parameter(p):
    return torch.nn.Parameter(p.detach().clone(), requires_grad=False)


def trained_state(module):
    """What latest/ keeps of a model: everything (fp32), or with --lora the adapters alone."""
    return dit_lib.lora_state(module) if dit_lib.lora_modules(module) else full_state(module)


def finish_lora(stage_dir, model, ema, cfg, rank, config):
    """A LoRA stage's result: adapter.safetensors (the EMA adapters, what sample.py applies), adapter_model.
    safetensors (the trained ones), config.json (the stage's, plus `lora`: rank, alpha, targets, the base as a
    path relative to the run folder and absolute, and its fingerprint). Written to temporary names, then renamed."""
    if rank == 0:
        args_base = config.pop("lora_base")
        run_dir = os.path.dirname(os.path.abspath(stage_dir))
        base = dict(base=os.path.relpath(os.path.abspath(args_base), run_dir), base_abs=os.path.abspath(args_base),
                    base_fingerprint=data.fingerprint(args_base))
        for module, name in ((ema, "adapter.safetensors"), (model, "adapter_model.safetensors")):
            atomic_save(lambda tmp: dit_lib.save_lora(module, tmp, **base), os.path.join(stage_dir, name))
        atomic_json(dict(config, lora=dict(ema.lora, adapter="adapter.safetensors", **base)),
                    os.path.join(stage_dir, "config.json"))
        size = os.path.getsize(os.path.join(stage_dir, "adapter.safetensors"))
        log0(rank, f"stage {config['stage']} done: {stage_dir}/adapter.safetensors ({size / 2 ** 20:.2f} MiB) on "
                   f"the base {args_base}")
    barrier()


def export_merged(run_dir, dest):
    """--export of a run whose last stage is a LoRA stage: the same files as export_for_sampling, with the
    adapter folded into its base (model.merge, float32) as that stage's ema.safetensors. The result samples
    like the run itself (merged = applied, to float rounding) and needs neither the adapter nor the base."""
    import sample
    parts = sample.find_parts(run_dir)
    check_export_dest(run_dir, dest)
    dit = dit_lib.load_nextdit(parts["dit"])
    dit_lib.apply_lora(dit, parts["lora"])
    dest = dest.rstrip("/")
    tmp, old = f"{dest}.tmp{os.getpid()}", f"{dest}.old{os.getpid()}"
    remove_tree(tmp)
    stage = os.path.relpath(os.path.dirname(parts["lora"]), run_dir)
    copied = [os.path.join(run_dir, "encoders.json"), os.path.join(run_dir, "encoders"), parts["decoder"]]
    for src in copied:
        target = os.path.join(tmp, os.path.relpath(src, run_dir))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, target)
    os.makedirs(os.path.join(tmp, stage), exist_ok=True)
    dit_lib.save_nextdit(dit, os.path.join(tmp, stage, "ema.safetensors"))
    with open(os.path.join(os.path.dirname(parts["lora"]), "config.json")) as f:
        config = json.load(f)
    config["merged_lora"] = config.pop("lora")
    atomic_json(config, os.path.join(tmp, stage, "config.json"))
    atomic_json(dict(run=run_dir, merged=parts["lora"], files=[os.path.relpath(s, run_dir) for s in copied]),
                os.path.join(tmp, EXPORT_MARKER))
    swap_into_place(tmp, dest, old)
    tqdm.write(f"exported {run_dir} -> {dest} (adapter {parts['lora']} merged into {parts['dit']})")


# ----- One run per run folder ----------------------------------------------------------------------------
# Two trainings in one folder would overwrite each other's checkpoints. Rank 0 holds an exclusive flock on
# RUN_DIR/.lock for as long as it lives; the kernel drops it when the process ends, however it ends (kill -9
# too), so a dead run never leaves the folder locked. Only rank 0 takes it: ranks on one machine would
# otherwise lock each other out. A flock belongs to the open file, which forked children (DataLoader workers)
# share: every fork closes its copy at once, or workers orphaned by a SIGTERM would hold the folder after the run.
_held_lock = None                        # the lock's file descriptor while this process holds one


def _close_lock_in_child():
    if _held_lock is not None:
        os.close(_held_lock)


os.register_at_fork(after_in_child=_close_lock_in_child)


def lock_run_folder(run_dir, rank):
    """The lock file's descriptor (keep it open: closing it releases the folder; None on ranks > 0), or
    SystemExit on every rank if another run holds the folder."""
    global _held_lock
    handle = None
    if rank == 0:
        handle = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _held_lock = handle
        except BlockingIOError:
            os.close(handle)
            handle = None
    refused = [rank == 0 and handle is None]
    if dist.is_initialized():
        dist.broadcast_object_list(refused, src=0)              # every rank learns rank 0's answer (any backend)
    if refused[0]:
        raise SystemExit(f"--out {run_dir}: another train.py is running in this run folder (it holds "
                         f"{os.path.join(run_dir, '.lock')}); wait for it to end, or pick another --out")
    return handle


def unlock_run_folder(handle):
    global _held_lock
    _held_lock = None
    os.close(handle)
