"""train.py: stages chain, a killed run resumes exactly, checkpoints are atomic, DDP equals one process,
a compiled step equals an eager one. Everything on the 'tiny' preset and the built-in shapes dataset."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import machinery
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--preset", "tiny", "--no-compile", "--workers", "0", "--preview-every", "0"]


def run(out, *extra):
    train.main(["--out", str(out), *FAST, *extra])


def weights(path):
    return load_file(str(path))


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max():.3g}"


def copy_encoders(src, dst):
    """Two runs compared weight for weight must share their random frozen encoders."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "encoders.json"), dst)
    shutil.copytree(os.path.join(src, "encoders"), os.path.join(dst, "encoders"))


def test_stage1_writes_the_documented_files_and_stage2_starts_from_it(tiny_run, tmp_path):
    stage1 = tiny_run / "stage1"
    for name in ("model.safetensors", "ema.safetensors", "config.json"):
        assert (stage1 / name).exists()
    assert (stage1 / "latest" / "COMPLETE").exists()
    assert (tiny_run / "log.jsonl").read_text().strip()
    # Stage 2 with learning rate 0: its weights must be exactly stage 1's final (non-EMA) weights.
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run(run_dir, "--stage", "2", "--max-steps", "1", "--lr", "0")
    assert_same(weights(run_dir / "stage2" / "model.safetensors"), weights(stage1 / "model.safetensors"))


def test_stage2_without_stage1_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="stage1.*does not exist"):
        run(tmp_path, "--stage", "2", "--max-steps", "1")


