"""sample.py on a tiny trained run: seeded, the asked-for size, metadata in the PNG, clear errors."""
import json
import os

import pytest
from PIL import Image

import sample


def test_same_seed_gives_identical_png_bytes_and_metadata(tiny_run, tmp_path):
    args = ["--prompt", "a red circle in the top left", "--ckpt", str(tiny_run), "--seed", "7", "--steps", "3"]
    sample.main([*args, "--out", str(tmp_path / "a")])
    sample.main([*args, "--out", str(tmp_path / "b")])
    (a,), (b,) = os.listdir(tmp_path / "a"), os.listdir(tmp_path / "b")
    assert a == b
    assert (tmp_path / "a" / a).read_bytes() == (tmp_path / "b" / b).read_bytes()
    meta = json.loads(Image.open(tmp_path / "a" / a).text["svg_t2i"])
    assert meta["prompt"] == "a red circle in the top left"
    assert (meta["seed"], meta["steps"], meta["solver"]) == (7, 3, "dpm")
    assert "stage1" in meta["checkpoint"]


def test_other_seed_gives_another_image(tiny_run):
    pipe = sample.load_pipeline(str(tiny_run), device="cpu")
    a, b = (pipe.generate(["a blue square in the center"], seed=s, steps=2, progress=False)[0] for s in (0, 1))
    assert a.tobytes() != b.tobytes()


def test_non_square_size_is_width_by_height(tiny_run, tmp_path):
    sample.main(["--prompt", "a blue square", "--ckpt", str(tiny_run), "--size", "96x64", "--steps", "2",
                 "--out", str(tmp_path), "--n", "2"])
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 3                                    # two images and a grid
    single = Image.open(tmp_path / files[0])
    assert single.size == (96, 64)
    assert Image.open(tmp_path / [f for f in files if "grid" in f][0]).size == (192, 64)


def test_batched_prompts_do_not_change_each_other(tiny_run):
    pipe = sample.load_pipeline(str(tiny_run), device="cpu")
    alone = pipe.generate(["a green triangle in the top right"], seed=3, steps=2, progress=False)[0]
    batched = pipe.generate(["a long prompt about a purple circle in the bottom left and a red square",
                             "a green triangle in the top right"], seed=2, steps=2, progress=False)[1]
    import numpy as np
    diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(batched, dtype=int)).max()
    assert diff <= 1                                         # float noise may flip a rounding


def test_size_not_a_multiple_of_the_latent_cell_is_a_clear_error(tiny_run):
    pipe = sample.load_pipeline(str(tiny_run), device="cpu")
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.generate(["x"], size=(100, 64), steps=1, progress=False)


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished DiT stage|no decoder"):
        sample.load_pipeline(str(tmp_path))


def test_a_folder_of_released_files_loads(tiny_run, tmp_path):
    """The released layout, written from the tiny run's random weights: the DiT as a plain
    consolidated.00-of-01.pth state dict, the autoencoder as a Lightning .ckpt, the stats .pt, a Gemma folder."""
    import shutil

    import torch
    from safetensors.torch import load_file

    release = tmp_path / "release"
    (release / "dit-stage4-T274M").mkdir(parents=True)
    torch.save(load_file(tiny_run / "stage1" / "ema.safetensors"),
               release / "dit-stage4-T274M" / "consolidated.00-of-01.pth")
    ae_state = load_file(tiny_run / "autoencoder_P" / "stage1" / "model.safetensors")
    ae_state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": ae_state, "global_step": 10, "epoch": 0}, release / "svg_autoencoder-P-stage3.ckpt")
    shutil.copy(tiny_run / "encoders" / "latent_stats.pt", release / "dinov3_s16p_layer_patchtoken_stats_dist.pt")
    shutil.copytree(tiny_run / "encoders" / "gemma", release / "gemma-2-2b")

    pipe = sample.load_pipeline(str(release), device="cpu")
    assert pipe.defaults["steps"] == 50 and pipe.defaults["shift"] == 10.0   # the official sampler settings
    assert pipe.max_cap_len == 512
    image = pipe.generate(["a red circle"], size=(64, 32), steps=2, progress=False)[0]
    assert image.size == (64, 32)


