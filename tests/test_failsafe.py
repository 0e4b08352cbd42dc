"""Nothing lost, nothing hangs, nothing silent: what a hostile but fair user tried, each as a test.

Data loss (--export over a folder, sample files that share a name), hangs (an epoch with no readable image),
silent wrong results (a stale feature cache, 0 meaning "the default", a NaN guidance scale, a resume with
other settings, files of the wrong kind found only after sampling) and tracebacks where one line would do
(truncated files, impossible sizes, two runs in one folder). On the tiny preset, on the CPU."""
import errno
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
import machinery
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
    assert (export / machinery.EXPORT_MARKER).exists()
    (export / "stage1" / "config.json").write_text("{}")    # a file the export wrote itself
    run(out, *again, "--export", str(export))           # an earlier export is replaced, as a whole
    assert json.loads((export / "stage1" / "config.json").read_text())["stage"] == 1
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
    monkeypatch.setattr(machinery, "setup_distributed", lambda: (0, 2, torch.device("cpu")))   # 2 processes
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
        machinery.save_latest(str(stage_dir), 0, state, {})
    assert machinery.find_latest(str(stage_dir)) == str(stage_dir / "latest")      # the last checkpoint stays


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



# ----- Second round (issue 20): nothing run, nothing lost, nothing silent ----------------------------------

