"""Data: where training pairs (image, caption) come from and how they are batched.

    --data -> open_dataset -> dataset[i] = {image [3, H, W] in [-1, 1], caption, system}
           -> BucketBatchSampler (one aspect bucket per batch, a share per rank) -> collate -> batch
           -> train.py: DINOv3 / Gemma-2

Images of any aspect ratio train at their own aspect, as the official trainer does (KlingTeam/SVG-T2I
`svg_t2i/train_svg_t2i.py`): each is assigned the nearest *bucket* (a pixel size whose token grid holds at most
(resolution/patch)² tokens), resized to cover it and centre-cropped, never stretched; a batch comes from one
bucket, so it stacks into one tensor. Three datasets share one interface (`len`, `bucket_of(i)`, `ds[i]`,
`ds.skipped`): JsonlDataset, FolderDataset, ShapesDataset (the CPU demo's). A malformed JSONL line stops start-up
with its file and line; an unreadable image is skipped, counted, named.
"""
import os

import numpy as np
import torch


# ----- Aspect-ratio buckets ---------------------------------------------------------------------------------

def buckets(resolution, patch=16, max_ratio=4.0):
    """All training sizes for one stage, as a list of (height, width) in pixels: the official enumeration
    (`generate_crop_size_list`, KlingTeam/SVG-T2I `svg_t2i/util/imgproc.py`) walks the boundary of the token-grid
    region w·h ≤ N = (resolution/patch)², widest grid (N × 1) to tallest, keeping grids of aspect ≤ max_ratio whose
    floor(w/2) and floor(h/2) are even: 15 buckets at 256 px, 27 at 512, 51 at 1024 (patch 16). Written in tokens
    (the official test is in pixels, the same for patch 16), so patch 8 at 128 px has the 256-px / 16 grids."""
    check_bucket_args(resolution, patch, max_ratio)
    num_tokens = (resolution // patch) ** 2
    out = []
    w, h = num_tokens, 1  # token grid, widest first, as the official loop
    while w > 0:
        if max(w, h) / min(w, h) <= max_ratio and (w // 2) % 2 == 0 and (h // 2) % 2 == 0:
            out.append((h * patch, w * patch))
        if (h + 1) * w <= num_tokens:
            h += 1  # still inside the budget: grow taller
        else:
            w -= 1  # over budget: narrow by one column
    return out


def nearest_bucket(height, width, bucket_list):
    """The bucket that keeps the most of an image of this size: the official `var_center_crop` score
    min(scale_w, scale_h) / max(scale_w, scale_h), 1 for an exact aspect match; ties to the larger bucket."""
    def keep(bucket):
        bh, bw = bucket
        sw, sh = bw / width, bh / height
        return (min(sw, sh) / max(sw, sh), bw, bh)
    return max(bucket_list, key=keep)


def image_to_tensor(image):
    """PIL RGB -> [3, H, W] in [-1, 1], what the decoder's losses compare (dino.imagenet_normalize comes later)."""
    arr = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ----- Datasets: the shapes world; real images (JsonlDataset, FolderDataset: file handling) below the banner ---
# The demo's data: learnable on a CPU, and prompt adherence measurable pixel by pixel (benchmarks/eval_shapes.py).

class ShapesDataset(torch.utils.data.Dataset):
    """Procedural shapes: item i is a pure function of (seed, i), the same in any worker, rank or resumed run;
    infinite (`length` only sets an epoch). A scene: one object, or two on different corners; each a palette colour
    and shape, centre jittered ±4%, side 30-40% of the canvas (a pair shrunk to keep a 3% gap). 18.7% of object
    phrases are not canonical ("at the", "upper left", "middle"; 29,928 phrases of 20,000 scenes: a quarter are
    paraphrased, a quarter of those redraw the canonical words). clean=True, the demo's SFT (supervised fine-tuning)
    subset: canonical captions, exact positions, side 35%. Square images: one bucket; system 'base'."""

    def __init__(self, resolution, seed=0, length=100_000, clean=False, two_object_prob=0.5, star_fraction=0.0):
        if seed < 0:
            raise ValueError(f"ShapesDataset: seed must be >= 0, got {seed}")
        self.resolution, self.seed, self.length = resolution, seed, length
        self.clean, self.two_object_prob = clean, two_object_prob
        self.star_fraction = star_fraction        # shapes:star (the fine-tuning exercise); 0 for the demo's data
        self.skipped = 0  # nothing can be unreadable here; kept for the common interface

    def scene(self, i):
        """Item i's objects (with cx, cy, side) and caption, without rendering (draw_scene, below the banner)."""
        return draw_scene(self, i)

    def __len__(self):
        return self.length

    def bucket_of(self, i):
        return (self.resolution, self.resolution)

    def __getitem__(self, i):
        # Rendering costs ~0.6 ms at 128 px, far below a training step: no image cache is needed.
        objects, caption = self.scene(i)
        image = render_shapes(objects, self.resolution)
        return dict(image=image_to_tensor(image), caption=caption, system="base")


def open_dataset(spec, resolution, seed=0, patch=16, max_ratio=4.0, limit=None, square=False):
    """The trainer's entry point: 'shapes', 'shapes:clean' (the SFT subset), 'shapes:star', a .jsonl / .json file,
    or a folder. `limit`: the first N items only; `square`: for random square crops (see _ImageListDataset)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--data-limit must be at least 1, got {limit}")
    if spec in ("shapes", "shapes:clean"):
        return ShapesDataset(resolution, seed=seed, clean=spec.endswith(":clean"), length=limit or 100_000)
    if spec == "shapes:star":   # fine-tuning: half lone stars, half the clean scenes the demo knows (both clean)
        return ShapesDataset(resolution, seed=seed, clean=True, length=limit or 100_000, star_fraction=STAR_FRACTION)
    if os.path.isdir(spec):
        return FolderDataset(spec, resolution, patch, max_ratio, limit=limit, square=square)
    if os.path.isfile(spec) and spec.lower().endswith((".jsonl", ".json")):
        return JsonlDataset(spec, resolution, patch, max_ratio, limit=limit, square=square)
    raise ValueError(f"--data {spec!r}: expected 'shapes', 'shapes:clean', 'shapes:star', an existing .jsonl/.json "
                     f"file, or an existing folder of images with same-stem .txt captions")


# ----- Batching: one bucket per batch, one share per rank ---------------------------------------------------

class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's indices for every step of an epoch (`DataLoader(batch_sampler=...)`). Per epoch, with a
    numpy rng seeded by (seed, epoch): 1. each bucket queues what the previous epoch left over, then a shuffle of
    its indices, cut into *global* batches of batch_size × world_size, the rest carried to the next epoch; 2. the
    global batches are shuffled (buckets interleave); 3. rank r takes slice [r·B, (r+1)·B) of each. So every image
    trains once per epoch (at most one epoch late), each batch is one size, and 1-2 depend on the global batch
    alone: one process with batch B·W sees exactly what W ranks with batch B see, and every rank the same number
    of batches. A resume: the training loop counts `batches_done` (the DataLoader prefetches, so the sampler
    cannot); state_dict saves it with the epoch, and iter() starts there. (The official trainer also takes every
    image every epoch, in batches of mixed sizes; its seed, global_seed + 100·resolution, a trainer can pass.)"""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0):
        check_sampler_args(dataset, rank, world_size)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.global_batch = batch_size * world_size
        members = {}  # bucket (h, w) -> indices
        for i in range(len(dataset)):
            members.setdefault(tuple(dataset.bucket_of(i)), []).append(i)
        self.members = [np.array(members[b], dtype=np.int64) for b in sorted(members)]
        self.epoch = 0
        self.carry = [np.zeros(0, dtype=np.int64) for _ in self.members]  # this epoch's leftovers, per bucket
        self.batches_done = 0  # of this epoch, advanced by the training loop (see the class docstring)

    def __len__(self):
        """Global batches in the current epoch (it varies with what the previous epoch carried over)."""
        return sum((len(c) + len(m)) // self.global_batch for c, m in zip(self.carry, self.members))

    def _plan(self):
        """This epoch's global batches in order (int64 [batch_size × world_size] each), and each bucket's carry."""
        rng = np.random.default_rng([self.seed, self.epoch])
        G, batches, carry_out = self.global_batch, [], []
        for idx, carried in zip(self.members, self.carry):
            # Leftovers first; their own turn of this epoch goes last, so that a batch never holds an image
            # twice unless its bucket is smaller than a global batch.
            perm = rng.permutation(idx)
            waiting = np.isin(perm, carried)
            queue = np.concatenate([carried, perm[~waiting], perm[waiting]])
            full = len(queue) // G
            batches += [queue[k * G:(k + 1) * G] for k in range(full)]
            carry_out.append(queue[full * G:])
        return [batches[k] for k in rng.permutation(len(batches))], carry_out

    def __iter__(self):
        # Sliced now: a generator body would read batches_done at the first next(), after the loop may move it.
        batches = self._plan()[0][self.batches_done:]
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return (gb[lo:hi].tolist() for gb in batches)

    def set_epoch(self, epoch):
        """Select the epoch (the shuffle), from batch 0; the current one again keeps a loaded resume point."""
        if epoch == self.epoch:
            return
        if epoch < self.epoch:
            self.epoch, self.carry = 0, [np.zeros(0, dtype=np.int64) for _ in self.members]
        while self.epoch < epoch:
            self.carry = self._plan()[1]
            self.epoch += 1
        self.batches_done = 0

    def state_dict(self):
        return dict(epoch=self.epoch, batches_done=self.batches_done)

    def load_state_dict(self, state):
        """Resume: the next iter() yields batch `batches_done` onwards of epoch `epoch`."""
        self.set_epoch(int(state["epoch"]))
        self.batches_done = check_batches_done(int(state["batches_done"]), len(self))


def collate(items):
    """Dataset items (an unusable one is None or an Unreadable) -> {images [B, 3, H, W] (a list if sizes differ),
    captions, systems, dropped, dropped_files (the only record of bad files that crosses DataLoader workers)}; a
    batch can come out short or empty. FeatureCache items give latents [B, C, h, w] and cap_feats [L_i, D] each."""
    good = [it for it in items if it]
    dropped = dict(dropped=len(items) - len(good), dropped_files=[str(it) for it in items if isinstance(it, str)])
    if good and "latent" in good[0]:                       # from a FeatureCache: the encoders already ran
        return dict(latents=torch.stack([it["latent"] for it in good]),      # [B, C, h, w], one bucket
                    cap_feats=[it["cap_feats"] for it in good],              # [L_i, D] each, unpadded
                    captions=[it["caption"] for it in good], systems=[it["system"] for it in good], **dropped)
    images = [it["image"] for it in good]
    if images and all(im.shape == images[0].shape for im in images):
        images = torch.stack(images)  # [B, 3, H, W]
    return dict(images=images, captions=[it["caption"] for it in good], systems=[it["system"] for it in good],
                **dropped)


# ==============================================================================================================
# Files, checks and scenes. A first reading can skip everything below: image datasets, parsing, scenes, cache.
# ==============================================================================================================

import hashlib
import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageDraw, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import dino

log = logging.getLogger("data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


# ----- Argument checks of the parts above -------------------------------------------------------------------

def check_sampler_args(dataset, rank, world_size):
    if not 0 <= rank < world_size:
        raise ValueError(f"BucketBatchSampler: rank {rank} is not in [0, world_size={world_size})")
    if len(dataset) == 0:
        raise ValueError("BucketBatchSampler: the dataset is empty")


def check_batches_done(done, epoch_len):
    """A resume point's batch count, if the epoch has that many batches."""
    if not 0 <= done <= epoch_len:
        raise ValueError(f"BucketBatchSampler.load_state_dict: batches_done={done} is outside [0, {epoch_len}]"
                         f" for this dataset and batch size; was the checkpoint made with other data?")
    return done


def check_bucket_args(resolution, patch, max_ratio):
    if resolution % patch != 0:
        raise ValueError(f"buckets: resolution {resolution} is not a multiple of the patch size {patch}")
    if max_ratio < 1:
        raise ValueError(f"buckets: max_ratio must be >= 1, got {max_ratio}")


# ----- The autoencoder's crops: shorter side, then a random square ---------------------------------------

def resize_shorter_side(image, size):
    """Resize a PIL image, keeping its aspect, so that its shorter side is `size` pixels: the first half of
    the official autoencoder crop (albumentations SmallestMaxSize). Same filters as resize_to_cover (box
    halving, then bicubic); the official one is a single bilinear resize."""
    while min(image.width, image.height) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.width, image.height)
    new_w, new_h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    return image.resize((new_w, new_h), resample=Image.BICUBIC)


def random_square_crops(images, size, generators):
    """The second half of the official autoencoder crop (albumentations RandomCrop), made reproducible.

    images: [3, H, W] tensors with min(H, W) == size (a list, or a stacked [B, 3, H, W]); generators: one
    torch.Generator per image, which draws its crop position. Returns [B, 3, size, size]. The trainer keys
    the generators by training step, so a resumed run cuts the same crops as one that never stopped."""
    out = []
    for image, gen in zip(images, generators):
        h, w = image.shape[-2:]
        top = int(torch.randint(h - size + 1, (1,), generator=gen))
        left = int(torch.randint(w - size + 1, (1,), generator=gen))
        out.append(image[:, top:top + size, left:left + size])
    return torch.stack(out)


# ----- The JSONL and folder datasets --------------------------------------------------------------------

def resize_to_cover(image, size_hw):
    """Resize a PIL image to cover (height, width), keeping its aspect, then centre-crop to exactly that, as the
    official `center_crop`: box-filter halvings (cheap, alias-free), then one bicubic resize. Never stretches."""
    th, tw = size_hw
    while image.width >= 2 * tw and image.height >= 2 * th:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(tw / image.width, th / image.height)
    # max(): float rounding must never leave the covering side one pixel short of the target
    new_w, new_h = max(tw, round(image.width * scale)), max(th, round(image.height * scale))
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    left, top = (new_w - tw) // 2, (new_h - th) // 2
    return image.crop((left, top, left + tw, top + th))


class _ImageListDataset(torch.utils.data.Dataset):
    """Shared body of JsonlDataset and FolderDataset: records {path, caption, system, size}, each item's bucket
    fixed at start-up from its size (read_sizes). square=True, the official autoencoder recipe: shorter side to
    `resolution`, one bucket, the random square cut by the trainer. `skipped`: unusable images in this process."""

    def __init__(self, records, resolution, patch, max_ratio, source, square=False):
        self.resolution, self.source, self.square = resolution, source, square
        self.bucket_list = [(resolution, resolution)] if square else buckets(resolution, patch, max_ratio)
        self._bad = _BadImageLog()
        if len(self.bucket_list) > 1:
            records = read_sizes(records, self._bad, source)
        self.records = records
        self.bucket_ids = [0 if len(self.bucket_list) == 1 else
                           self.bucket_list.index(nearest_bucket(*r["size"], self.bucket_list)) for r in records]
        check_records(self)

    @property
    def skipped(self):
        return self._bad.count

    def __len__(self):
        return len(self.records)

    def bucket_of(self, i):
        """(height, width) in pixels that item i is cropped to."""
        return self.bucket_list[self.bucket_ids[i]]

    def __getitem__(self, i):
        rec = self.records[i]
        image = load_rgb(rec, self._bad)           # upright (EXIF), RGB; an Unreadable(path) if it cannot be read
        if not image:
            return image
        if self.square:                            # [3, resolution, >= resolution] or the transpose
            return dict(image=image_to_tensor(resize_shorter_side(image, self.resolution)),
                        caption=rec["caption"], system=rec["system"])
        image = resize_to_cover(image, self.bucket_of(i))      # the bucket fixed at start-up: batches stack
        return dict(image=image_to_tensor(image), caption=rec["caption"], system=rec["system"])


class JsonlDataset(_ImageListDataset):
    """The official JSONL format: {"path", "prompt"} per line (system prompt 'base') or {"image_path",
    "super_high_quality_caption"} ('align'), or a .json array of them; read_jsonl checks every line at start-up."""

    def __init__(self, path, resolution, patch=16, max_ratio=4.0, limit=None, square=False):
        super().__init__(read_jsonl(path, limit), resolution, patch, max_ratio, source=path, square=square)


class FolderDataset(_ImageListDataset):
    """Every image under a folder (recursively, sorted) with a same-stem `.txt` caption beside it; system 'base'."""

    def __init__(self, path, resolution, patch=16, max_ratio=4.0, limit=None, square=False):
        super().__init__(read_folder(path)[:limit], resolution, patch, max_ratio, source=path, square=square)


# ----- Bad-image reporting ----------------------------------------------------------------------------------

class Unreadable(str):
    """What a dataset returns for an item it cannot load: the file's name, false in a truth test as None is.
    collate() drops it and lists it, so the trainer counts files, not the times it met them."""

    def __bool__(self):
        return False


class _BadImageLog:
    """Counts unusable images (each file once) and names them in the log without flooding it: the first 20
    individually, then every 100th with the running total."""

    def __init__(self):
        self.bad = set()

    @property
    def count(self):
        return len(self.bad)

    def report(self, path, err):
        if path in self.bad:
            return
        self.bad.add(path)
        n = len(self.bad)
        if n <= 20 or n % 100 == 0:
            more = " (further ones reported every 100th)" if n == 20 else ""
            log.warning("skipping unusable image %s: %s: %s [%d skipped so far]%s",
                        path, type(err).__name__, err, n, more)


def _open_image(rec):
    """Image.open of a record's file (lazy: reads the header only); a file JsonlDataset found nowhere raises
    FileNotFoundError naming every place it looked."""
    if "missing" in rec:
        raise FileNotFoundError(rec["missing"])
    return Image.open(rec["path"])


# EXIF orientations 5-8 turn the picture by 90 degrees: the stored width is the displayed height.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def _displayed_size(im):
    """(height, width) as a viewer shows the image: after its EXIF orientation, which training applies too."""
    turned = im.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS
    return (im.width, im.height) if turned else (im.height, im.width)


def check_records(dataset):
    """Stop at start-up if not one image of a JSONL/folder dataset is usable; log what it holds otherwise."""
    if not dataset.records:
        raise ValueError(f"{dataset.source}: no usable images ({dataset.skipped} skipped); check the paths in it")
    log.info("%s: %d images, %d skipped at start-up, %d buckets",
             dataset.source, len(dataset.records), dataset.skipped, len(dataset.bucket_list))


def load_rgb(rec, bad):
    """A record's image, decoded, turned upright by its EXIF orientation, as every viewer shows it (the official
    loader ignores it: a portrait photo from a phone trains sideways), then converted as dino.preprocess does
    (16-bit, alpha); on any failure Unreadable(path), reported once to `bad`. A run never dies of one bad file."""
    try:
        with _open_image(rec) as im:
            im.load()  # decode now: a truncated file fails here, inside the try
            return dino.to_rgb(ImageOps.exif_transpose(im))
    except Exception as err:  # noqa: BLE001 - skip, count and report; a run never dies of one bad file
        bad.report(rec["path"], err)
        return Unreadable(rec["path"])


def read_sizes(records, bad, source):
    """The records whose (height, width) is known, the missing ones read from the image headers.

    The sampler needs every item's bucket before the first step. It comes from `width`/`height` in the record
    when present (free), otherwise from the image header: PIL's `Image.open` reads only the header, about a
    millisecond per local file, so a million images cost minutes of start-up, read on 16 threads since it is
    I/O bound. Put width/height in big JSONL files to skip it. With a single bucket (max_ratio=1) no header is
    read at all. An image whose header cannot be read here is skipped and counted, not an error; so is one
    that fails to load later. A record with a "missing" message (JsonlDataset found no file) fails with it.
    `skipped` counts per process: under a multi-worker DataLoader each worker has its own copy, so the
    trainer counts `collate(...)['dropped_files']` instead, which travels back with every batch."""
    todo = [r for r in records if r["size"] is None]
    if not todo:
        return records
    start = time.time()

    def header_size(rec):
        try:
            with _open_image(rec) as im:
                return _displayed_size(im)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a data accident, never fatal
            return err

    with ThreadPoolExecutor(max_workers=16) as pool:
        for rec, size in zip(todo, pool.map(header_size, todo)):
            if isinstance(size, Exception):
                bad.report(rec["path"], size)
            else:
                rec["size"] = size
    log.info("%s: read %d image headers in %.1f s (add width/height to the records to skip this)",
             source, len(todo), time.time() - start)
    return [r for r in records if r["size"] is not None]


def _parse_jsonl_line(line, where):
    """One JSONL line -> record (its path as written; JsonlDataset locates the file). `where` is "file:line"
    for error messages."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); fix or delete this line")
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object per line, got {type(item).__name__}")
    # Same precedence as the official T2IItemProcessor: super_high_quality_caption wins.
    if "super_high_quality_caption" in item:
        path_key, cap_key, system = "image_path", "super_high_quality_caption", "align"
    elif "path" in item:
        path_key, cap_key, system = "path", "prompt", "base"
    else:
        raise ValueError(f"{where}: needs 'path' + 'prompt' (or 'image_path' + 'super_high_quality_caption'); "
                         f"found keys {sorted(item)}")
    if path_key not in item or not isinstance(item[path_key], str):
        raise ValueError(f"{where}: '{path_key}' missing or not a string")
    if cap_key not in item:
        raise ValueError(f"{where}: '{cap_key}' missing (use \"\" or null for an uncaptioned image)")
    # null or "" -> "": text.format_prompt then gives the system prompt alone, as the official item processor
    # does. (The bare "" with no system prompt, the unconditional input, comes only from caption dropout.)
    caption = item[cap_key]
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"{where}: '{cap_key}' must be a string, got {type(caption).__name__}")
    size = None
    if "width" in item or "height" in item:
        w, h = item.get("width"), item.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise ValueError(f"{where}: 'width' and 'height' must both be positive integers, got {w!r}, {h!r}")
        size = (h, w)
    # Whitespace around a caption is stripped (the official code keeps it, unless the caption is only that).
    return dict(path=item[path_key], caption=(caption or "").strip(), system=system, size=size)


def _locate(path, folder):
    """Where a JSONL path points: as given first (absolute, or relative to the working directory, as the
    official trainer opens it), then relative to the JSONL's folder. Returns the record fields: {"path"}, or
    {"path", "missing"} naming both places tried."""
    for found in (path, None if os.path.isabs(path) else os.path.join(folder, path)):
        if found and os.path.exists(found) and not os.path.isfile(found):      # a named pipe, a device, a folder
            return dict(path=os.path.abspath(found), missing=f"not a regular file: {os.path.abspath(found)}")
    if os.path.exists(path):
        return dict(path=os.path.abspath(path))    # absolute: DataLoader workers never depend on the cwd
    beside = os.path.join(folder, path)
    if not os.path.isabs(path) and os.path.exists(beside):
        return dict(path=beside)
    if os.path.isabs(path):
        return dict(path=path, missing=f"no such file: {path}")
    return dict(path=os.path.abspath(path), missing=f"no such file as given ({os.path.abspath(path)}) nor next "
                                                    f"to the JSONL ({beside})")


def read_jsonl(path, limit=None):
    """The records of a JSONL file (or a .json array). Every line is parsed at start-up so that a malformed one
    stops the run before any compute is spent, with its file and line number. Image paths are looked up once
    (`_locate`: as given, then next to the JSONL; one os.path.exists each, on 16 threads); a file found in
    neither place is skipped and counted like any unreadable image, and the log names both places."""
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8-sig") as f:      # -sig: a byte-order mark is not part of line 1
        text = f.read()
    if text.lstrip().startswith("["):  # a JSON array of objects
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})")
        lines = [(f"{path}: item {k}", json.dumps(it)) for k, it in enumerate(items)]
    else:
        lines = [(f"{path}:{n}", s) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    records = [_parse_jsonl_line(s, where) for where, s in lines][:limit]
    if not records:
        raise ValueError(f"{path}: no data lines")
    with ThreadPoolExecutor(max_workers=16) as pool:   # I/O bound: a stat per file
        for rec, found in zip(records, pool.map(lambda r: _locate(r["path"], folder), records)):
            rec.update(found)
    return records


def read_folder(path):
    """The records of an image folder: every image with a same-stem .txt caption (utf-8, a BOM dropped)."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a folder")
    records, uncaptioned = [], 0
    unlisted = lambda err: log.warning("%s: cannot list %s (%s); its images are left out", path, err.filename, err)
    for root, dirs, files in os.walk(path, onerror=unlisted):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            image_path, txt = os.path.join(root, name), os.path.join(root, stem + ".txt")
            odd = [p for p in (image_path, txt) if os.path.exists(p) and not os.path.isfile(p)]
            if odd:                            # opening a named pipe would wait for a writer for ever
                log.warning("%s: %s is not a regular file (a named pipe, a device?); its image is left out",
                            path, odd[0])
                continue
            if not os.path.exists(txt):
                uncaptioned += 1
                continue
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the caption
            with open(txt, encoding="utf-8-sig") as f:
                caption = f.read().strip()
            records.append(dict(path=image_path, caption=caption, system="base", size=None))
    if uncaptioned:
        log.warning("%s: %d images have no same-stem .txt caption and are left out", path, uncaptioned)
    if not records:
        raise ValueError(f"{path}: no images with a same-stem .txt caption found")
    return records


# ----- The shapes world: palette, shapes, positions ---------------------------------------------------------
# The demo's procedural data (train.py's `demo` preset). Small enough that a tiny model learns it on a CPU,
# structured enough that prompt adherence can be measured pixel by pixel (benchmarks/eval_shapes.py).

PALETTE = {  # name -> RGB; far apart from each other and from the white background
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "cyan": (20, 180, 200),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")  # triangle = upright, apex at the top middle of its box
# A shape the demo never saw, for the fine-tuning exercise (README "Fine-tuning"; `--data shapes:star`). Kept out
# of SHAPES on purpose: the shipped scenes draw their shape from SHAPES, and its vocabulary (all_captions) made
# the demo's tokenizer, so adding to it would change every scene and caption the demo was trained on.
NEW_SHAPES = ("star",)      # five-pointed, one point up, its bounding box centred in the object's box
STAR_INNER = math.cos(math.radians(72)) / math.cos(math.radians(36))   # inner / outer radius of a regular star
STAR_FRACTION = 0.5         # shapes:star: half the scenes a lone star, half the old clean scenes (no forgetting)
# A star's points are thin: at the old clean side (35%) its arms are about one latent cell (8 px at 128 px)
# wide, and the demo's frozen decoder, which never saw a star, rounds them off (the ground truth after its
# encode and decode reads as a star 18 times in 40, `eval_shapes.py --round-trip`); at 45% all 40 come back.
# Its ink is still 0.6 of a clean circle's (a star covers 0.34 of its box).
STAR_SIDE = 0.45            # shapes:star: the side of a clean star; the jittered ones 0.40-0.50
POSITIONS = {  # name -> (cx, cy) as fractions of width and height
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.50, 0.50),
}
BACKGROUND = (255, 255, 255)
JITTER = 0.04            # centres move up to ±4% of the canvas
SINGLE_SIDE = (0.30, 0.40)  # bounding-box side of a lone object, fraction of the canvas
# A pair sits on two corners, never the centre: corners are 0.44 apart, so each object of a pair can be as
# large as a lone one (a centre pair leaves room for 0.19, three latent cells, too few to tell a shape).
PAIR_POSITIONS = ("top left", "top right", "bottom left", "bottom right")
PAIR_SIDE = SINGLE_SIDE     # each object of a pair; shrunk further when needed so the two never touch
PAIR_GAP = 0.03          # minimum empty band between the boxes of a pair
CLEAN_SIDE = {1: 0.35, 2: 0.35}  # fixed sides of the clean (SFT) subset
SUPERSAMPLE = 4          # draw at 4x, then box-filter down: exact-coverage anti-aliasing

# Wordings. The canonical one ("a red circle in the top left") is always first and always understood;
# the paraphrases only swap the preposition or use a synonym for the position.
POSITION_WORDS = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
    "center": ("center", "middle"),
}
PREPOSITIONS = ("in", "at")
PARAPHRASE_PROB = 0.25   # per object phrase, outside the clean subset


