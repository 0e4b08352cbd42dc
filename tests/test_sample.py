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


# ----- Sampling at scale: batches, several processes, resuming, the benchmarks' layouts -------------------

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle in the top left", "a blue square in the top right and an orange triangle in the bottom left",
           "a green triangle in the center", "an orange square in the bottom right", "a purple circle in the top right"]


def pixels(path):
    return np.asarray(Image.open(path), dtype=int)


def tree(folder):
    """Every file under `folder`, as sorted relative paths."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_a_batch_of_b_images_equals_generating_them_one_at_a_time(tiny_run, tmp_path, monkeypatch):
    """--batch-size 4 mixes prompts of different caption lengths (so padding is masked) and several images of a
    prompt: every file has the same name and, to float precision, the same pixels as with --batch-size 1. Measured
    on the demo (4 prompts x 2 images, 8 steps): at most 1 level of 255, in 2-4 of 100,000 values (a rounding flip
    of latents that agree to ~1e-5)."""
    import flow
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    batches, latents = [], {}
    solve = flow.sample

    def recording(velocity, noise, *a, **k):
        batches.append(len(noise))
        return solve(velocity, noise, *a, **k)
    monkeypatch.setattr(flow, "sample", recording)
    for b in ("1", "4"):
        sample.main(["--prompts", str(tmp_path / "p.txt"), "--ckpt", str(tiny_run), "--n", "2", "--steps", "3",
                     "--batch-size", b, "--out", str(tmp_path / b)])
    assert batches == [1] * 8 + [4, 4]                  # 4 // 2 = 2 prompts per batch: 4 images
    assert tree(tmp_path / "1") == tree(tmp_path / "4") and len(tree(tmp_path / "1")) == 12
    for name in tree(tmp_path / "1"):
        a, b = pixels(tmp_path / "1" / name), pixels(tmp_path / "4" / name)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, name
        meta = json.loads(Image.open(tmp_path / "4" / name).text["svg_t2i"])
        assert meta == json.loads(Image.open(tmp_path / "1" / name).text["svg_t2i"])


def torchrun(nproc, *argv, env=None):
    """sample.py as a user starts it, in a fresh process; torchrun when nproc > 1 (gloo on the CPU)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "sample.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_two_gloo_processes_write_the_same_files_as_one_with_one_progress_bar(tiny_run, tmp_path):
    """torchrun --nproc_per_node=2: each prompt on one process, the same file names and the same bytes as one
    process (both at one thread per process, as torchrun sets; another thread count moves a pixel by 1 level
    now and then), and one progress bar, rank 0's, counting the prompts of both."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["--prompts", str(tmp_path / "p.txt"), "--ckpt", str(tiny_run), "--num-images", "2", "--steps", "2",
              "--batch-size", "2"]
    one = torchrun(1, *common, "--out", str(tmp_path / "one"))
    two = torchrun(2, *common, "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert tree(tmp_path / "one") == tree(tmp_path / "two") and len(tree(tmp_path / "one")) == 15
    for name in tree(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    printed = two.stdout.split()                         # each process prints the files it wrote
    assert sorted(map(os.path.basename, printed)) == tree(tmp_path / "two")
    bars = [line for line in two.stderr.replace("\r", "\n").splitlines() if line.startswith("prompts:")]
    assert bars and all("/5 [" in line for line in bars) and "5/5" in bars[-1]


def test_the_geneval_layout_end_to_end_on_the_demo(tmp_path):
    """--geneval: a folder per prompt as GenEval's evaluation/evaluate_images.py reads it -- digits-only folder
    names, metadata.jsonl holding the prompt's JSON object (it json.load()s it), samples/<digits>.png, and nothing
    else a scorer could pick up -- written by the shipped demo from a GenEval-style metadata file of its world."""
    entries = [dict(tag="single_object", include=[dict(**{"class": "circle"}, count=1, color="red")],
                    prompt="a red circle in the top left"),
               dict(tag="two_object", include=[dict(**{"class": "square"}, count=1), dict(**{"class": "triangle"}, count=1)],
                    prompt="a blue square in the top right and an orange triangle in the bottom left"),
               dict(tag="colors", include=[dict(**{"class": "triangle"}, count=1, color="green")],
                    prompt="a green triangle in the center")]
    (tmp_path / "evaluation_metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = tmp_path / "geneval"
    sample.main(["--geneval", str(tmp_path / "evaluation_metadata.jsonl"), "--steps", "4", "--seed", "10",
                 "--out", str(out)])
    assert tree(out) == [f"{i:05d}/{name}" for i in range(3)
                         for name in ["grid.png", "metadata.jsonl", *(f"samples/{j:04d}.png" for j in range(4))]]
    for i, entry in enumerate(entries):
        with open(out / f"{i:05d}" / "metadata.jsonl") as f:
            assert json.load(f) == entry
        for j in range(4):
            image = Image.open(out / f"{i:05d}" / "samples" / f"{j:04d}.png")
            assert image.size == (128, 128)
            meta = json.loads(image.text["svg_t2i"])
            assert (meta["prompt"], meta["seed"]) == (entry["prompt"], 10 + 4 * i + j)   # seed + i*n + j
        assert Image.open(out / f"{i:05d}" / "grid.png").size == (256, 256)             # 2 x 2
    before = {name: (out / name).read_bytes() for name in tree(out)}
    sample.main(["--geneval", str(tmp_path / "evaluation_metadata.jsonl"), "--steps", "4", "--seed", "10",
                 "--out", str(out)])                     # run again: complete, nothing written or changed
    assert {name: (out / name).read_bytes() for name in tree(out)} == before
    with pytest.raises(SystemExit, match="steps 4.*this run uses 5"):      # other settings: not mixed in
        sample.main(["--geneval", str(tmp_path / "evaluation_metadata.jsonl"), "--steps", "5", "--seed", "10",
                     "--out", str(out)])


def test_the_dpg_bench_layout(tiny_run, tmp_path):
    """--dpg: one <id>.png per <id>.txt, a 2x2 grid of four different square images (compute_dpg_bench.py crops
    the quarters and lists every file of the folder, so nothing else may be in it)."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "286.txt").write_text("a red circle in the top left\n")
    (prompts / "posescript20.txt").write_text("a blue square\nin the center\n")
    out = tmp_path / "dpg"
    sample.main(["--dpg", str(prompts), "--ckpt", str(tiny_run), "--steps", "2", "--out", str(out)])
    assert tree(out) == ["286.png", "posescript20.png"]
    grid = Image.open(out / "posescript20.png")
    meta = json.loads(grid.text["svg_t2i"])
    assert (meta["prompt"], meta["n"], meta["seed"]) == ("a blue square in the center", 4, 4)
    w = meta["size"].split("x")[0]
    assert grid.size == (2 * int(w), 2 * int(w))
    quarters = [np.asarray(grid.crop((x, y, x + int(w), y + int(w)))) for y in (0, int(w)) for x in (0, int(w))]
    assert len({q.tobytes() for q in quarters}) == 4
    for argv, words in ((["--n", "2"], "--dpg takes --n 4"), (["--size", "64x32"], "square")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--dpg", str(prompts), "--ckpt", str(tiny_run), "--steps", "2", "--out", str(tmp_path / "x"),
                         *argv])
        assert words in str(e.value.code) or e.value.code == 2


