"""Nothing lost, nothing hangs, nothing silent: what a hostile but fair user tried, each as a test.

Data loss (--export over a folder, sample files that share a name), hangs (an epoch with no readable image),
silent wrong results (a stale feature cache, 0 meaning "the default", a NaN guidance scale, a resume with
other settings, files of the wrong kind found only after sampling) and tracebacks where one line would do
(truncated files, impossible sizes, two runs in one folder). On the tiny preset, on the CPU."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import autoencoder as ae_lib
import dino
import flow
import model as dit_lib
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--preset", "tiny", "--no-compile", "--workers", "0", "--preview-every", "0"]


def run(out, *extra):
    train.main(["--out", str(out), *FAST, *extra])


def copy_run(tiny_run, dst):
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def copy_encoders(src, dst):
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "encoders.json"), dst)
    shutil.copytree(os.path.join(src, "encoders"), os.path.join(dst, "encoders"))


def one_line_exit(excinfo, *words):
    """A user error: SystemExit carrying one message that names what is wrong."""
    message = str(excinfo.value.code)
    assert all(w in message for w in words), message
    return message


@pytest.fixture
def no_sampling(monkeypatch):
    """Every check must come before the first sampling step: sampling here is a test failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the error was found")
    monkeypatch.setattr(flow, "sample", refuse)


# ----- Data loss -----------------------------------------------------------------------------------------

def test_export_never_deletes_the_run_or_a_foreign_folder_and_replaces_an_earlier_export(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    again = ["--stage", "1", "--max-steps", "4"]        # the finished stage: resumes at its end, then exports
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    with pytest.raises(SystemExit) as e:
        run(out, *again, "--export", str(foreign))
    one_line_exit(e, "not an earlier export")
    assert (foreign / "thesis.txt").read_text() == "years of work"
    with pytest.raises(SystemExit) as e:                # --export equal to --out
        run(out, *again, "--export", str(out))
    one_line_exit(e, "run folder")
    assert (out / "stage1" / "ema.safetensors").exists() and (out / "encoders.json").exists()

    export = tmp_path / "export"
    run(out, *again, "--export", str(export))
    assert (export / train.EXPORT_MARKER).exists()
    (export / "stale.txt").write_text("from the earlier export")
    run(out, *again, "--export", str(export))           # an earlier export is replaced, as a whole
    assert not (export / "stale.txt").exists()
    assert sample.find_parts(str(export))["dit"] == str(export / "stage1" / "ema.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine", "run"]      # no temporary left


def test_sample_files_are_unique_per_prompt_and_never_overwritten(tiny_run, tmp_path, capsys):
    prompts = ["a red circle in the top left", "A red circle in the top left!", "красный круг", "赤い円"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = ["--prompts", str(tmp_path / "prompts.txt"), "--ckpt", str(tiny_run), "--steps", "1",
            "--out", str(tmp_path / "out")]
    sample.main(args)
    printed = capsys.readouterr().out.split()
    assert len(set(printed)) == 4 and sorted(os.listdir(tmp_path / "out")) == sorted(map(os.path.basename, printed))
    for path, prompt in zip(printed, prompts):          # each file holds its own prompt
        assert json.loads(Image.open(path).text["svg_t2i"])["prompt"] == prompt
    first = {p: open(p, "rb").read() for p in printed}
    sample.main(args)                                   # the same call again: new names, old files untouched
    printed_again = capsys.readouterr().out.split()
    assert len(os.listdir(tmp_path / "out")) == 8 and not set(printed_again) & set(printed)
    assert all(open(p, "rb").read() == data for p, data in first.items())


# ----- Hangs and silent wrong results ------------------------------------------------------------------------

def test_an_epoch_without_one_readable_image_stops_the_run_instead_of_hanging(tiny_run, tmp_path):
    # width/height in the records: nothing is read at start-up, every image fails when loaded
    lines = [json.dumps(dict(path=f"gone{i}.png", prompt=f"x {i}", width=32, height=32)) for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)                        # the latent statistics already exist
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, "--stage", "1",
                           "--data", str(tmp_path / "pairs.jsonl"), "--max-steps", "2", "--global-batch-size", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not one image could be read" in proc.stderr and "Traceback" not in proc.stderr


def test_feature_cache_key_covers_the_captions(tiny_run, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 100, 200)).save(folder / f"{i}.png")

    def write(captions):
        (folder / "pairs.jsonl").write_text("".join(json.dumps(dict(path=f"{i}.png", prompt=c)) + "\n"
                                                    for i, c in enumerate(captions)))
    cache = tmp_path / "cache"
    for n, captions in enumerate((["a red square"] * 4, ["a blue circle"] * 4)):    # same paths, same count
        write(captions)
        out = tmp_path / f"run{n}"
        copy_encoders(tiny_run, out)
        run(out, "--stage", "1", "--data", str(folder / "pairs.jsonl"), "--max-steps", "1",
            "--global-batch-size", "4", "--cache-features", str(cache))
    folders = list(cache.iterdir())
    assert len(folders) == 2                            # edited captions: a new cache, not the stale features
    captions = {json.loads((f / "index.json").read_text())["identity"]["content"] for f in folders}
    assert len(captions) == 2


@pytest.mark.parametrize("argv", [
    ["--stage", "1", "--max-steps", "0"], ["--stage", "1", "--global-batch-size", "0"],
    ["--stage", "1", "--micro-batch-size", "0"], ["--stage", "1", "--ckpt-every", "0"],
    ["--stage", "1", "--lr", "nan"], ["--stage", "1", "--seed", "-1"], ["--stage", "1", "--data-limit", "0"],
    ["--autoencoder", "P", "--stage", "1", "--max-steps", "0"],
], ids=lambda argv: " ".join(argv[-2:]))
def test_train_flags_that_mean_nothing_are_refused_before_any_work(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", *argv)
    assert e.value.code == 2
    assert f"argument {argv[-2]}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--n", "0"), ("--shift", "-1"), ("--cfg", "nan"),
                                        ("--size", "0x0"), ("--seed", "-3")])
