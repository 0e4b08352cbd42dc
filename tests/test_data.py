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
    # spec nextdit_flow_train.md §2: 15 / 27 / 51 buckets at 256 / 512 / 1024 for patch 16
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
    assert e0 == _epoch(b, 0)
    assert e0 != _epoch(a, 1) and e0 != _epoch(data.BucketBatchSampler(ds, 4, seed=4), 0)
    assert len(e0) == len(a)
    flat = [i for batch in e0 for i in batch]
    assert len(flat) == len(set(flat)), "drop_last=True must not repeat an index within an epoch"
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


def test_sampler_without_drop_last_covers_everything_with_full_batches():
    ds = FakeDataset(50)
    s = data.BucketBatchSampler(ds, 4, seed=0, drop_last=False)
    batches = _epoch(s, 0)
    assert len(batches) == len(s)
    assert all(len(b) == 4 and len({ds.bucket_of(i) for i in b}) == 1 for b in batches)
    assert {i for b in batches for i in b} == set(range(len(ds)))


def test_sampler_rejects_impossible_batch():
    with pytest.raises(ValueError, match="no bucket holds a full global batch"):
        data.BucketBatchSampler(FakeDataset(20), 8, world_size=2)


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
        loader = torch.utils.data.DataLoader(ds, batch_sampler=data.BucketBatchSampler(ds, 1, drop_last=False),
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
            assert a["position"] != b["position"]
            gap = max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"])) - (a["side"] + b["side"]) / 2
            assert gap >= data.PAIR_GAP - 1e-9, "two objects touch"
    assert 0.25 < n_two / 600 < 0.35
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
    for p in data.PREVIEW_PROMPTS:
        assert data.caption_for(data.parse_caption(p)) == p
    with pytest.raises(ValueError, match="not of the form"):
        data.parse_caption("a mauve hexagon somewhere")