def render_shapes(objects, size):
    """Draw objects on a white square canvas of `size` pixels -> PIL RGB image.

    objects: list of dicts {color, shape, position} with optional cx, cy (centre, fractions of the canvas;
    default: the position's centre) and side (bounding-box side, fraction; default: the clean size)."""
    # Draw at 4x and box-filter down: each output pixel is the exact average of 16 samples, so edges are
    # anti-aliased the same way for every shape (PIL's own primitives are not anti-aliased).
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        # All geometry in fractions of the canvas, so one scene renders identically at 64 or 128 px.
        default_cx, default_cy = POSITIONS[obj["position"]]
        cx, cy = obj.get("cx", default_cx) * big, obj.get("cy", default_cy) * big
        half = obj.get("side", CLEAN_SIDE[min(len(objects), 2)]) * big / 2
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        color = PALETTE[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif obj["shape"] == "triangle":  # fills exactly half of its box
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
        elif obj["shape"] == "star":      # fills ~0.34 of its own bounding box (area 1.12 R², box 1.90 R x 1.81 R)
            draw.polygon(star_points(cx, cy, half), fill=color)
        else:
            raise ValueError(f"render_shapes: unknown shape {obj['shape']!r}; expected one of {SHAPES + NEW_SHAPES}")
    return canvas.resize((size, size), resample=Image.BOX)


def star_points(cx, cy, half):
    """The 10 vertices of a five-pointed star whose outer radius R is `half` and whose bounding box (width
    2R·sin 72°, height R·(1 + cos 36°)) is centred on (cx, cy): points at angles 90° + k·72°, notches between."""
    top = cy - half * (1 + math.cos(math.radians(36))) / 2           # the bounding box's top = the top point
    centre_y = top + half
    points = []
    for k in range(10):
        radius = half if k % 2 == 0 else half * STAR_INNER
        angle = math.radians(-90 + 36 * k)                            # image y points down: -90° is up
        points.append((cx + radius * math.cos(angle), centre_y + radius * math.sin(angle)))
    return points


def _article(color):
    return "an" if color[0] in "aeiou" else "a"  # "an orange square"


def _phrase(obj, prep="in", word=None):
    color = obj["color"]
    return f"{_article(color)} {color} {obj['shape']} {prep} the {word or obj['position']}"


def caption_for(objects):
    """Canonical caption: "a red circle in the top left" ("an orange ..."), two objects joined by " and "."""
    return " and ".join(_phrase(o) for o in objects)


_WORD_TO_POSITION = {w: p for p, words in POSITION_WORDS.items() for w in words}
_PHRASE_RE = re.compile(r"(?:an?|one) ({c}) ({s}) (?:{p}) the ({w})".format(
    c="|".join(PALETTE), s="|".join(SHAPES + NEW_SHAPES), p="|".join(PREPOSITIONS),
    w="|".join(sorted(_WORD_TO_POSITION, key=len, reverse=True))))


def parse_caption(text):
    """Inverse of the caption forms above: text -> list of {color, shape, position}, in caption order.
    Raises ValueError naming the text when a part is not in the shapes language."""
    objects = []
    for part in text.strip().lower().rstrip(".").split(" and "):
        m = _PHRASE_RE.fullmatch(part.strip())
        if m is None:
            raise ValueError(f"parse_caption: {part!r} (in {text!r}) is not of the form "
                             f"'a <color> <shape> in the <position>'")
        objects.append(dict(color=m.group(1), shape=m.group(2), position=_WORD_TO_POSITION[m.group(3)]))
    return objects


def all_captions():
    """Every single-object phrase in every wording, plus every canonical two-object caption (11,520): the
    text a demo tokenizer is trained on. Paraphrased pairs are joins of the same phrases (no new words)."""
    singles = [f"{_article(c)} {c} {s} {prep} the {w}"
               for c in PALETTE for s in SHAPES for p in POSITIONS for prep in PREPOSITIONS
               for w in POSITION_WORDS[p]]
    objs = [dict(color=c, shape=s, position=p) for c in PALETTE for s in SHAPES for p in POSITIONS]
    pairs = [caption_for([a, b]) for a in objs for b in objs if a["position"] != b["position"]]
    return singles + pairs


def draw_scene(ds, i):
    """ShapesDataset.scene: item i's objects (with cx, cy, side) and caption, drawn from (seed, i) alone."""
    if ds.star_fraction:
        # Its own stream, so that with star_fraction = 0 not one draw of the scenes below changes.
        star_rng = np.random.default_rng([ds.seed, int(i), 1])
        if star_rng.random() < ds.star_fraction:
            return star_scene(ds, star_rng)
    rng = np.random.default_rng([ds.seed, int(i)])  # independent stream per (seed, index)
    # Every draw below happens in the same order whether or not clean=True: the clean subset is the same
    # scenes with the jitter, size and paraphrase switched off, not a different sample.
    n = 2 if rng.random() < ds.two_object_prob else 1
    names = list(POSITIONS) if n == 1 else list(PAIR_POSITIONS)
    objects, phrases = [], []
    for k in rng.choice(len(names), size=n, replace=False):
        pos = names[k]
        obj = dict(color=list(PALETTE)[rng.integers(len(PALETTE))],
                   shape=SHAPES[rng.integers(len(SHAPES))], position=pos)
        jitter = rng.uniform(-JITTER, JITTER, size=2)
        side = rng.uniform(*(SINGLE_SIDE if n == 1 else PAIR_SIDE))
        paraphrase = rng.random() < PARAPHRASE_PROB
        prep, word = PREPOSITIONS[rng.integers(2)], POSITION_WORDS[pos][rng.integers(2)]
        if ds.clean:
            jitter, side, paraphrase = (0.0, 0.0), CLEAN_SIDE[n], False
        obj.update(cx=POSITIONS[pos][0] + jitter[0], cy=POSITIONS[pos][1] + jitter[1], side=side)
        objects.append(obj)
        phrases.append(_phrase(obj, prep, word) if paraphrase else _phrase(obj))
    if n == 2:
        a, b = objects
        # Two boxes are apart when, along x or along y, their centres are further apart than the sum of
        # their half-sides plus the gap. If not, shrink both sides by the same factor until they are.
        sep = max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"]))
        half_sum = (a["side"] + b["side"]) / 2
        if half_sum > sep - PAIR_GAP:
            factor = (sep - PAIR_GAP) / half_sum
            a["side"], b["side"] = a["side"] * factor, b["side"] * factor
    return objects, " and ".join(phrases)

def star_scene(ds, rng):
    """A lone star: one of 8 colours x 5 positions, drawn like a clean object (exact position, side
    STAR_SIDE) or, outside the clean subset, with the usual jitter, sizes around it and paraphrases."""
    pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
    obj = dict(color=list(PALETTE)[rng.integers(len(PALETTE))], shape="star", position=pos)
    jitter, side = rng.uniform(-JITTER, JITTER, size=2), rng.uniform(STAR_SIDE - 0.05, STAR_SIDE + 0.05)
    paraphrase = rng.random() < PARAPHRASE_PROB
    prep, word = PREPOSITIONS[rng.integers(2)], POSITION_WORDS[pos][rng.integers(2)]
    if ds.clean:
        jitter, side, paraphrase = (0.0, 0.0), STAR_SIDE, False
    obj.update(cx=POSITIONS[pos][0] + jitter[0], cy=POSITIONS[pos][1] + jitter[1], side=side)
    return [obj], _phrase(obj, prep, word) if paraphrase else _phrase(obj)


# ----- Feature cache: the frozen encoders' outputs, computed once ----------------------------------------------
# DINOv3 and Gemma-2 never train, so every epoch recomputes the same latents and caption features. For data
# read more than once, `train.py --cache-features DIR` encodes each item once, writes the results here in
# safetensors shards, and trains from them: the encoders drop out of the step (benchmarks/bench_speed.py
# measures what that saves). Nothing is rounded on the way: the stored tensors are the ones the step would
# have computed (fp32 latents, Gemma features in Gemma's dtype), so a cached run trains on the same numbers.
#
#   DIR/shard-00000.safetensors   items 0..255: "{i}.latent" [C, h, w] raw DINOv3 patch features (not yet
#                                  normalised, so the statistics can change), "{i}.cap_feats" [L_i, D] Gemma
#                                  features of the formatted prompt, real tokens only (no padding);
#                                  metadata: the items' captions and system prompt keys (JSON)
#   DIR/index.json                 written last: length, the items' buckets, what made the features
#
# An unreadable image leaves its item out of the shard; reading it back gives None, which collate() drops and
# counts, exactly as for the image itself. Shards are written atomically, so an interrupted build resumes.

CACHE_SHARD_SIZE = 256   # items per shard: ~100 MB of latents at 256 px, ~1.6 GB at 1024 px (ViT-S+/16, fp32)


def cache_shard_path(folder, shard):
    return os.path.join(folder, f"shard-{shard:05d}.safetensors")


class FeatureCache(torch.utils.data.Dataset):
    """A finished feature cache, with the dataset interface: `len`, `bucket_of(i)` (the source image's
    bucket, in pixels, so batching is unchanged), `ds[i]` -> {latent, cap_feats, caption, system} or None."""

    def __init__(self, folder):
        index_path = os.path.join(folder, "index.json")
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{folder}: no index.json, so the feature cache is unfinished; run the same "
                                    "train.py command again to complete it")
        with open(index_path) as f:
            index = json.load(f)
        self.folder, self.length, self.identity = folder, index["length"], index["identity"]
        self.bucket_list = [tuple(b) for b in index["bucket_list"]]
        self.bucket_ids = index["bucket_ids"]
        self.skipped = 0          # items left out at build time are counted there, and by collate() here
        self._open = {}           # shard -> safe_open handle, per process (each DataLoader worker opens its own)

    def __len__(self):
        return self.length

    def bucket_of(self, i):
        return self.bucket_list[self.bucket_ids[i]]

    def _shard(self, shard):
        if shard not in self._open:
            handle = safe_open(cache_shard_path(self.folder, shard), framework="pt")
            meta = handle.metadata()
            self._open[shard] = (handle, set(handle.keys()), json.loads(meta["captions"]),
                                 json.loads(meta["systems"]))
        return self._open[shard]

    def __getitem__(self, i):
        # safetensors maps the shard and copies out only the two tensors asked for
        handle, keys, captions, systems = self._shard(i // CACHE_SHARD_SIZE)
        if f"{i}.latent" not in keys:                      # the image was unreadable when the cache was built
            return Unreadable(f"{self.folder} item {i}")
        return dict(latent=handle.get_tensor(f"{i}.latent"), cap_feats=handle.get_tensor(f"{i}.cap_feats"),
                    caption=captions[str(i)], system=systems[str(i)])


def fingerprint(path):
    """A cheap identity of a weight file or folder: file names, sizes, and the first and last MiB of each.
    Two random initialisations or two checkpoints differ in it; a copy of the same file does not."""
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]
    digest = hashlib.sha1()
    for name in files:
        size = os.path.getsize(name)
        digest.update(f"{os.path.basename(name)}:{size}".encode())
        with open(name, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def file_stamps(dataset):
    """A hash of every image file's size and modification time (None for the shapes, a pure function of their
    settings): an image replaced in place, same name and caption, changes it. One stat per file, on 16
    threads; the pixels themselves are not read (that would cost a pass over the whole dataset per start)."""
    if not hasattr(dataset, "records"):
        return None

    def stamp(rec):
        try:
            st = os.stat(rec["path"])
            return [st.st_size, st.st_mtime_ns]
        except OSError:
            return None
    with ThreadPoolExecutor(max_workers=16) as pool:
        stamps = list(pool.map(stamp, dataset.records))
    return hashlib.sha1(json.dumps(stamps).encode()).hexdigest()[:16]


def remove_stale_temporaries(folder):
    """Delete what a build killed by kill -9 left: shard temporaries whose writer (the pid in the name) is gone,
    and an unfinished index.json.tmp (rank 0 writes it last, so no live build of this folder is writing it)."""
    for name in os.listdir(folder):
        match = re.fullmatch(r"shard-\d+\.safetensors\.tmp(\d+)|index\.json\.tmp", name)
        if match and not (match.group(1) and _alive(int(match.group(1)))):
            os.remove(os.path.join(folder, name))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


@torch.no_grad()
def build_feature_cache(folder, dataset, encode, identity, rank=0, world=1, workers=0, barrier=lambda: None):
    """Encode every item of `dataset` once into `folder`. `encode(batch)` -> (latents [B,C,h,w], cap_feats
    [B,L,D], cap_mask [B,L]) for a collate() batch of images. Ranks take shards round-robin (`barrier` waits
    for all of them); each shard is written atomically, so a killed build loses at most the shards in flight
    and the next run finishes the rest. Rank 0 writes index.json last: its presence means the cache is
    complete."""
    os.makedirs(folder, exist_ok=True)
    if rank == 0:
        remove_stale_temporaries(folder)
    barrier()
    n, size = len(dataset), CACHE_SHARD_SIZE
    # Shard k holds items [k·size, (k+1)·size). A shard already on disk was finished by an earlier run (the
    # rename is its last act), so only the missing ones are this rank's work.
    todo = [k for k in range(rank, math.ceil(n / size), world)
            if not os.path.exists(cache_shard_path(folder, k))]
    bar = tqdm(total=sum(min(n, (k + 1) * size) - k * size for k in todo), desc=f"feature cache {folder}",
               disable=rank != 0, dynamic_ncols=True)
    for k in todo:
        tensors, captions, systems = {}, {}, {}
        # collate_fn=list keeps the items as they are (None for an unreadable image), in index order. The
        # loader's own generator: drawing its seed from the global RNG would change the DiT's initialisation.
        loader = torch.utils.data.DataLoader(dataset, sampler=range(k * size, min(n, (k + 1) * size)), batch_size=64,
                                             collate_fn=list, num_workers=workers, generator=torch.Generator())
        first = k * size
        for items in loader:
            groups = {}                                   # images of one size encode together
            for i, item in enumerate(items, start=first):
                if item:
                    groups.setdefault(tuple(item["image"].shape), []).append((i, item))
            first += len(items)
            for members in groups.values():
                latents, cap_feats, cap_mask = encode(collate([item for _, item in members]))
                for row, (i, item) in enumerate(members):
                    tensors[f"{i}.latent"] = latents[row].cpu().contiguous()                      # [C, h, w]
                    tensors[f"{i}.cap_feats"] = cap_feats[row, :int(cap_mask[row].sum())].cpu().contiguous()
                    captions[i], systems[i] = item["caption"], item["system"]
            bar.update(len(items))
        meta = dict(captions=json.dumps(captions), systems=json.dumps(systems))
        path = cache_shard_path(folder, k)
        save_file(tensors, f"{path}.tmp{os.getpid()}", metadata=meta)        # then renamed: never half a shard
        os.replace(f"{path}.tmp{os.getpid()}", path)
    bar.close()
    barrier()
    if rank == 0:
        # Buckets come from the source dataset, so a FeatureCache batches exactly as the images would.
        bucket_list = sorted({tuple(dataset.bucket_of(i)) for i in range(n)})
        position = {b: j for j, b in enumerate(bucket_list)}
        index = dict(identity=identity, length=n, bucket_list=bucket_list,
                     bucket_ids=[position[tuple(dataset.bucket_of(i))] for i in range(n)])
        with open(os.path.join(folder, "index.json.tmp"), "w") as f:
            json.dump(index, f)
        os.replace(os.path.join(folder, "index.json.tmp"), os.path.join(folder, "index.json"))
        tqdm.write(f"feature cache complete: {folder} ({n} items)")
    barrier()