def test_sample_flags_that_mean_nothing_are_refused(flag, value, tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), flag, value, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps,words", [("3", ("midpoint", "even", "e.g. 2")), ("1", ("midpoint", "even"))])
def test_an_odd_step_count_for_the_midpoint_solver_is_refused_before_sampling(steps, words, tiny_run, tmp_path,
                                                                               no_sampling):
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--solver", "midpoint", "--steps", steps,
                     "--out", str(tmp_path / "out")])
    one_line_exit(e, "--steps", *words)
    assert not (tmp_path / "out").exists()


def test_size_beyond_the_rope_table_is_refused_before_sampling(tiny_run, tmp_path, no_sampling):
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--size", "16384x16", "--steps", "1",
                     "--out", str(tmp_path)])
    one_line_exit(e, "16384x16", "RoPE")


def test_an_autoencoder_r_decoder_is_refused_at_load_time(tiny_run, tmp_path, no_sampling):
    encoder = dino.load_dinov3(str(tiny_run / "encoders" / "dino.safetensors"))
    residual = ae_lib.ResidualViT(**dict(ae_lib.RESIDUAL_VIT_CONFIG, **train.PRESETS["tiny"]["residual"],
                                         patch_size=encoder.patch_size))
    decoder = ae_lib.Decoder(z_channels=encoder.embed_dim + residual.out_dim, **train.PRESETS["tiny"]["decoder"])
    ae_lib.save_autoencoder(ae_lib.Autoencoder(encoder, decoder, residual), str(tmp_path / "r.safetensors"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--decoder", str(tmp_path / "r.safetensors"),
                     "--steps", "1", "--out", str(tmp_path / "out")])
    one_line_exit(e, "r.safetensors", "Autoencoder-R")


