"""The README's exercises run as written on the shipped demo model, and show the effect the README describes.

The commands are read from README.md's "Exercises" section, so what is tested is what a reader types. Each runs
in-process through `sample.main` with its own output folder; a command that does not choose `--steps` gets 8
instead of the demo's 20 (the small size: on this demo 8 DPM steps give the 20-step image within 0.3 of 255 per
pixel, README exercise 3), which keeps the whole file to about 50 model evaluations at 128 px.
"""
import json
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exercise_commands():
    """README "## Exercises" -> {exercise number: [argv lists of its `python sample.py` commands]}."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("\n## Exercises\n", 1)[1].split("\n## ", 1)[0]
    exercises, number = {}, None
    for line in section.splitlines():
        heading = re.match(r"\*\*(\d+)\. ", line)
        if heading:
            number = int(heading.group(1))
        elif line.startswith("python sample.py "):
            exercises.setdefault(number, []).append(shlex.split(line)[2:])
    return exercises


EXERCISES = exercise_commands()


def run(argv, tmp_path):
    """Run one README command into its own folder under tmp_path -> (pixels [H, W, 3] float, PNG metadata)."""
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / f"run{len(list(tmp_path.iterdir()))}")
    if "--steps" not in argv:
        argv += ["--steps", "8"]
    sample.main(argv)
    (name,) = os.listdir(argv[argv.index("--out") + 1])
    image = Image.open(os.path.join(argv[argv.index("--out") + 1], name))
    return np.asarray(image.convert("RGB"), dtype=np.float64), json.loads(image.text["svg_t2i"])


def mean_abs(a, b):
    return float(np.abs(a - b).mean())


def distance_from_white_at_border(pixels):
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])   # [2H + 2W, 3]
    return float(np.abs(255 - border).mean())


def test_the_readme_has_three_exercises_of_sample_commands():
    assert sorted(EXERCISES) == [1, 2, 3]
    assert all(len(commands) >= 2 for commands in EXERCISES.values())
    assert all("--out" in argv for commands in EXERCISES.values() for argv in commands)


def test_exercise_1_shift_10_spends_4_steps_worse_than_shift_1(tmp_path):
    default, shift_1, shift_10 = (run(argv, tmp_path) for argv in EXERCISES[1])
    assert (shift_1[1]["shift"], shift_10[1]["shift"], shift_10[1]["steps"]) == (1.0, 10.0, 4)
    # shift 1 stays near the many-step image; shift 10 makes most of the picture in its last step
    assert mean_abs(shift_10[0], default[0]) > 1.5 * mean_abs(shift_1[0], default[0])


def test_exercise_2_renorm_keeps_cfg_8_clean(tmp_path):
    renormed, raw = (run(argv, tmp_path) for argv in EXERCISES[2])
    assert (renormed[1]["cfg"], raw[1]["cfg"]) == (8.0, 8.0)
    assert renormed[1]["renorm"] is True and raw[1]["renorm"] is False
    # without renorm the over-long guided velocity tints the white background
    assert distance_from_white_at_border(raw[0]) > 1.5 * distance_from_white_at_border(renormed[0])


def test_exercise_3_euler_and_dpm_agree_at_8_steps_one_euler_step_does_not(tmp_path):
    euler_8, dpm_8, euler_1 = (run(argv, tmp_path) for argv in EXERCISES[3])
    assert (euler_8[1]["solver"], dpm_8[1]["solver"], euler_1[1]["steps"]) == ("euler", "dpm", 1)
    # nearly straight paths: the two 8-step solvers land on the same picture, one step is far from it
    assert mean_abs(euler_8[0], dpm_8[0]) < 1.0
    assert mean_abs(euler_1[0], dpm_8[0]) > 3 * mean_abs(euler_8[0], dpm_8[0])