def test_a_stopped_run_resumes_where_it_stopped_and_never_leaves_a_partial_file(tiny_run, tmp_path, monkeypatch):
    """Killed in the middle of writing a file (here: KeyboardInterrupt half-way through a PNG), a run leaves every
    finished file whole and no file under the name being written; the same command again generates only the
    missing images, removes a temporary file a kill -9 left, and ends with the files of an uninterrupted run."""
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(dict(tag="t", prompt=p)) + "\n" for p in PROMPTS[:3]))
    argv = ["--geneval", str(tmp_path / "meta.jsonl"), "--ckpt", str(tiny_run), "--steps", "2", "--num-images", "2",
            "--batch-size", "2"]
    sample.main([*argv, "--out", str(tmp_path / "whole")])
    out = tmp_path / "stopped"
    save, writes = Image.Image.save, []

    def save_and_die_on_the_fifth(img, fp, *a, **k):
        writes.append(1)
        if len(writes) == 5:                               # 00001/samples/0001.png: half a file, then Ctrl-C
            fp.write(b"\x89PNG\r\n\x1a\n half of it")
            raise KeyboardInterrupt
        return save(img, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", save_and_die_on_the_fifth)
    with pytest.raises(SystemExit) as e:
        sample.main([*argv, "--out", str(out)])
    assert e.value.code == 130
    monkeypatch.setattr(Image.Image, "save", save)
    assert tree(out) == ["00000/grid.png", "00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
                         "00001/metadata.jsonl", "00001/samples/0000.png", "00002/metadata.jsonl"]  # no partial file
    for name in tree(out):
        if name.endswith(".png"):
            Image.open(out / name).load()                  # each one whole
    (out / "00001" / "samples" / ".0001.png.tmp12345").write_bytes(b"left by kill -9")

    generated = []
    generate = sample.Pipeline.generate
    monkeypatch.setattr(sample.Pipeline, "generate",
                        lambda self, prompts, **k: generated.extend(prompts) or generate(self, prompts, **k))
    sample.main([*argv, "--out", str(out)])
    assert generated == [PROMPTS[1], PROMPTS[2], PROMPTS[2]]   # only what was missing
    assert tree(out) == tree(tmp_path / "whole")
    for name in tree(out):
        if name.startswith(("00000", "00002")) or name.endswith(".jsonl"):   # batched as in the whole run: bytes
            assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
        else:                                              # 00001/samples/0001.png alone: float precision
            assert np.abs(pixels(out / name) - pixels(tmp_path / "whole" / name)).max() <= 1, name


def test_resume_skips_finished_prompts_of_a_prompts_file_and_without_it_nothing_is_overwritten(tiny_run, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    argv = ["--prompts", str(tmp_path / "p.txt"), "--ckpt", str(tiny_run), "--steps", "2", "--batch-size", "1",
            "--out", str(tmp_path / "o")]
    sample.main(argv)
    first = {name: (tmp_path / "o" / name).read_bytes() for name in tree(tmp_path / "o")}
    sample.main([*argv, "--resume"])
    assert {name: (tmp_path / "o" / name).read_bytes() for name in tree(tmp_path / "o")} == first
    os.remove(tmp_path / "o" / sorted(first)[0])
    sample.main([*argv, "--resume"])                       # the one missing file is made again, the same bytes
    assert {name: (tmp_path / "o" / name).read_bytes() for name in tree(tmp_path / "o")} == first
    with pytest.raises(SystemExit, match="cfg"):               # other settings are not mixed into the folder
        sample.main([*argv, "--resume", "--cfg", "7"])
    sample.main(argv)                                      # without --resume: new names, nothing overwritten
    assert len(tree(tmp_path / "o")) == 4 and all((tmp_path / "o" / n).read_bytes() == b for n, b in first.items())


def test_cfg_trunc_guides_only_the_noisy_steps_and_is_recorded(tiny_run, tmp_path, monkeypatch):
    """--cfg-trunc T (the official cfg_trunc): the unconditional pass runs only while t < T."""
    import model as dit_lib
    calls = []
    forward = dit_lib.NextDiT.forward
    monkeypatch.setattr(dit_lib.NextDiT, "forward", lambda self, x, t, *a, **k: calls.append(float(t[0])) or
                        forward(self, x, t, *a, **k))
    argv = ["--prompt", "a red circle", "--ckpt", str(tiny_run), "--steps", "6", "--cfg", "4", "--solver", "euler",
            "--shift", "1"]
    sample.main([*argv, "--out", str(tmp_path / "all")])
    assert len(calls) == 12                                 # cond + uncond at every step
    calls.clear()
    sample.main([*argv, "--cfg-trunc", "0.5", "--out", str(tmp_path / "half")])
    assert len(calls) == 6 + 3                              # t = 0, 1/6, 2/6 guided; 3/6 .. 5/6 not
    (name,) = os.listdir(tmp_path / "half")
    assert json.loads(Image.open(tmp_path / "half" / name).text["svg_t2i"])["cfg_trunc"] == 0.5


def test_system_enhance_rewrites_the_prompt_with_gemma_and_keeps_both_in_the_png(tiny_run, tmp_path):
    """--system enhance: the whole Gemma-2 rewrites the prompt (text.enhance_prompt), the rewrite is encoded after
    the 'align' system prompt, and the PNG records the user's prompt, the rewrite and system "enhance". An
    encoder-only Gemma folder (the small presets') is refused in one line, before sampling."""
    import shutil

    import torch

    import text
    encoder = text.load_gemma2(str(tiny_run / "encoders" / "gemma"))
    torch.manual_seed(0)
    lm = text.Gemma2Encoder(**encoder.config, causal_lm=True)       # the same first layers, a random last one
    lm.load_state_dict(encoder.state_dict(), strict=False)
    folder = tmp_path / "gemma"
    text.save_gemma2(lm.eval(), str(folder))
    shutil.copy(tiny_run / "encoders" / "gemma" / "tokenizer.model", folder)
    argv = ["--prompt", "a red circle", "--ckpt", str(tiny_run), "--steps", "2", "--system", "enhance"]
    sample.main([*argv, "--gemma", str(folder), "--out", str(tmp_path / "out")])
    (name,) = os.listdir(tmp_path / "out")
    meta = json.loads(Image.open(tmp_path / "out" / name).text["svg_t2i"])
    tokenizer = text.Tokenizer(str(folder))
    expected = text.enhance_prompt(text.load_gemma2(str(folder), causal_lm=True), tokenizer, "a red circle")
    assert (meta["prompt"], meta["system"], meta["enhanced_prompt"]) == ("a red circle", "enhance", expected)
    assert name.startswith("a_red_circle_")                  # named by the user's prompt
    pipe = sample.load_pipeline(str(tiny_run), device="cpu", gemma=str(folder))
    image = pipe.generate([expected], steps=2, system="align", progress=False)[0]
    assert np.abs(pixels(tmp_path / "out" / name) - np.asarray(image, dtype=int)).max() <= 1
    with pytest.raises(SystemExit, match="hidden_states.-2. only"):
        sample.main([*argv, "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists() or not os.listdir(tmp_path / "refused")


def test_trajectory_and_tag_leave_the_images_as_they_were_and_name_every_file(tiny_run, tmp_path):
    import numpy as np
    args = ["--prompt", "a red circle", "--ckpt", str(tiny_run), "--steps", "3", "--n", "2"]
    sample.main([*args, "--out", str(tmp_path / "plain")])
    sample.main([*args, "--out", str(tmp_path / "both"), "--trajectory", "--tag", "v1"])
    stem = sample.file_stem("a red circle")
    assert sorted(os.listdir(tmp_path / "plain")) == [f"{stem}_0.png", f"{stem}_1.png", f"{stem}_grid.png"]
    assert sorted(os.listdir(tmp_path / "both")) == [f"{stem}_v1_0.png", f"{stem}_v1_0_trajectory.png", f"{stem}_v1_1.png",
                                                     f"{stem}_v1_1_trajectory.png", f"{stem}_v1_grid.png"]
    for plain, both in ((f"{stem}_0.png", f"{stem}_v1_0.png"), (f"{stem}_grid.png", f"{stem}_v1_grid.png")):
        a, b = Image.open(tmp_path / "plain" / plain), Image.open(tmp_path / "both" / both)
        assert a.tobytes() == b.tobytes()                                   # the same pixels
        assert dict(json.loads(a.text["svg_t2i"]), tag="v1") == json.loads(b.text["svg_t2i"])
    strip = Image.open(tmp_path / "both" / f"{stem}_v1_1_trajectory.png")
    meta = json.loads(strip.text["svg_t2i"])
    assert (meta["tag"], meta["seed"], len(meta["trajectory"])) == ("v1", 1, 3)
    image = np.asarray(Image.open(tmp_path / "both" / f"{stem}_v1_1.png"), dtype=int)
    h, w = image.shape[:2]
    assert strip.size[0] == 3 * w                                           # one frame per model evaluation
    last = np.asarray(strip.convert("RGB"))[:h, -w:].astype(int)
    assert np.abs(last - image).max() <= 1                                  # the last guess is the image


def test_resume_writes_a_missing_trajectory_and_keeps_the_image(tiny_run, tmp_path):
    argv = ["--prompt", "a red circle", "--ckpt", str(tiny_run), "--steps", "2", "--trajectory", "--resume",
            "--out", str(tmp_path)]
    sample.main(argv)
    stem = sample.file_stem("a red circle")
    image = (tmp_path / f"{stem}_0.png").read_bytes()
    os.remove(tmp_path / f"{stem}_0_trajectory.png")
    sample.main(argv)
    assert sorted(os.listdir(tmp_path)) == [f"{stem}_0.png", f"{stem}_0_trajectory.png"]
    assert (tmp_path / f"{stem}_0.png").read_bytes() == image


def test_bad_tags_a_benchmark_trajectory_and_a_repeated_prompt_are_refused_at_the_command_line(tmp_path, capsys):
    for argv, message in ((["--prompt", "x", "--tag", "a b"], "a tag is 1 to 40 letters"),
                          (["--prompt", "x", "--tag", "a_b"], "a tag is 1 to 40 letters"),
                          (["--geneval", "m.jsonl", "--tag", "a"], "argument --tag: names files"),
                          (["--dpg", "prompts", "--trajectory"], "argument --trajectory: names files"),
                          (["--prompt", "x", "--prompt", "y"], "argument --prompt: given twice")):
        with pytest.raises(SystemExit) as e:
            sample.main([*argv, "--out", str(tmp_path)])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_garbage_encoders_json_or_stage_config_is_one_line_naming_the_file(tiny_run, tmp_path):
    import shutil
    for content, message in (("{not json", "is not valid JSON"), ("[1, 2]", "should hold a JSON object"),
                             ('{"dino": 3, "gemma": "g", "stats": null}', "'dino' must be a file path")):
        run = tmp_path / f"run{len(os.listdir(tmp_path))}"
        run.mkdir()
        (run / "encoders.json").write_text(content)
        path = str(run / "encoders.json")
        with pytest.raises(ValueError, match=f"^{path}.*{message}"):
            sample.find_parts(str(run))
        with pytest.raises(SystemExit, match=f"^sample.py: {path}"):
            sample.main(["--prompt", "x", "--ckpt", str(run), "--out", str(tmp_path / "o")])
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    (run / "stage1" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"^{run / 'stage1' / 'config.json'} is not valid JSON"):
        sample.find_parts(str(run))
    with pytest.raises(ValueError, match="^where.json: wrong types for \\['steps'\\]"):
        sample.check_stage_config({"sample": {"steps": "8"}}, "where.json")