def test_a_pth_of_a_patch_2_dit_is_refused_at_load_time(tiny_run, tmp_path, no_sampling):
    # A .pth stores no config, so a patch-2 model reads as patch 1 with 4x the channels (2 x 2 x 32).
    dit = dit_lib.NextDiT(**dict(dit_lib.NEXTDIT_CONFIGS["tiny"], patch_size=2, in_channels=32, cap_feat_dim=32))
    torch.save(dit.state_dict(), tmp_path / "patch2.pth")
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--dit", str(tmp_path / "patch2.pth"),
                     "--steps", "1", "--out", str(tmp_path / "out")])
    one_line_exit(e, "patch2.pth", "128", "32")


def test_a_run_with_only_an_autoencoder_says_the_dit_is_missing(tiny_run, tmp_path):
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)
    os.remove(out / "encoders" / "latent_stats.pt")     # a DiT stage computes them: not there yet
    shutil.copytree(tiny_run / "autoencoder_P", out / "autoencoder_P")
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(out), "--out", str(tmp_path / "out")])
    one_line_exit(e, "no finished DiT stage")


def test_resume_with_other_seed_batch_or_data_is_refused_unless_forced(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    config = (out / "stage1" / "config.json").read_bytes()
    for changed, words in ((["--seed", "1"], ["seed 0 -> 1"]), (["--global-batch-size", "8"], ["global_batch 4 -> 8"]),
                           (["--data-limit", "64"], ["data", "path and caption"])):
        with pytest.raises(SystemExit) as e:
            run(out, "--stage", "1", "--max-steps", "5", *changed)
        one_line_exit(e, "--force-resume", *words)
        assert (out / "stage1" / "config.json").read_bytes() == config       # not rewritten
        assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 4   # nothing trained
    run(out, "--stage", "1", "--max-steps", "5", "--seed", "1", "--force-resume")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-2]["changed"] == {"seed": [0, 1]} and rows[-1]["step"] == 5
    assert json.loads((out / "stage1" / "config.json").read_text())["seed"] == 1


# ----- Tracebacks where one line would do ----------------------------------------------------------------------

def truncated(src, dst):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:len(data) // 2])
    return str(dst)


def test_truncated_weight_files_are_one_clear_error_naming_the_file(tiny_run, tmp_path):
    ema, decoder = tiny_run / "stage1" / "ema.safetensors", tiny_run / "autoencoder_P" / "stage1" / "model.safetensors"
    torch.save(dict(dit_lib.load_nextdit(str(ema)).state_dict()), tmp_path / "full.pth")
    torch.save({"state_dict": ae_lib.load_autoencoder(str(decoder)).state_dict()}, tmp_path / "full.ckpt")
    cut_dit = truncated(ema, tmp_path / "cut_dit.safetensors")
    cut_pth = truncated(tmp_path / "full.pth", tmp_path / "cut.pth")
    cut_ae = truncated(decoder, tmp_path / "cut_ae.safetensors")
    cut_ckpt = truncated(tmp_path / "full.ckpt", tmp_path / "cut.ckpt")
    for path in (cut_dit, cut_pth):
        with pytest.raises(ValueError, match=os.path.basename(path) + ".*truncated"):
            dit_lib.load_nextdit(path)
    for path in (cut_ae, cut_ckpt):
        with pytest.raises(ValueError, match=os.path.basename(path) + ".*truncated"):
            ae_lib.load_autoencoder(path)
    for flag, path in (("--dit", cut_dit), ("--dit", cut_pth), ("--decoder", cut_ae), ("--decoder", cut_ckpt)):
        with pytest.raises(SystemExit) as e:
            sample.main(["--prompt", "x", "--ckpt", str(tiny_run), flag, path, "--out", str(tmp_path / "out")])
        one_line_exit(e, os.path.basename(path), "truncated")


def test_global_batch_smaller_than_the_processes_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "setup_distributed", lambda: (0, 2, torch.device("cpu")))   # 2 processes
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--stage", "1", "--global-batch-size", "1")
    one_line_exit(e, "--global-batch-size 1", "2 processes")