def test_killed_run_resumes_exactly(tiny_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    copy_encoders(tiny_run, straight)
    copy_encoders(tiny_run, resumed)
    run(straight, "--stage", "1", "--max-steps", "6", "--ckpt-every", "3")
    run(resumed, "--stage", "1", "--max-steps", "3", "--ckpt-every", "3")       # "killed" after step 3
    run(resumed, "--stage", "1", "--max-steps", "6", "--ckpt-every", "3")       # the same command again
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(weights(straight / "stage1" / name), weights(resumed / "stage1" / name))


def test_killed_checkpoint_write_leaves_the_previous_one(tiny_run, tmp_path, monkeypatch):
    stage_dir = tmp_path / "stage1"
    shutil.copytree(tiny_run / "stage1" / "latest", stage_dir / "latest")
    before = weights(stage_dir / "latest" / "model.safetensors")

    def die(*a, **k):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(machinery, "save_file", die)
    state = dict(weights=dict(model={"w": torch.zeros(1)}), step=99)
    with pytest.raises(KeyboardInterrupt):
        machinery.save_latest(str(stage_dir), 0, state, {})
    assert machinery.find_latest(str(stage_dir)) == str(stage_dir / "latest")
    assert_same(weights(stage_dir / "latest" / "model.safetensors"), before)
    # A kill between the two renames leaves only latest.old/, which is still found.
    os.replace(stage_dir / "latest", stage_dir / "latest.old")
    assert machinery.find_latest(str(stage_dir)) == str(stage_dir / "latest.old")


def test_two_processes_equal_one_process(tiny_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    copy_encoders(tiny_run, one)
    copy_encoders(tiny_run, two)
    common = [*FAST, "--stage", "1", "--max-steps", "3", "--global-batch-size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(one), *common], check=True,
                   cwd=ROOT, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    os.path.join(ROOT, "train.py"), "--out", str(two), *common], check=True, cwd=ROOT, env=env)
    assert_same(weights(one / "stage1" / "model.safetensors"), weights(two / "stage1" / "model.safetensors"),
                atol=1e-5)


def test_gradient_accumulation_equals_a_big_batch(tiny_run, tmp_path):
    big, accum = tmp_path / "big", tmp_path / "accum"
    copy_encoders(tiny_run, big)
    copy_encoders(tiny_run, accum)
    run(big, "--stage", "1", "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "4")
    run(accum, "--stage", "1", "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "2")
    assert_same(weights(big / "stage1" / "model.safetensors"), weights(accum / "stage1" / "model.safetensors"),
                atol=1e-5)


def test_autoencoder_stage_trains_the_decoder_that_previews_use(tiny_run):
    import sample
    decoder_file = tiny_run / "autoencoder_P" / "stage1" / "model.safetensors"
    assert decoder_file.exists()
    assert sample.find_parts(str(tiny_run))["decoder"] == str(decoder_file)


def test_autoencoder_follows_the_official_recipe_random_square_crops_resume_exactly(tiny_run, tmp_path):
    import json

    import numpy as np
    from PIL import Image
    # The release's autoencoder configs: 64 per GPU at 256 and 512 px with random square crops, 3 per GPU in
    # aspect buckets at 1024 px (autoencoder/configs/pure/*.yaml).
    assert train.PRESETS["2B"]["ae_micro_batch"] == (64, 64, 3)
    assert train.PRESETS["2B"]["ae_crop"] == ("random", "random", "bucket")
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate([(64, 40), (40, 72), (48, 48), (90, 36), (36, 50), (60, 44)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "prompt": "noise"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    ae = ["--autoencoder", "P", "--stage", "1", "--data", str(folder / "pairs.jsonl"), "--ckpt-every", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out in (straight, resumed):
        copy_encoders(tiny_run, out)
    run(straight, *ae, "--max-steps", "4")                     # 6 non-square images, batch 4: crosses an epoch
    run(resumed, *ae, "--max-steps", "2")                      # "killed" after step 2
    run(resumed, *ae, "--max-steps", "4")
    final = lambda out: weights(out / "autoencoder_P" / "stage1" / "model.safetensors")
    assert_same(final(straight), final(resumed))


def test_compiled_training_step_matches_eager():
    import flow
    import model as dit_lib
    torch.manual_seed(0)
    cfg = dict(dit_lib.NEXTDIT_CONFIGS["tiny"], in_channels=8, cap_feat_dim=16)
    eager = dit_lib.NextDiT(**cfg)
    for p in eager.parameters():                 # leave the zero init: every path must carry signal
        torch.nn.init.normal_(p, std=0.05)
    compiled_model = dit_lib.NextDiT(**cfg)
    compiled_model.load_state_dict(eager.state_dict())
    x1, x0 = torch.randn(2, 8, 4, 6), torch.randn(2, 8, 4, 6)
    t = torch.rand(2)
    cap, mask = torch.randn(2, 5, 16), torch.tensor([[1] * 5, [1] * 3 + [0] * 2]).bool()

    def step(m, fn):
        loss = flow.training_loss(fn(flow.interpolate(x0, x1, t), t, cap, mask), x0, x1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    loss_e, grads_e = step(eager, eager)
    loss_c, grads_c = step(compiled_model, torch.compile(compiled_model))
    assert torch.allclose(loss_e, loss_c, rtol=1e-5, atol=1e-6)
    for n in grads_e:
        if grads_e[n] is None:                   # norm_final.weight: in the released layout, never used
            assert grads_c[n] is None, n
            continue
        assert torch.allclose(grads_e[n], grads_c[n], rtol=1e-4, atol=1e-6), n


def test_bad_images_are_skipped_counted_and_never_stop_a_run(tiny_run, tmp_path):
    import json

    from PIL import Image
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(folder / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "prompt": f"a square number {i}"}))
    Image.new("RGB", (40, 40)).save(folder / "corrupt.jpg")
    (folder / "corrupt.jpg").write_bytes((folder / "corrupt.jpg").read_bytes()[:100])   # truncated JPEG
    lines += [json.dumps({"path": "corrupt.jpg", "prompt": "x"}), json.dumps({"path": "missing.png", "prompt": "y"})]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)
    run(out, "--stage", "1", "--data", str(folder / "pairs.jsonl"), "--max-steps", "2", "--global-batch-size", "4")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["skipped_images"] == 2      # one epoch = both bad files, once each
    assert (out / "stage1" / "model.safetensors").exists()


def test_malformed_jsonl_stops_start_up_naming_file_and_line(tiny_run, tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"path": "a.png", "prompt": "ok"}\n{"path": "b.png", "prompt": \n')
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)
    with pytest.raises(SystemExit, match=r"pairs\.jsonl:2"):      # one line naming file and line, no traceback
        run(out, "--stage", "1", "--data", str(tmp_path / "pairs.jsonl"), "--max-steps", "1")


def torchrun(out, port, *extra):
    """`torchrun --nproc_per_node=2 train.py --fsdp ...` on the CPU (gloo), one thread per process."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, "--fsdp", *extra], check=True, cwd=ROOT,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


def last_log_row(run_dir):
    import json
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])


def test_fsdp_equals_one_process_and_resumes_exactly_under_any_wrapper(tiny_run, tmp_path):
    import model as dit_lib
    one, straight, resumed, crossed = (tmp_path / n for n in ("one", "straight", "resumed", "crossed"))
    for d in (one, straight, resumed):
        copy_encoders(tiny_run, d)
    common = ["--stage", "1", "--global-batch-size", "4", "--ckpt-every", "2"]
    # Reference: one process, no wrapper, 4 images per micro-batch.
    run(one, *common, "--max-steps", "4")
    # FSDP on 2 processes with micro-batches of 1: 2 accumulated micro-steps per rank, so the non-final ones
    # run with gradient sync off. The same 4 images per step, so the same weights up to float rounding.
    torchrun(straight, 29521, *common, "--max-steps", "4", "--micro-batch-size", "1")
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(weights(one / "stage1" / name), weights(straight / "stage1" / name), atol=1e-5)
    # clip_grad_norm_ over DTensor shards returned the norm of the whole gradient, not of one rank's shard.
    ref_row, fsdp_row = last_log_row(one), last_log_row(straight)
    assert fsdp_row["step"] == ref_row["step"] == 4
    assert fsdp_row["grad_norm"] == pytest.approx(ref_row["grad_norm"], rel=1e-4)
    assert fsdp_row["loss"] == pytest.approx(ref_row["loss"], rel=1e-4)
    # The stage's files are plain full state dicts that sample.py's loader reads.
    dit_lib.load_nextdit(str(straight / "stage1" / "ema.safetensors"))

    # "Killed" after step 2, then the same FSDP command again: the gathered latest/ is scattered back exactly.
    torchrun(resumed, 29522, *common, "--max-steps", "2", "--micro-batch-size", "1")
    shutil.copytree(resumed, crossed)
    torchrun(resumed, 29523, *common, "--max-steps", "4", "--micro-batch-size", "1")
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(weights(straight / "stage1" / name), weights(resumed / "stage1" / name))
    # latest/ does not depend on the wrapper: the FSDP checkpoint continues in one plain process.
    run(crossed, *common, "--max-steps", "4")
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(weights(one / "stage1" / name), weights(crossed / "stage1" / name), atol=1e-5)


def test_feature_cache_trains_on_the_same_numbers_and_finishes_an_interrupted_build(tiny_run, tmp_path, monkeypatch):
    import json

    import data
    import dino
    import text
    monkeypatch.setattr(train, "CAPTION_DROPOUT", 0.5)          # many dropped captions: the empty-prompt path
    monkeypatch.setattr(data, "CACHE_SHARD_SIZE", 8)           # 12 items -> 2 shards
    plain, cached, cache = tmp_path / "plain", tmp_path / "cached", tmp_path / "cache"
    copy_encoders(tiny_run, plain)
    copy_encoders(tiny_run, cached)
    common = ["--stage", "1", "--max-steps", "4", "--data-limit", "12", "--global-batch-size", "4"]
    run(plain, *common)
    run(cached, *common, "--cache-features", str(cache))
    # Same batches, same draws, features computed once instead of every step: the same weights.
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(weights(plain / "stage1" / name), weights(cached / "stage1" / name), atol=1e-5)

    # What is stored is what the encoders compute, for every item, with the caption's real tokens only.
    (folder,) = cache.iterdir()
    features = data.FeatureCache(str(folder))
    shapes = data.ShapesDataset(32, length=12)
    assert len(features) == 12 and features.bucket_of(5) == shapes.bucket_of(5)
    encoders = json.loads((cached / "encoders.json").read_text())
    dino_model = dino.load_dinov3(str(cached / encoders["dino"])).eval()
    gemma = text.load_gemma2(str(cached / encoders["gemma"])).eval()
    tokenizer = text.Tokenizer(str(cached / encoders["gemma"] / "tokenizer.model"))
    for i in (0, 11):
        item = shapes[i]
        latent = dino.images_to_latents(dino_model, item["image"][None])[0]
        feats, mask = text.encode_prompts(gemma, tokenizer, [text.format_prompt(item["caption"], "base")], 64)
        assert torch.allclose(features[i]["latent"], latent, atol=1e-5)
        assert torch.allclose(features[i]["cap_feats"], feats[0, :mask.sum()], atol=1e-5)
        assert features[i]["caption"] == item["caption"]

    # A build killed after its first shard: the next run writes only what is missing, then the index.
    os.remove(folder / "index.json")
    os.remove(folder / "shard-00001.safetensors")
    first_shard = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    run(cached, *common, "--max-steps", "5", "--cache-features", str(cache))
    assert (folder / "index.json").exists() and (folder / "shard-00001.safetensors").exists()
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == first_shard
    # Other data (or resolution, or encoders) never reads stale features: it gets a folder of its own. (In a
    # new run folder: resuming `cached` on other data would be refused.)
    other = tmp_path / "other"
    copy_encoders(tiny_run, other)
    run(other, "--stage", "1", "--max-steps", "1", "--data-limit", "8", "--global-batch-size", "4",
        "--cache-features", str(cache))
    assert len(list(cache.iterdir())) == 2


def test_feature_cache_built_by_two_processes_trains_like_one_process_without_it(tiny_run, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    copy_encoders(tiny_run, plain)
    copy_encoders(tiny_run, cached)
    common = ["--stage", "1", "--max-steps", "2", "--data-limit", "300", "--global-batch-size", "4"]
    run(plain, *common)
    # 300 items = 2 shards of 256: rank 0 writes one, rank 1 the other, rank 0 the index after both.
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
                    os.path.join(ROOT, "train.py"), "--out", str(cached), *FAST, *common, "--cache-features",
                    str(tmp_path / "cache")], check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "shard-00000.safetensors",
                                                        "shard-00001.safetensors"]
    assert_same(weights(plain / "stage1" / "model.safetensors"), weights(cached / "stage1" / "model.safetensors"),
                atol=1e-5)


def test_flow_matching_loss_draws_t_then_noise_per_sample_and_is_the_path_mse():
    """flow.flow_matching_loss, the whole training loss in one place: each sample's generator draws its t
    (logit-normal, shifted) and then its noise x0; the velocity at x_t = t·x1 + (1 − t)·x0 is regressed onto
    x1 − x0. So a sample's loss depends on its own generator alone, not on the batch it sits in."""
    import flow
    torch.manual_seed(0)
    x1 = torch.randn(3, 4, 2, 2)
    weight = torch.randn(4, 4)
    velocity = lambda xt, t, scale: torch.einsum("oc,bchw->bohw", weight, xt) * scale + t.view(-1, 1, 1, 1)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    loss = flow.flow_matching_loss(velocity, x1, gens(), 1.7, 0.5)
    g = gens()
    t = flow.shift_timesteps(torch.cat([flow.sample_timesteps(1, generator=x) for x in g]), 1.7)
    x0 = torch.stack([torch.randn(4, 2, 2, generator=x) for x in g])
    expected = flow.training_loss(velocity(flow.interpolate(x0, x1, t), t, 0.5), x0, x1).mean()
    assert torch.equal(loss, expected)
    per_sample = [flow.flow_matching_loss(velocity, x1[i:i + 1], gens()[i:i + 1], 1.7, 0.5) for i in range(3)]
    assert torch.allclose(loss, torch.stack(per_sample).mean(), atol=1e-6)


def test_latent_stats_over_images_batches_by_bucket_and_leaves_out_unreadable_items():
    """dino.LatentStats.over_images (the small presets' statistics): the first n images, each batch from one
    bucket, an unreadable item (false) left out; the same numbers as LatentStats.from_latents over them."""
    import dino
    model = dino.DINOv3(patch_size=8, embed_dim=16, depth=1, num_heads=2, n_storage_tokens=1).eval()
    gen = torch.Generator().manual_seed(0)
    sizes = [(16, 16), (16, 32), (16, 16), (16, 32), (16, 16)]

    class Items:
        images = [torch.rand(3, *hw, generator=gen) * 2 - 1 for hw in sizes]

        def __len__(self):
            return len(self.images)

        def bucket_of(self, i):
            return sizes[i]

        def __getitem__(self, i):
            return None if i == 2 else dict(image=self.images[i])
    items = Items()
    stats = dino.LatentStats.over_images(model, items, "cpu", n=4, batch_size=64)
    by_bucket = [[0], [1, 3]]                     # item 2 unreadable, item 4 past n
    reference = dino.LatentStats.from_latents(
        dino.images_to_latents(model, torch.stack([items.images[i] for i in group])) for group in by_bucket)
    assert torch.allclose(stats.mean, reference.mean) and torch.allclose(stats.std, reference.std)
    with pytest.raises(ValueError):
        dino.LatentStats.over_images(model, items, "cpu", n=0)      # no image: no statistics