class Payload:
    """A pickle that creates a file when it is loaded: what a planted trainer.pt could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["trainer.pt", "rng_rank0.pt"])
def test_a_planted_pickle_in_latest_never_runs(name, tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    marker = tmp_path / "ran"
    path = out / "stage1" / "latest" / name
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, payload=Payload(str(marker))), path)
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "5")
    assert "\n" not in one_line_exit(e, name, "run code")
    assert not marker.exists()


def test_every_file_is_read_without_running_code():
    for name in ("train.py", "sample.py", "data.py", "dino.py", "text.py", "autoencoder.py", "model.py",
                 "benchmarks/gpu_check.py"):
        source = open(os.path.join(ROOT, name)).read()
        assert "weights_only=False" not in source and "import pickle" not in source, name


def test_a_finished_stage_without_latest_is_never_overwritten(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    for stage_dir, argv in ((out / "stage1", ["--stage", "1"]),
                            (out / "autoencoder_P" / "stage1", ["--autoencoder", "P", "--stage", "1"])):
        shutil.rmtree(stage_dir / "latest")             # to free disk
        before = {p.name: p.read_bytes() for p in stage_dir.iterdir()}
        with pytest.raises(SystemExit) as e:
            run(out, *argv, "--max-steps", "3")
        one_line_exit(e, str(stage_dir), "finished stage", "another --out")
        assert {p.name: p.read_bytes() for p in stage_dir.iterdir()} == before


def test_re_export_never_deletes_your_files_in_an_earlier_export(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    export = tmp_path / "export"
    run(out, "--stage", "1", "--max-steps", "4", "--export", str(export))
    (export / "notes.txt").write_text("mine")
    (export / "my_samples").mkdir()
    (export / "my_samples" / "a.png").write_bytes(b"png")
    (export / "stage1" / "why.txt").write_text("also mine")
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "4", "--export", str(export))
    one_line_exit(e, "notes.txt", "my_samples/", "why.txt", "did not write")
    assert (export / "notes.txt").read_text() == "mine" and (export / "my_samples" / "a.png").read_bytes() == b"png"
    assert (export / "stage1" / "why.txt").exists() and (export / "stage1" / "ema.safetensors").exists()


@pytest.mark.parametrize("keep", ["encoders", "stage1"])
def test_encoders_are_never_made_again_for_a_run_that_has_them(keep, tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    os.remove(out / "encoders.json")
    if keep == "stage1":                                # the encoders gone too, the stage trained on them kept
        shutil.rmtree(out / "encoders")
    dino_before = (tiny_run / "encoders" / "dino.safetensors").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "2", "--max-steps", "1", "--seed", "1")
    one_line_exit(e, keep, "no encoders.json")
    assert not (out / "encoders.json").exists()
    if keep == "encoders":
        assert (out / "encoders" / "dino.safetensors").read_bytes() == dino_before


def test_feature_cache_sees_images_replaced_in_place(tiny_run, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [json.dumps(dict(path=f"{i}.png", prompt="a red square")) for i in range(4)]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    for n, colour in enumerate(((200, 30, 30), (30, 30, 200))):     # same paths, same captions, other pixels
        for i in range(4):
            Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
            os.utime(folder / f"{i}.png", ns=(10**18 + n, 10**18 + n))
        out = tmp_path / f"run{n}"
        copy_encoders(tiny_run, out)
        run(out, "--stage", "1", "--data", str(folder / "pairs.jsonl"), "--max-steps", "1",
            "--global-batch-size", "4", "--cache-features", str(cache))
    assert len(list(cache.iterdir())) == 2              # a new cache, not the stale latents


def test_processes_with_different_data_refuse_to_train_together(tiny_run, tmp_path, monkeypatch):
    out = copy_run(tiny_run, tmp_path / "run")
    monkeypatch.setattr(machinery, "setup_distributed", lambda: (0, 2, torch.device("cpu")))   # 2 processes
    monkeypatch.setattr(machinery.dist, "all_gather_object", lambda got, mine: got.__setitem__(
        slice(None), [mine, mine + "-other-node" if isinstance(mine, str) else mine]))
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "5", "--data-limit", "64")
    one_line_exit(e, "--data differs between the processes")


@pytest.mark.parametrize("extra", [[], ["--global-batch-size", "4"]])
def test_another_preset_in_a_run_folder_is_refused(extra, tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "5", "--preset", "demo", *extra)
    one_line_exit(e, "--preset tiny", "encoders.json")


def test_a_stage_folder_of_another_preset_is_one_line_naming_the_file(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    encoders = json.loads((out / "encoders.json").read_text())
    encoders.pop("preset")                              # an encoders.json of an older train.py: no preset in it
    (out / "encoders.json").write_text(json.dumps(encoders))
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "5", "--preset", "demo", "--global-batch-size", "4")
    one_line_exit(e, "model.safetensors", "--preset")
    shutil.rmtree(out / "stage1" / "latest")            # stage 2 of demo size from a tiny stage 1
    shutil.copytree(tiny_run / "stage1" / "latest", out / "stage2" / "unused")
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "2", "--max-steps", "1", "--preset", "demo")
    one_line_exit(e, "config.json", "--preset tiny")


def test_bom_in_captions_and_jsonl_is_not_part_of_the_text(tmp_path):
    import data
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa red square\n".encode("utf-8"))
    assert data.FolderDataset(str(tmp_path), 32, patch=8).records[0]["caption"] == "a red square"
    (tmp_path / "pairs.jsonl").write_bytes(("\ufeff" + json.dumps(dict(path="a.png", prompt="x")) + "\n").encode())
    assert data.JsonlDataset(str(tmp_path / "pairs.jsonl"), 32, patch=8).records[0]["caption"] == "x"


def test_exif_orientation_is_applied_as_viewers_do(tmp_path):
    import data
    stored = Image.new("RGB", (128, 32), (255, 0, 0))  # stored landscape, left red, right blue
    stored.paste((0, 0, 255), (64, 0, 128, 32))
    exif = Image.Exif()
    exif[0x0112] = 6                                    # "rotate 90 clockwise to display": a portrait photo
    stored.save(tmp_path / "a.jpg", exif=exif, quality=95)
    (tmp_path / "a.txt").write_text("portrait")
    ds = data.FolderDataset(str(tmp_path), 64, patch=8)
    height, width = ds.bucket_of(0)
    assert height > width                               # a portrait bucket
    image = ds[0]["image"]                              # [3, H, W]: displayed top is red, bottom blue
    top, bottom = image[:, : height // 4].mean((1, 2)), image[:, -height // 4:].mean((1, 2))
    assert top[0] > 0.5 > top[2] and bottom[2] > 0.5 > bottom[0]


def test_the_log_does_not_repeat_steps_after_a_resume(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)
    real = machinery.save_latest

    def killed_at_step_6(stage_dir, rank, state, rng_state):
        if state["step"] == 6:
            raise KeyboardInterrupt
        real(stage_dir, rank, state, rng_state)
    monkeypatch.setattr(machinery, "save_latest", killed_at_step_6)
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run(out, "--stage", "1", "--max-steps", "6", "--ckpt-every", "3")     # logs 5 and 6, checkpoint at 3
    monkeypatch.setattr(machinery, "save_latest", real)
    run(out, "--stage", "1", "--max-steps", "6", "--ckpt-every", "3")         # the same command again
    steps = [row["step"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "step" in row]
    assert steps == [5, 6]


def test_skipped_images_counts_files_not_epochs(tiny_run, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    lines = [json.dumps(dict(path=p, prompt="x", width=32, height=32)) for p in ("ok.png", "ok.png", "ok.png", "gone.png")]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)
    run(out, "--stage", "1", "--data", str(tmp_path / "pairs.jsonl"), "--max-steps", "5", "--global-batch-size", "4")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and rows[-1]["skipped_images"] == 1      # one file, missing in 5 epochs


def test_a_named_pipe_in_the_data_never_blocks_start_up(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("a red square")
    os.mkfifo(tmp_path / "b.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(path="a.png", prompt="x")) + "\n"
                                          + json.dumps(dict(path="b.png", prompt="y")) + "\n")
    code = ("import sys, data; print(len(data.FolderDataset(sys.argv[1], 64, patch=8)), "   # 64: headers are read
            "len(data.JsonlDataset(sys.argv[1] + '/pairs.jsonl', 64, patch=8)))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["1", "1"], proc.stderr
    assert "b.png" in proc.stderr and "not a regular file" in proc.stderr


def test_final_stage_files_are_written_atomically(tiny_run, tmp_path, monkeypatch):
    out = copy_run(tiny_run, tmp_path / "run")
    before = (out / "stage1" / "ema.safetensors").read_bytes()

    def disk_full(model, path):
        open(path, "wb").write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dit_lib, "save_nextdit", disk_full)
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "5")
    one_line_exit(e, "model.safetensors", "No space left")
    assert (out / "stage1" / "ema.safetensors").read_bytes() == before
    assert sorted(os.listdir(out / "stage1")) == ["config.json", "ema.safetensors", "latest", "model.safetensors"]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_run, tmp_path, monkeypatch):
    out = copy_run(tiny_run, tmp_path / "run")
    before = (out / "stage1" / "latest" / "model.safetensors").read_bytes()

    def disk_full(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(machinery, "save_file", disk_full)
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "6", "--ckpt-every", "5")
    one_line_exit(e, "latest.tmp", "No space left", "free disk space")
    assert (out / "stage1" / "latest" / "model.safetensors").read_bytes() == before
    assert not (out / "stage1" / "latest.tmp").exists()                  # the space is given back


@pytest.mark.parametrize("name", ["trainer.pt", "model.safetensors"])
def test_a_truncated_checkpoint_is_one_line_naming_the_file(name, tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    path = out / "stage1" / "latest" / name
    truncated(path, path)
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "5")
    one_line_exit(e, str(path))


@pytest.mark.parametrize("name,content", [
    ("encoders.json", '{"dino": 5}'), ("encoders.json", "garbage"), ("stage1/latest/settings.json", "garbage"),
    ("stage1/latest/rng_rank0.pt", "garbage"),
])
def test_garbage_run_files_are_one_line_naming_the_file(name, content, tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    (out / name).write_text(content)
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--max-steps", "5")
    one_line_exit(e, os.path.basename(name))


def test_a_stage_config_with_wrong_types_is_one_line_naming_it(tiny_run, tmp_path, no_sampling):
    out = copy_run(tiny_run, tmp_path / "run")
    config = json.loads((out / "stage1" / "config.json").read_text())
    config["sample"]["steps"] = "many"
    (out / "stage1" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "x", "--ckpt", str(out), "--out", str(tmp_path / "out")])
    one_line_exit(e, "config.json", "steps")


def test_a_folder_of_unreadable_images_says_so_and_where(tiny_run, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        truncated_png = tmp_path / "full.png"
        Image.new("RGB", (32, 32), (9 * i, 0, 0)).save(truncated_png)
        truncated(truncated_png, folder / f"{i}.png")   # the header reads, the pixels do not
        (folder / f"{i}.txt").write_text("x")
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)
    os.remove(out / "encoders" / "latent_stats.pt")
    with pytest.raises(SystemExit) as e:
        run(out, "--stage", "1", "--data", str(folder), "--max-steps", "1")
    one_line_exit(e, str(folder), "not one of its first 3 images could be read")


def train_command(out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--out", str(out), "--preset", "tiny", "--no-compile",
            "--preview-every", "0", "--stage", "1", "--max-steps", "100000", "--ckpt-every", "100000", *extra]


def wait_for_training(proc, out):
    """Until the run has logged a step past the copied checkpoint's 4: its DataLoader workers are running."""
    deadline = time.time() + 120
    while not any(json.loads(line).get("step", 0) > 4 for line in (out / "log.jsonl").read_text().splitlines()):
        assert proc.poll() is None and time.time() < deadline, "the run never trained"
        time.sleep(0.2)