def test_an_undeletable_latest_old_names_itself(tiny_run, tmp_path, monkeypatch):
    stage_dir = tmp_path / "stage1"
    shutil.copytree(tiny_run / "stage1" / "latest", stage_dir / "latest")
    shutil.copytree(tiny_run / "stage1" / "latest", stage_dir / "latest.old")
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):    # what a read-only latest.old/ does (root ignores chmod)
        if str(path).endswith("latest.old"):
            if ignore_errors:
                return
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    state = dict(weights=dict(model={"w": torch.zeros(1)}), step=99)
    with pytest.raises(OSError, match="cannot delete .*latest.old.*delete it by hand"):
        train.save_latest(str(stage_dir), 0, state, {})
    assert train.find_latest(str(stage_dir)) == str(stage_dir / "latest")      # the last checkpoint stays


def test_a_second_run_in_the_same_folder_fails_fast_and_a_killed_run_leaves_no_lock(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), *FAST, "--stage",
                              "1", "--max-steps", "100000", "--ckpt-every", "100000"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60                     # until the first run holds the folder
        while True:
            assert first.poll() is None and time.time() < deadline, "the first run never locked its folder"
            if os.path.exists(out / ".lock"):
                with open(out / ".lock") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(f, fcntl.LOCK_UN)
                    except BlockingIOError:
                        break
            time.sleep(0.2)
        with pytest.raises(SystemExit) as e:
            run(out, "--stage", "1", "--max-steps", "5")
        one_line_exit(e, "another train.py is running")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    run(out, "--stage", "1", "--max-steps", "5")        # kill -9 released the folder
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 5


# =========================================================================================================
# sample.py
# =========================================================================================================

def test_a_prompts_file_with_a_byte_order_mark_keeps_it_out_of_the_first_prompt(tiny_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes("\ufeffa red circle in the top left\na blue square\n".encode("utf-8"))
    sample.main(["--prompts", str(tmp_path / "p.txt"), "--ckpt", str(tiny_run), "--steps", "1", "--out",
                 str(tmp_path / "out")])
    first = capsys.readouterr().out.split()[0]
    assert os.path.basename(first).startswith("a_red_circle_in_the_top_left_95963a_")   # the plain prompt's name
    assert json.loads(Image.open(first).text["svg_t2i"])["prompt"] == "a red circle in the top left"


def test_a_latin_1_prompts_file_is_one_line_naming_the_file(tiny_run, tmp_path, no_sampling):
    (tmp_path / "prompts.txt").write_bytes("un cercle rouge en haut à gauche\n".encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompts", str(tmp_path / "prompts.txt"), "--ckpt", str(tiny_run), "--out", str(tmp_path / "o")])
    one_line_exit(e, str(tmp_path / "prompts.txt"), "UTF-8")


def test_a_full_disk_leaves_no_truncated_png_under_its_final_name(tiny_run, tmp_path, monkeypatch):
    save = Image.Image.save

    def disk_full_half_way(img, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)        # part of the file, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", disk_full_half_way)
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--steps", "1", "--out", str(tmp_path / "o")])
    message = one_line_exit(e, "No space left on device", "a_red_circle_")
    assert "\n" not in message
    assert os.listdir(tmp_path / "o") == []                  # neither the PNG nor its temporary file
    monkeypatch.setattr(Image.Image, "save", save)


def test_out_of_memory_says_what_to_lower(tiny_run, tmp_path, monkeypatch):
    """--n 20000 ran every image of a prompt in one batch and died in a traceback; now images go --batch-size at a
    time, and running out of memory anyway is one line naming the flags to lower."""
    sizes = []

    def out_of_memory(velocity, noise, *args, **kwargs):
        sizes.append(len(noise))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(flow, "sample", out_of_memory)
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--n", "20000", "--out", str(tmp_path / "o")])
    one_line_exit(e, "out of memory", "--batch-size", "--size")
    assert sizes == [4]                                      # the default batch, not 20000 images at once


def test_ctrl_c_is_one_line_saying_how_to_finish(tiny_run, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(flow, "sample", interrupted)
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a red circle", "--ckpt", str(tiny_run), "--out", str(tmp_path / "o")])
    assert e.value.code == 130                               # the shell's code for Ctrl-C
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "--resume" in err[0] and "Traceback" not in err[0]
