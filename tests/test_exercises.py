"""The README's exercises run as written on the shipped demo model, and show the effect the README describes.

The commands are read from README.md's "Exercises" section (benchmarks/exercise_pictures.py's reader), so what is
tested is what a reader types: each exercise's `python sample.py` lines run in-process through `sample.main` into
the README's folders (under tmp_path), then its `python benchmarks/compare.py` line. A command that does not
choose `--steps` gets 8 instead of the demo's 20 (on this demo 8 DPM steps give the 20-step image within 0.3 of
255 per pixel, README exercise 3), and the default image, the same command in three exercises, is made once:
about 60 model evaluations at 128 px in all. The grid tool itself is tested on made-up images at the end.
"""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pictures = _load("exercise_pictures")
compare = _load("compare")
EXERCISES = pictures.exercise_commands()
_made = {}                                       # one run of each distinct sample command: {argv: file}


def run_exercise(number, tmp_path):
    """Run exercise `number` as the README writes it -> ({tag: (pixels [H, W, 3] float, settings)}, the
    comparison picture or None, the folder)."""
    images, picture, folder = {}, None, None
    for tool, argv in EXERCISES[number]:
        argv = pictures.rooted(tool, argv, str(tmp_path))
        if tool == "compare":
            compare.main(argv)
            picture = Image.open(argv[argv.index("--out") + 1])
            continue
        argv += [] if "--steps" in argv else ["--steps", "8"]
        folder = argv[argv.index("--out") + 1]
        key = tuple(a for i, a in enumerate(argv) if a != "--out" and argv[i - 1] != "--out")
        before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if key in _made and os.path.exists(_made[key]):
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(_made[key], os.path.join(folder, os.path.basename(_made[key])))
        else:
            sample.main(argv)
        (name,) = [n for n in set(os.listdir(folder)) - before if not n.endswith("_trajectory.png")]
        _made[key] = os.path.join(folder, name)
        image = Image.open(_made[key])
        meta = json.loads(image.text["svg_t2i"])
        images[meta.get("tag", "image")] = (np.asarray(image.convert("RGB"), dtype=np.float64), meta)
    return images, picture, folder


def mean_abs(a, b):
    return float(np.abs(a - b).mean())


def distance_from_white_at_border(pixels):
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])   # [2H + 2W, 3]
    return float(np.abs(255 - border).mean())


def test_the_readme_has_four_exercises_each_ending_in_its_picture():
    assert sorted(EXERCISES) == [1, 2, 3, 4]
    for number, commands in EXERCISES.items():
        assert all("--out" in argv for _, argv in commands)
        if number < 4:           # variants under their own tags, then the side-by-side picture
            assert [tool for tool, _ in commands] == ["sample"] * (len(commands) - 1) + ["compare"]
            assert all("--tag" in argv for tool, argv in commands if tool == "sample")
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name in ("exercise1.png", "exercise2.png", "exercise3.png", "trajectory.png"):
        assert f"](assets/exercises/{name})" in readme
        assert os.path.getsize(os.path.join(ROOT, "assets", "exercises", name)) < 80_000    # small


def test_exercise_1_shift_10_spends_4_steps_worse_than_shift_1(tmp_path):
    images, picture, _ = run_exercise(1, tmp_path)
    default, shift_1, shift_10 = images["default"], images["shift1"], images["shift10"]
    assert (shift_1[1]["shift"], shift_10[1]["shift"], shift_10[1]["steps"]) == (1.0, 10.0, 4)
    # shift 1 stays near the many-step image; shift 10 makes most of the picture in its last step
    assert mean_abs(shift_10[0], default[0]) > 1.5 * mean_abs(shift_1[0], default[0])
    assert picture.size[0] == 3 * 128                     # the default and two variants side by side


def test_exercise_2_renorm_keeps_cfg_8_clean(tmp_path):
    images, _, _ = run_exercise(2, tmp_path)
    renormed, raw = images["cfg8"], images["cfg8-no-renorm"]
    assert (renormed[1]["cfg"], raw[1]["cfg"]) == (8.0, 8.0)
    assert renormed[1]["renorm"] is True and raw[1]["renorm"] is False
    # without renorm the over-long guided velocity tints the white background
    assert distance_from_white_at_border(raw[0]) > 1.5 * distance_from_white_at_border(renormed[0])


def test_exercise_3_euler_and_dpm_agree_at_8_steps_one_euler_step_does_not(tmp_path):
    images, picture, _ = run_exercise(3, tmp_path)
    euler_8, dpm_8, euler_1 = images["euler8"], images["dpm8"], images["euler1"]
    assert (euler_8[1]["solver"], dpm_8[1]["solver"], euler_1[1]["steps"]) == ("euler", "dpm", 1)
    # nearly straight paths: the two 8-step solvers land on the same picture, one step is far from it
    assert mean_abs(euler_8[0], dpm_8[0]) < 1.0
    assert mean_abs(euler_1[0], dpm_8[0]) > 3 * mean_abs(euler_8[0], dpm_8[0])
    assert picture.size[0] == 4 * 128