def test_ctrl_c_is_one_line_saying_how_to_resume(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    proc = subprocess.Popen(train_command(out, "--workers", "0"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(proc, out)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted; resume with the same command" in err and "Traceback" not in err


def test_sigterm_leaves_no_worker_holding_the_run_folder(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path / "run")
    proc = subprocess.Popen(train_command(out, "--workers", "2"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_training(proc, out)
        proc.send_signal(signal.SIGTERM)                # the main process only: its workers are orphaned
        proc.wait(timeout=60)
    finally:
        proc.kill()
    run(out, "--stage", "1", "--max-steps", "5")        # at once: not "another train.py is running"


def test_a_killed_cache_build_leaves_no_temporary_files(tiny_run, tmp_path):
    out = tmp_path / "run"
    copy_encoders(tiny_run, out)
    cache = tmp_path / "cache"
    args = ["--stage", "1", "--max-steps", "1", "--data-limit", "8", "--cache-features", str(cache)]
    run(out, *args)
    folder, = cache.iterdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                         # a pid no process has now: a build killed by kill -9
    os.remove(folder / "index.json")
    (folder / f"shard-00000.safetensors.tmp{dead.pid}").write_bytes(b"half a shard")
    (folder / "index.json.tmp").write_text("{")
    shutil.rmtree(out / "stage1")
    run(out, *args)
    assert sorted(os.listdir(folder)) == ["index.json", "shard-00000.safetensors"]


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


def test_every_file_of_a_run_has_the_permissions_the_umask_allows(tiny_run):
    # safetensors creates files readable by their owner alone; a run on a shared disk must be readable as any
    # file the user writes (0o644 under the usual umask 022).
    mask = os.umask(0)
    os.umask(mask)
    files = [os.path.join(d, n) for d, _, names in os.walk(tiny_run) for n in names]
    assert any(f.endswith(".safetensors") for f in files)
    wrong = {os.path.relpath(f, tiny_run): oct(os.stat(f).st_mode & 0o777) for f in files
             if os.stat(f).st_mode & 0o777 != 0o666 & ~mask}
    assert not wrong, wrong
