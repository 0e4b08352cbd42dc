"""Fine-tuning (train.py --init-from, --lora; model.py "LoRA adapters"; sample.py --lora): a stage starts from
exactly the weights it was given, an adapter starts as the base and trains alone, merged equals applied, and a
LoRA stage resumes exactly and gives the same adapters on 2 processes as on 1. Tiny preset, CPU."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import data
import model as dit_lib
import sample
import machinery
import train
from helpers import randomize_
from test_train import FAST, ROOT, assert_same, run, weights


def tiny_config(run_dir):
    """The NextDiT config train.py builds for the tiny preset on a run folder's encoders."""
    with open(os.path.join(run_dir, "stage1", "config.json")) as f:
        return json.load(f)["dit"]


def released_layout(folder, cfg, seed=0, n_layers=None):
    """A random NextDiT written as the release writes it: a plain {key: tensor} consolidated.00-of-01.pth."""
    dit = randomize_(dit_lib.NextDiT(**dict(cfg, n_layers=n_layers or cfg["n_layers"])), seed=seed)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    torch.save(state, os.path.join(folder, dit_lib.RELEASED_NAME))
    return state


def with_encoders(tiny_run, dst):
    """A run folder sharing tiny_run's encoders and decoder (a released source brings neither)."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(tiny_run / "encoders.json", dst)
    shutil.copytree(tiny_run / "encoders", dst / "encoders")
    shutil.copytree(tiny_run / "autoencoder_P", dst / "autoencoder_P")


def test_init_from_a_released_checkpoint_gives_its_exact_weights(tiny_run, tmp_path):
    release, out = tmp_path / "release", tmp_path / "run"
    state = released_layout(release, tiny_config(tiny_run))
    with_encoders(tiny_run, out)
    run(out, "--stage", "4", "--init-from", str(release), "--max-steps", "1", "--lr", "0")
    for name in ("model.safetensors", "ema.safetensors"):        # model and EMA both start from the source
        assert_same(weights(out / "stage4" / name), state)
    config = json.loads((out / "stage4" / "config.json").read_text())
    assert config["init_from"] == str(release) and "consolidated" in config["init_weights"]


def test_init_from_a_run_takes_its_ema_and_brings_what_sampling_needs(tiny_run, tmp_path):
    out = tmp_path / "fresh"                                    # an empty folder: everything comes along
    run(out, "--stage", "4", "--init-from", str(tiny_run), "--max-steps", "1", "--lr", "0")
    assert_same(weights(out / "stage4" / "model.safetensors"), weights(tiny_run / "stage1" / "ema.safetensors"))
    parts = sample.find_parts(str(out))
    assert parts["decoder"] and os.path.exists(parts["decoder"]) and os.path.exists(parts["stats"])
    assert data.fingerprint(parts["gemma"]) == data.fingerprint(str(tiny_run / "encoders" / "gemma"))
    sample.load_pipeline(str(out)).generate(["a red circle in the top left"], size=(32, 32), steps=1, progress=False)


def test_a_source_of_another_architecture_is_refused_with_the_keys_unless_partial_load(tiny_run, tmp_path):
    release, out = tmp_path / "release", tmp_path / "run"
    state = released_layout(release, tiny_config(tiny_run), n_layers=3)       # one joint block more
    with_encoders(tiny_run, out)
    with pytest.raises(SystemExit, match=r"(?s)does not match.*unexpected keys \(13\): \['layers\.2\."):
        run(out, "--stage", "4", "--init-from", str(release), "--max-steps", "1", "--lr", "0")
    assert not (out / "stage4" / "latest").exists()
    run(out, "--stage", "4", "--init-from", str(release), "--max-steps", "1", "--lr", "0", "--partial-load")
    loaded = weights(out / "stage4" / "model.safetensors")
    assert_same(loaded, {k: v for k, v in state.items() if not k.startswith("layers.2.")})


def test_lora_at_step_0_is_the_base_bit_for_bit_and_merged_equals_applied():
    torch.manual_seed(0)
    dit = randomize_(dit_lib.NextDiT(**dit_lib.NEXTDIT_CONFIGS["tiny"]))
    base_keys = list(dit.state_dict())
    x, t = torch.randn(2, 16, 6, 8), torch.rand(2)
    feats, mask = torch.randn(2, 5, 32), torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    before = dit(x, t, feats, mask)
    names = dit_lib.attach_lora(dit, rank=4, alpha=8)
    assert len(names) == 5 * 4                                   # qkv, out, w1, w2, w3 in 2 joint + 2 refiner blocks
    assert [k for k in dit.state_dict() if ".lora_" not in k] == base_keys     # the released layout, unchanged
    assert torch.equal(dit(x, t, feats, mask), before)          # B = 0: exactly the base
    for m in dit_lib.lora_modules(dit).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)                 # a trained-looking adapter
    applied = dit(x, t, feats, mask)
    assert (applied - before).abs().max() > 1e-2
    merged = dit_lib.merge_lora(dit)(x, t, feats, mask)
    assert (merged - applied).abs().max() <= 1e-5 * applied.abs().max()


def test_a_lora_stage_changes_only_the_adapters_and_sample_applies_them(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "lora"
    finished = {}
    finish = machinery.finish_lora

    def recording_finish(stage_dir, model, ema, *args, **kwargs):
        finished.update(model=model, ema=ema)
        return finish(stage_dir, model, ema, *args, **kwargs)
    monkeypatch.setattr(machinery, "finish_lora", recording_finish)
    run(out, "--stage", "4", "--init-from", str(tiny_run), "--lora", "4", "--max-steps", "3")
    base = weights(tiny_run / "stage1" / "ema.safetensors")
    model, ema = finished["model"], finished["ema"]
    trained = model.state_dict()
    for key, value in base.items():                              # the frozen base: bit for bit the source's
        assert torch.equal(trained[key], value), key
    adapters = dit_lib.lora_state(model)
    assert adapters and all(adapters[k].abs().max() > 0 for k in adapters if k.endswith("lora_B"))   # B moved off 0
    # The stage's files: the adapter alone, its metadata naming the base.
    adapter_file = out / "stage4" / "adapter.safetensors"
    assert set(load_file(str(adapter_file))) == set(adapters)
    assert_same(load_file(str(adapter_file)), dit_lib.lora_state(ema))
    with safe_open(str(adapter_file), "pt") as f:
        info = json.loads(f.metadata()["lora"])
    assert info["rank"] == 4 and info["targets"] == list(dit_lib.LORA_TARGETS)
    assert info["base_fingerprint"] == data.fingerprint(str(tiny_run / "stage1" / "ema.safetensors"))
    assert not (out / "stage4" / "ema.safetensors").exists()
    # sample.py --ckpt of the run: the base with the EMA adapter folded in, which is the merged EMA model.
    pipe = sample.load_pipeline(str(out))
    assert_same(pipe.dit.state_dict(), dit_lib.merge_lora(ema).state_dict(), atol=1e-6)
    # --lora FILE --lora-scale 0 on the base is the base.
    zero = sample.load_pipeline(str(tiny_run), lora=str(adapter_file), lora_scale=0.0)
    assert_same(zero.dit.state_dict(), base)
    # --export writes the merged weights; they sample like the run.
    machinery.export_merged(str(out), str(tmp_path / "export"))
    assert_same(weights(tmp_path / "export" / "stage4" / "ema.safetensors"), pipe.dit.state_dict(), atol=1e-6)


def test_a_killed_lora_run_resumes_exactly(tiny_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    lora = ["--stage", "4", "--init-from", str(tiny_run), "--lora", "4", "--ckpt-every", "3"]
    run(straight, *lora, "--max-steps", "6")
    run(resumed, *lora, "--max-steps", "3")                      # "killed" after step 3
    latest = weights(resumed / "stage4" / "latest" / "model.safetensors")
    assert latest and all(".lora_" in k for k in latest)         # latest/ keeps the adapters, not the base
    run(resumed, *lora, "--max-steps", "6")                      # the same command again
    for name in ("adapter.safetensors", "adapter_model.safetensors"):
        assert_same(weights(straight / "stage4" / name), weights(resumed / "stage4" / name))
    with pytest.raises(SystemExit, match="other settings: lora"):      # a LoRA latest/ is not resumed as full
        run(resumed, "--stage", "4", "--max-steps", "7")


def test_lora_on_two_processes_and_with_accumulation_equals_one_process(tiny_run, tmp_path):
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    common = [*FAST, "--stage", "4", "--init-from", str(tiny_run), "--lora", "4", "--max-steps", "3",
              "--global-batch-size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(one), *common], check=True,
                   cwd=ROOT, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                    os.path.join(ROOT, "train.py"), "--out", str(two), *common], check=True, cwd=ROOT, env=env)
    train.main(["--out", str(accum), *common, "--micro-batch-size", "2"])
    for other in (two, accum):
        assert_same(weights(one / "stage4" / "adapter.safetensors"), weights(other / "stage4" / "adapter.safetensors"),
                    atol=1e-5)


def test_lora_with_fsdp_or_without_a_base_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--lora with --fsdp is not supported"):
        run(tmp_path, "--stage", "4", "--init-from", str(tmp_path), "--lora", "4", "--fsdp")
    with pytest.raises(SystemExit, match="--lora trains adapters on a base model"):
        run(tmp_path, "--stage", "1", "--lora", "4")


def test_the_star_leaves_the_demo_data_unchanged_and_shapes_star_draws_stars():
    # Digests of the demo's scenes and tokenizer text, taken before the star existed: not one changed.
    digest = hashlib.sha256()
    for spec in ("shapes", "shapes:clean"):
        ds = data.open_dataset(spec, 64, seed=3)
        for i in range(200):
            digest.update(json.dumps(list(ds.scene(i)), sort_keys=True).encode())
    assert digest.hexdigest() == "f951f9eb5162bcea24a3574e0e8a5513ef45ddc12a3b5e9df4d54267d0bdb276"
    assert hashlib.sha256("\n".join(data.all_captions()).encode()).hexdigest() == \
        "11918e2fdce3dd4958970c938e716cd6a606f0c9b97c087be8964f992a8ea740"
    stars = data.open_dataset("shapes:star", 64)
    scenes = [stars.scene(i) for i in range(400)]
    star_scenes = [s for s in scenes if s[0][0]["shape"] == "star"]
    assert 0.4 < len(star_scenes) / len(scenes) < 0.6                # half stars, half the scenes the demo knows
    assert {(o[0]["color"], o[0]["position"]) for o, _ in star_scenes} == \
        {(c, p) for c in data.PALETTE for p in data.POSITIONS}       # 8 colours x 5 positions
    # clean stars, larger than the old objects' 35% so that the demo's decoder keeps their points (data.STAR_SIDE)
    assert {(o[0]["cx"], o[0]["cy"], o[0]["side"]) for o, _ in star_scenes} == \
        {(*data.POSITIONS[p], 0.45) for p in data.POSITIONS}
    assert data.parse_caption("a red star in the top left") == [dict(color="red", shape="star", position="top left")]