def test_exercise_4_the_trajectory_ends_on_the_image_and_converges_to_it(tmp_path):
    images, _, folder = run_exercise(4, tmp_path)
    (pixels, meta), = images.values()
    (name,) = [n for n in os.listdir(folder) if n.endswith("_trajectory.png")]
    assert name == f"{sample.file_stem(meta['prompt'])}_0_trajectory.png"
    strip = Image.open(os.path.join(folder, name))
    levels = json.loads(strip.text["svg_t2i"])["trajectory"]
    assert len(levels) == meta["steps"] == 8 and levels == sorted(levels, reverse=True) and levels[0] > 0.99
    frames = np.asarray(strip.convert("RGB"), dtype=np.float64)[:128].reshape(128, 8, 128, 3).transpose(1, 0, 2, 3)
    # DPM-Solver++'s last step lands on its last data prediction: the last frame is the image
    assert np.abs(frames[-1] - pixels).max() <= 1
    # the guesses settle: the first (from nearly pure noise) is the farthest from the image
    distances = [mean_abs(frame, pixels) for frame in frames]
    assert distances[0] == max(distances) and distances[0] > 2 * distances[4]


# ----- benchmarks/compare.py on made-up images ----------------------------------------------------------------

def _write(folder, name, pixels, **meta):
    image = Image.fromarray(pixels.astype(np.uint8))
    sample.save_png(image, os.path.join(folder, name), json.dumps(dict(dict(steps=20, cfg=3.0, shift=3.0), **meta)))


def test_compare_draws_each_variant_against_the_default_with_its_difference_times_8(tmp_path, capsys):
    base = np.full((64, 64, 3), 200)
    brighter = base.copy()
    brighter[16:32, 16:32] += 3                                           # 256 pixels x 3 channels, +3 levels
    _write(tmp_path, "d.png", base, tag="default")
    _write(tmp_path, "b.png", brighter, tag="bright", steps=4)
    _write(tmp_path, "s.png", base, tag="same", cfg=8.0)
    _write(tmp_path, "g.png", base, tag="default", n=4)                   # a grid: skipped
    compare.main([str(tmp_path), "--out", str(tmp_path / "out" / "grid.png")])
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png").convert("RGB")).astype(int)
    assert grid.shape[1] == 3 * 64                                        # default, then the variants in order
    labels_h = grid.shape[0] - 2 * 64 - 2 * compare.LINE - 4
    diff = grid[64 + labels_h:64 + labels_h + 64]                         # the row of difference images
    assert (diff[16:32, 64 + 16:64 + 32] == 3 * compare.AMPLIFY).all()    # |+3| x 8
    assert diff[:, 64:].sum() == 256 * 3 * 3 * compare.AMPLIFY            # nothing else lit
    assert (grid[:64, :64] == 200).all() and (grid[:64, 64:128] == brighter).all()
    out = capsys.readouterr().out
    assert "bright: mean |diff| from default 0.19" in out and "same: mean |diff| from default 0.00" in out
    assert compare.differing(dict(steps=4, cfg=3.0, renorm=False), dict(steps=20, cfg=3.0, renorm=True)) == \
        "steps 4, no renorm"


def test_compare_refuses_what_it_cannot_label_in_one_line(tmp_path):
    pixels = np.zeros((8, 8, 3))
    _write(tmp_path, "a.png", pixels, tag="a")
    with pytest.raises(SystemExit, match="no image tagged 'default' among \\['a'\\]"):
        compare.main([str(tmp_path), "--out", str(tmp_path / "o.png")])
    _write(tmp_path, "b.png", pixels, tag="a")
    with pytest.raises(SystemExit, match="two images tagged 'a'"):
        compare.main([str(tmp_path), "--out", str(tmp_path / "o.png")])
    os.remove(tmp_path / "b.png")
    _write(tmp_path, "c.png", pixels)
    with pytest.raises(SystemExit, match="c.png has no tag"):
        compare.main([str(tmp_path), "--out", str(tmp_path / "o.png")])
    os.remove(tmp_path / "c.png")
    sample.save_png(Image.fromarray(pixels.astype(np.uint8)), str(tmp_path / "d.png"), "{not json")
    with pytest.raises(SystemExit, match="d.png: its svg_t2i settings are not JSON"):
        compare.main([str(tmp_path), "--out", str(tmp_path / "o.png")])
    assert not os.path.exists(tmp_path / "o.png")
