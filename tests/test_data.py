"""Tests for data.py: buckets, crops, the bucketed distributed sampler, bad data, the shapes dataset."""
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data


# ----- Buckets and crops ------------------------------------------------------------------------------------

def test_bucket_counts_match_official():
    # the official generate_crop_size_list: 15 / 27 / 51 buckets at 256 / 512 / 1024 for patch 16
    assert [len(data.buckets(r)) for r in (256, 512, 1024)] == [15, 27, 51]
    # ... and the 256 list spelled out there (w x h), plus transposes
    listed_wh = [(512, 128), (464, 128), (448, 128), (448, 144), (400, 144), (336, 192), (320, 192), (256, 256)]
    expected = {(h, w) for w, h in listed_wh} | {(w, h) for w, h in listed_wh}
    assert set(data.buckets(256)) == expected


@pytest.mark.parametrize("res,patch", [(256, 16), (1024, 16), (128, 8)])
def test_buckets_respect_token_budget_and_ratio(res, patch):
    for h, w in data.buckets(res, patch):
        assert h % patch == 0 and w % patch == 0
        assert (h // patch) * (w // patch) <= (res // patch) ** 2
        assert max(h, w) / min(h, w) <= 4
    assert data.buckets(res, patch, max_ratio=1) == [(res, res)]


def test_buckets_scale_with_patch():
    # 128 px at patch 8 has the same token grids as 256 px at patch 16 (the demo's stage-1 geometry)
    assert data.buckets(128, 8) == [(h // 2, w // 2) for h, w in data.buckets(256, 16)]


def _disc_image(w, h):
    """White image with a black disc at its centre (radius 30% of the short side)."""
    im = Image.new("RGB", (w, h), (255, 255, 255))
    r = 0.3 * min(w, h)
    ImageDraw.Draw(im).ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=(0, 0, 0))
    return im


@pytest.mark.parametrize("w,h", [(1000, 250), (300, 97), (400, 1000), (777, 777), (2000, 640), (90, 160)])
def test_crop_never_stretches_and_hits_bucket(w, h):
    bucket_list = data.buckets(256)
    bh, bw = data.nearest_bucket(h, w, bucket_list)
    out = data.resize_to_cover(_disc_image(w, h), (bh, bw))
    assert out.size == (bw, bh)
    dark = np.asarray(out.convert("L")) < 128
    ys, xs = np.nonzero(dark)
    disc_w, disc_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert abs(disc_w - disc_h) <= 2, f"disc became {disc_w}x{disc_h}: the crop stretched the image"
    # the chosen bucket is the one whose aspect is closest to the image's
    best = min(bucket_list, key=lambda b: abs(np.log((b[1] / b[0]) / (w / h))))
    assert abs(np.log((bw / bh) / (w / h))) <= abs(np.log((best[1] / best[0]) / (w / h))) + 1e-9


def test_nearest_bucket_examples():
    assert data.nearest_bucket(250, 1000, data.buckets(256)) == (128, 512)   # 4:1 landscape
    assert data.nearest_bucket(500, 500, data.buckets(256)) == (256, 256)
    assert data.nearest_bucket(1000, 600, data.buckets(256)) == (320, 192)   # portrait 0.6


# ----- Sampler ----------------------------------------------------------------------------------------------

class FakeDataset:
    """Items in three buckets of uneven sizes, interleaved, so that bucketing has something to do."""

    def __init__(self, n=110):
        self.sizes = [[(64, 64), (32, 128), (128, 32)][i % 3 if i % 7 else 0] for i in range(n)]

    def __len__(self):
        return len(self.sizes)

    def bucket_of(self, i):
        return self.sizes[i]


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_deterministic_single_bucket_no_repeats():
    ds = FakeDataset()
    a, b = data.BucketBatchSampler(ds, 4, seed=3), data.BucketBatchSampler(ds, 4, seed=3)
    e0 = _epoch(a, 0)
    assert len(e0) == len(a)
    assert e0 == _epoch(b, 0)
    assert e0 != _epoch(a, 1) and e0 != _epoch(data.BucketBatchSampler(ds, 4, seed=4), 0)
    flat = [i for batch in e0 for i in batch]
    assert len(flat) == len(set(flat)), "the first epoch (nothing carried over) must not repeat an index"
    for batch in e0:
        assert len(batch) == 4 and len({ds.bucket_of(i) for i in batch}) == 1
    assert len({ds.bucket_of(batch[0]) for batch in e0}) == 3  # all buckets take part


def test_sampler_ranks_are_disjoint_and_union_is_single_process_batch():
    ds, B, W = FakeDataset(), 3, 4
    single = _epoch(data.BucketBatchSampler(ds, B * W, seed=7), 2)
    per_rank = [_epoch(data.BucketBatchSampler(ds, B, rank=r, world_size=W, seed=7), 2) for r in range(W)]
    assert all(len(p) == len(single) for p in per_rank)
    for step, big in enumerate(single):
        shares = [p[step] for p in per_rank]
        flat = [i for s in shares for i in s]
        assert len(flat) == len(set(flat)), "ranks overlap"
        assert sorted(flat) == sorted(big)
        assert len({ds.bucket_of(i) for i in flat}) == 1, "ranks must agree on the bucket at every step"


def test_sampler_resumes_mid_epoch_exactly():
    ds = FakeDataset()
    full = _epoch(data.BucketBatchSampler(ds, 2, rank=1, world_size=2, seed=5), 3)
    s = data.BucketBatchSampler(ds, 2, rank=1, world_size=2, seed=5)
    s.set_epoch(3)
    it = iter(s)
    consumed = []
    for _ in range(4):
        consumed.append(next(it))
        s.batches_done += 1  # the training loop counts what it consumed ...
    for _ in range(2):
        next(it)  # ... not what a DataLoader prefetched and never trained on
    state = s.state_dict()
    assert state == {"epoch": 3, "batches_done": 4}
    fresh = data.BucketBatchSampler(ds, 2, rank=1, world_size=2, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    fresh.set_epoch(3)  # a trainer loop calls this again; the resume point must survive it
    assert consumed + list(fresh) == full
    fresh.set_epoch(4)  # the epoch after runs whole
    assert fresh.batches_done == 0 and list(fresh) == _epoch(data.BucketBatchSampler(ds, 2, 1, 2, seed=5), 4)
    with pytest.raises(ValueError, match="batches_done"):
        fresh.load_state_dict({"epoch": 0, "batches_done": 10_000})


class SizedBuckets:
    """A dataset whose buckets hold the given numbers of items, interleaved."""

    def __init__(self, counts):
        self.sizes = [size for _, size in sorted((k / n, (16 * (b + 1), 16)) for b, n in enumerate(counts)
                                                 for k in range(n))]

    def __len__(self):
        return len(self.sizes)

    def bucket_of(self, i):
        return self.sizes[i]


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_trains_every_image_of_buckets_smaller_than_the_global_batch(world):
    # Global batch 8: one big bucket (61 = 7 batches + 5 left over) and two smaller than a batch (5 and 3).
    ds, G, epochs = SizedBuckets([61, 5, 3]), 8, 6
    samplers = [data.BucketBatchSampler(ds, G // world, rank=r, world_size=world, seed=2) for r in range(world)]
    drawn = np.zeros(len(ds), dtype=int)
    for epoch in range(epochs):
        per_rank = [_epoch(s, epoch) for s in samplers]
        assert len({len(p) for p in per_rank}) == 1, "every rank must take the same number of steps"
        for shares in zip(*per_rank):
            flat = [i for share in shares for i in share]
            assert len(flat) == G and len({ds.bucket_of(i) for i in flat}) == 1, "one bucket, one size per step"
            if ds.bucket_of(flat[0]) == (16, 16):      # a bucket of at least one batch never repeats inside one
                assert len(set(flat)) == G
            np.add.at(drawn, flat, 1)
    assert (drawn > 0).all(), f"never drawn: {sorted(set(ds.sizes[i] for i in np.flatnonzero(drawn == 0)))}"
    # Each image enters the queue once per epoch; at most G - 1 per bucket are still waiting at the end.
    assert drawn.max() <= epochs + 1 and drawn.sum() > epochs * len(ds) - 3 * (G - 1)
    # With a single process the same global batches come out (the union over ranks).
    if world == 2:
        one = data.BucketBatchSampler(ds, G, seed=2)
        for epoch in range(epochs):
            assert [sorted(b) for b in _epoch(one, epoch)] == [
                sorted(x + y) for x, y in zip(*[_epoch(s, epoch) for s in samplers])]


def test_sampler_needs_data():
    with pytest.raises(ValueError, match="empty"):
        data.BucketBatchSampler(FakeDataset(0), 8)


# ----- Bad data ---------------------------------------------------------------------------------------------

@pytest.fixture
def image_dir(tmp_path):
    """good.png (80x40), good2.jpg (30x60), corrupt.jpg (a JPEG cut in half), no missing.png."""
    Image.new("RGB", (80, 40), (200, 10, 10)).save(tmp_path / "good.png")
    Image.new("RGB", (30, 60), (10, 200, 10)).save(tmp_path / "good2.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "corrupt.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return tmp_path


def _write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("with_sizes", [False, True])
def test_corrupt_and_missing_images_are_skipped_and_counted(image_dir, caplog, monkeypatch, with_sizes):
    sizes = dict(width=64, height=64) if with_sizes else {}
    lines = [{"path": "good.png", "prompt": "red"},
             {"path": "corrupt.jpg", "prompt": "noise", **sizes},
             {"path": "missing.png", "prompt": "ghost", **sizes},
             "",  # blank lines are fine
             {"image_path": "good2.jpg", "super_high_quality_caption": "green"}]
    jsonl = _write_jsonl(image_dir / "train.jsonl", lines)
    monkeypatch.chdir(image_dir.parent)  # paths are relative to the JSONL file, not to the working directory
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.JsonlDataset(str(jsonl), 64)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=data.BucketBatchSampler(ds, 1),
                                             collate_fn=data.collate)
        batches = list(loader)
    assert ds.skipped == 2
    assert sum(b["dropped"] for b in batches) == len(ds) - 2  # whatever was not skipped at start-up
    good = [b for b in batches if b["captions"]]
    assert sorted(c for b in good for c in b["captions"]) == ["green", "red"]
    assert sorted(s for b in good for s in b["systems"]) == ["align", "base"]
    for b in good:
        assert b["images"].shape[1:] == (3, *ds.bucket_of(0 if b["captions"] == ["red"] else len(ds) - 1))
        assert b["images"].min() >= -1 and b["images"].max() <= 1
    logged = caplog.text
    assert "corrupt.jpg" in logged and "missing.png" in logged


@pytest.mark.parametrize("bad_line,message", [
    ('{"path": "good.png", "prompt": "oops"', "not valid JSON"),
    ('{"prompt": "no path"}', "needs 'path'"),
    ('{"path": "good.png", "caption": "wrong key"}', "'prompt' missing"),
    ('["a", "list"]', "expected a JSON object"),
    ('{"path": "good.png", "prompt": "x", "width": 0, "height": 5}', "positive integers"),
])
def test_bad_jsonl_line_stops_startup_with_file_and_line(image_dir, bad_line, message):
    jsonl = _write_jsonl(image_dir / "bad.jsonl", [{"path": "good.png", "prompt": "a"}, "", bad_line])
    with pytest.raises(ValueError, match=message) as err:
        data.JsonlDataset(str(jsonl), 64)
    assert f"{jsonl}:3" in str(err.value)


def test_folder_dataset_and_open_dataset(image_dir, tmp_path):
    (image_dir / "good.txt").write_text("a red thing\n")
    (image_dir / "good2.txt").write_text("a green thing")
    ds = data.open_dataset(str(image_dir), 64, patch=8)  # corrupt.jpg has no caption: left out
    assert isinstance(ds, data.FolderDataset) and len(ds) == 2
    item = ds[0]
    assert item["caption"] == "a red thing" and item["system"] == "base"
    assert item["image"].shape == (3, *ds.bucket_of(0))
    h, w = ds.bucket_of(0)
    assert w > h  # 80x40 landscape went to a landscape bucket
    assert isinstance(data.open_dataset("shapes:clean", 32), data.ShapesDataset)
    with pytest.raises(ValueError, match="expected 'shapes'"):
        data.open_dataset(str(tmp_path / "nope.txt"), 64)


def test_uncaptioned_images_train_on_the_system_prompt_alone(image_dir):
    import text
    jsonl = _write_jsonl(image_dir / "train.jsonl", [{"path": "good.png", "prompt": None},
                                                     {"path": "good.png", "prompt": "  "},
                                                     {"image_path": "good2.jpg", "super_high_quality_caption": ""}])
    ds = data.JsonlDataset(str(jsonl), 64)
    for i in range(len(ds)):
        item = ds[i]
        # what the trainer feeds Gemma: the official item processor's system_prompt + "" ...
        assert text.format_prompt(item["caption"], item["system"]) == text.SYSTEM_PROMPTS[item["system"]]
    # ... not the bare "" of caption dropout, the unconditional input
    assert text.format_prompt(ds[0]["caption"], "base") != ""


def test_jsonl_paths_as_given_first_then_next_to_the_jsonl(tmp_path, monkeypatch, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "lists").mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "images" / "cwd.png")      # official: cwd-relative
    Image.new("RGB", (40, 40), (10, 200, 10)).save(tmp_path / "lists" / "beside.png")    # next to the JSONL
    Image.new("RGB", (40, 40), (10, 10, 200)).save(tmp_path / "abs.png")
    jsonl = _write_jsonl(tmp_path / "lists" / "train.jsonl", [
        {"path": "images/cwd.png", "prompt": "cwd"}, {"path": "beside.png", "prompt": "beside"},
        {"path": str(tmp_path / "abs.png"), "prompt": "absolute"}, {"path": "nowhere.png", "prompt": "ghost"}])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.JsonlDataset("lists/train.jsonl", 32, patch=8, max_ratio=1)      # one bucket: no header reads
        items = [ds[i] for i in range(len(ds))]
    assert sorted(it["caption"] for it in items if it) == ["absolute", "beside", "cwd"] and ds.skipped == 1
    assert all(os.path.isabs(r["path"]) for r in ds.records)   # workers and later chdirs do not matter
    # the skip names both places it looked
    assert str(tmp_path / "nowhere.png") in caplog.text and str(tmp_path / "lists" / "nowhere.png") in caplog.text


def _grey16(value, size=(32, 32)):
    return Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))   # mode I;16


def _odd_modes():
    """Images in modes that need more than convert("RGB"), with what a viewer shows (on white)."""
    la = Image.new("LA", (32, 32), (0, 255))
    la.paste((0, 0), (0, 0, 16, 32))                                        # left half transparent
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(0, (0, 0, 16, 32))
    p.info["transparency"] = 0                                            # palette entry 0 (black) transparent
    left_white_right = lambda right: np.concatenate([np.full((32, 16, 3), 255), np.full((32, 16, 3), right)], 1)
    buf = io.BytesIO()
    _grey16(32768).save(buf, "PNG")                                       # a 16-bit greyscale PNG, 50% grey
    return [(Image.open(io.BytesIO(buf.getvalue())), np.full((32, 32, 3), 128)),
            (la, left_white_right((0, 0, 0))), (p, left_white_right((255, 0, 0))),
            (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), np.full((32, 32, 3), (255, 0, 0)))]


@pytest.mark.parametrize("index", range(4), ids=["grey16", "LA", "P+transparency", "CMYK"])
def test_training_and_dino_preprocess_convert_images_alike(tmp_path, index):
    import dino
    image, expected = _odd_modes()[index]
    image.save(tmp_path / "odd.png") if image.mode != "CMYK" else image.save(tmp_path / "odd.jpg", quality=100)
    name = "odd.png" if image.mode != "CMYK" else "odd.jpg"
    (tmp_path / "odd.txt").write_text("odd")
    item = data.FolderDataset(str(tmp_path), 32, patch=8, max_ratio=1)[0]            # training: [-1, 1]
    pixels = (item["image"] + 1) * 127.5                                             # [3, 32, 32], 0..255
    assert (pixels - torch.tensor(expected).permute(2, 0, 1)).abs().max() <= 2, f"{name}: wrong colours"
    with Image.open(tmp_path / name) as im:
        x = dino.preprocess(im)                                                      # ImageNet-normalised
    mean, std = torch.tensor(dino.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(dino.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x[0] * std + mean, pixels / 255, atol=1e-5), "training and dino.preprocess disagree"


def test_square_crops_follow_the_official_autoencoder_recipe(image_dir):
    (image_dir / "good.txt").write_text("wide")                       # 80 x 40
    (image_dir / "good2.txt").write_text("tall")                      # 30 x 60
    ds = data.open_dataset(str(image_dir), 32, patch=8, square=True)
    assert [ds.bucket_of(i) for i in range(len(ds))] == [(32, 32)] * 2   # one batch of any mix
    wide, tall = ds[0]["image"], ds[1]["image"]
    assert wide.shape == (3, 32, 64) and tall.shape == (3, 64, 32)     # shorter side resized, not cropped
    gens = lambda seed: [torch.Generator().manual_seed(seed + i) for i in range(2)]
    crops = data.random_square_crops([wide, tall], 32, gens(0))
    assert crops.shape == (2, 3, 32, 32)
    assert torch.equal(crops, data.random_square_crops([wide, tall], 32, gens(0)))   # keyed: reproducible
    ramp = torch.arange(64.0).expand(3, 32, 64)                       # value = column: reads the crop's left edge
    lefts = {int(data.random_square_crops([ramp], 32, [torch.Generator().manual_seed(s)])[0, 0, 0, 0])
             for s in range(40)}
    assert len(lefts) > 10 and min(lefts) >= 0 and max(lefts) <= 32, "the crop position must vary over the image"


# ----- Shapes -----------------------------------------------------------------------------------------------

def test_shapes_deterministic_by_seed_and_index():
    a, b = data.ShapesDataset(32, seed=1), data.ShapesDataset(32, seed=1)
    for i in (0, 5, 123_456_789):  # past `length` too: the data is infinite
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    other = data.ShapesDataset(32, seed=2)
    assert any(a[i]["caption"] != other[i]["caption"] for i in range(10))
    item = a[0]
    assert item["image"].shape == (3, 32, 32) and item["system"] == "base" and a.bucket_of(7) == (32, 32)
    assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_shapes_scenes_follow_the_rules():
    ds = data.ShapesDataset(64, seed=0)
    n_two, paraphrased = 0, 0
    for i in range(600):
        objects, caption = ds.scene(i)
        parsed = data.parse_caption(caption)
        assert parsed == [{k: o[k] for k in ("color", "shape", "position")} for o in objects]
        paraphrased += caption != data.caption_for(objects)
        for o in objects:
            px, py = data.POSITIONS[o["position"]]
            assert abs(o["cx"] - px) <= data.JITTER and abs(o["cy"] - py) <= data.JITTER
        if len(objects) == 1:
            assert data.SINGLE_SIDE[0] <= objects[0]["side"] <= data.SINGLE_SIDE[1]
        else:
            n_two += 1
            a, b = objects
            assert a["position"] != b["position"] and {a["position"], b["position"]} <= set(data.PAIR_POSITIONS)
            gap = max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"])) - (a["side"] + b["side"]) / 2
            assert gap >= data.PAIR_GAP - 1e-9, "two objects touch"
            assert min(a["side"], b["side"]) >= 0.25, "a pair on two corners has room for lone-sized objects"
    assert 0.45 < n_two / 600 < 0.55
    assert 0.1 < paraphrased / 600 < 0.6


def test_shapes_clean_subset_is_canonical_and_centred():
    ds = data.ShapesDataset(64, seed=0, clean=True)
    for i in range(100):
        objects, caption = ds.scene(i)
        assert caption == data.caption_for(objects)
        for o in objects:
            assert (o["cx"], o["cy"]) == data.POSITIONS[o["position"]]


def test_render_colours_and_antialiasing():
    objects = [dict(color="blue", shape="square", position="top left"),
               dict(color="orange", shape="triangle", position="bottom right")]
    arr = np.asarray(data.render_shapes(objects, 64))
    for o in objects:
        cx, cy = data.POSITIONS[o["position"]]
        assert tuple(arr[int(cy * 64) + 2, int(cx * 64)]) == data.PALETTE[o["color"]]
    assert tuple(arr[0, 0]) == data.BACKGROUND
    colours = {tuple(p) for p in arr.reshape(-1, 3)}
    assert len(colours) > 3, "edges should blend (anti-aliasing)"


def test_captions_round_trip():
    caps = data.all_captions()
    assert len(caps) == len(set(caps))
    for cap in caps[:: 37]:
        assert data.caption_for(data.parse_caption(cap)).split(" and ")[0].split()[1:3] == cap.split()[1:3]
    assert data.parse_caption("an orange triangle at the upper left") == [
        dict(color="orange", shape="triangle", position="top left")]
    import train                                # the preview prompts train.py draws every few steps
    for p in train.PREVIEW_PROMPTS:
        assert data.caption_for(data.parse_caption(p)) == p
    with pytest.raises(ValueError, match="not of the form"):
        data.parse_caption("a mauve hexagon somewhere")