def test_dit_override_picks_another_weights_file(tiny_run, tmp_path):
    raw = tiny_run / "stage1" / "model.safetensors"                 # the non-EMA weights instead of ema
    sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--dit", str(raw), "--steps", "2",
                 "--out", str(tmp_path)])
    (name,) = os.listdir(tmp_path)
    assert json.loads(Image.open(tmp_path / name).text["svg_t2i"])["checkpoint"].endswith("stage1/model.safetensors")


def test_the_shipped_demo_samples(tmp_path):
    """README's second command: the committed assets/demo loads with today's code and writes a 128-px PNG."""
    sample.main(["--prompt", "a red circle in the top left", "--steps", "4", "--out", str(tmp_path)])
    (name,) = os.listdir(tmp_path)
    assert Image.open(tmp_path / name).size == (128, 128)


def test_bfloat16_runs_end_to_end_and_agrees_with_float32_loosely(tiny_run, tmp_path, monkeypatch):
    """--dtype bfloat16, the default on CUDA, here on the CPU: the DiT, decoder and Gemma-2 in bf16 while the ODE
    solver keeps x in float32. The tiny model's image is close to the float32 one, not equal."""
    import numpy as np
    import torch

    import flow
    solved = []
    solve = flow.sample
    monkeypatch.setattr(flow, "sample", lambda *a, **k: solved.append(solve(*a, **k)) or solved[-1])
    args = ["--prompt", "a red circle in the top left", "--ckpt", str(tiny_run), "--steps", "4"]
    for dtype in ("float32", "bfloat16"):
        sample.main([*args, "--dtype", dtype, "--out", str(tmp_path / dtype)])
    assert [x.dtype for x in solved] == [torch.float32, torch.float32]
    (a,), (b,) = (list((tmp_path / d).iterdir()) for d in ("float32", "bfloat16"))
    a, b = (np.asarray(Image.open(p), dtype=float) for p in (a, b))
    assert np.abs(a - b).mean() < 4 and np.abs(a - b).max() < 48       # of 255; measured 0.9 and 7

    pipe = sample.load_pipeline(str(tiny_run), device="cpu", dtype=torch.bfloat16)
    assert {m.weight.dtype for m in (pipe.dit.x_embedder, pipe.gemma.embed_tokens, pipe.autoencoder.decoder.conv_out)} \
        == {torch.bfloat16}


def test_settings_resolve_the_model_defaults_and_refuse_what_cannot_run(tiny_run):
    pipe = sample.load_pipeline(str(tiny_run), device="cpu")
    d = pipe.defaults                                        # the stage's config.json: the tiny preset's sampler
    assert pipe.settings() == (d["size"], d["size"], d["steps"], d["cfg"], d["solver"], d["shift"])
    assert pipe.settings((64, 32), 6, 8.0, "midpoint", 2.0) == (64, 32, 6, 8.0, "midpoint", 2.0)
    for kwargs, words in ((dict(solver="midpoint", steps=5), "even, e.g. 4"), (dict(solver="heun"), "--solver"),
                          (dict(steps=0), "--steps"), (dict(shift=0.0), "--shift"),
                          (dict(cfg=float("nan")), "--cfg"), (dict(size=(100, 64)), "multiples of 8")):
        with pytest.raises(ValueError, match=words):
            pipe.settings(**kwargs)


def test_no_renorm_reaches_the_guidance_and_the_png(tiny_run, tmp_path, monkeypatch):
    import flow
    renorms = []
    guide = flow.cfg_velocity
    monkeypatch.setattr(flow, "cfg_velocity", lambda *a, renorm: renorms.append(renorm) or guide(*a, renorm=renorm))
    args = ["--prompt", "a red circle", "--ckpt", str(tiny_run), "--steps", "2", "--cfg", "8"]
    for flag in ("--renorm", "--no-renorm"):
        sample.main([*args, flag, "--out", str(tmp_path / flag)])
        (name,) = os.listdir(tmp_path / flag)
        assert json.loads(Image.open(tmp_path / flag / name).text["svg_t2i"])["renorm"] == (flag == "--renorm")
    assert renorms == [True, True, False, False]             # two steps each
