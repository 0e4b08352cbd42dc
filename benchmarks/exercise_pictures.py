"""Make the README's exercise pictures again, by running its exercise commands as they are written.

    python benchmarks/exercise_pictures.py                  # about a minute on 2 CPU cores

Reads README.md's "## Exercises" section: each `python sample.py ...` and `python benchmarks/compare.py ...`
line, grouped by the exercise ("**N. ...**") it stands under. Runs them in-process, in order, with their paths
put under a temporary folder, then rewrites (in 256 colours, to keep them small) assets/exercises/exerciseN.png with each exercise's comparison and
assets/exercises/trajectory.png with exercise 4's trajectory, its frames downscaled to 64 px (the README's
pictures are meant to be small). tests/test_exercises.py reads the commands with the same function.
"""
import os
import re
import shlex
import sys
import tempfile

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare  # noqa: E402
import sample  # noqa: E402

ASSETS = os.path.join(ROOT, "assets", "exercises")
TRAJECTORY_FRAME = 64       # pixels per frame of the README's trajectory strip


def exercise_commands(readme=os.path.join(ROOT, "README.md")):
    """README "## Exercises" -> {exercise number: [(tool, argv)]}, tool "sample" or "compare", in order."""
    with open(readme, encoding="utf-8") as f:
        section = f.read().split("\n## Exercises\n", 1)[1].split("\n## ", 1)[0]
    exercises, number = {}, None
    for line in section.splitlines():
        heading = re.match(r"\*\*(\d+)\. ", line)
        if heading:
            number = int(heading.group(1))
        for tool, prefix in (("sample", "python sample.py "), ("compare", "python benchmarks/compare.py ")):
            if line.startswith(prefix):
                if number is None:
                    raise ValueError(f"{readme}: the command {line!r} stands before the first numbered exercise")
                exercises.setdefault(number, []).append((tool, shlex.split(line)[2:]))
    return exercises


def rooted(tool, argv, root):
    """The command's paths (--out, and compare's folder) put under `root`."""
    argv = list(argv)
    argv[argv.index("--out") + 1] = os.path.join(root, argv[argv.index("--out") + 1])
    if tool == "compare":
        argv[0] = os.path.join(root, argv[0])
    return argv


def install(path, name):
    """Copy `path` to assets/exercises/NAME whole or not at all (a temporary name, then a rename), in 256
    colours: a third smaller, and the same picture to the eye."""
    tmp = os.path.join(ASSETS, f".{name}.tmp{os.getpid()}")
    with Image.open(path) as img:
        img.convert("RGB").quantize(256).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, os.path.join(ASSETS, name))


def main():
    os.makedirs(ASSETS, exist_ok=True)
    sample.TRAJECTORY_FRAME = TRAJECTORY_FRAME
    with tempfile.TemporaryDirectory() as root:
        for number, commands in sorted(exercise_commands().items()):
            for tool, argv in commands:
                argv = rooted(tool, argv, root)
                print(f"exercise {number}: {tool} {shlex.join(argv)}", file=sys.stderr)
                (sample if tool == "sample" else compare).main(argv)
                out = argv[argv.index("--out") + 1]
                if tool == "compare":
                    install(out, f"exercise{number}.png")
                elif "--trajectory" in argv:
                    (name,) = [n for n in os.listdir(out) if n.endswith("_trajectory.png")]
                    install(os.path.join(out, name), "trajectory.png")
    for name in sorted(os.listdir(ASSETS)):
        print(os.path.join("assets", "exercises", name), os.path.getsize(os.path.join(ASSETS, name)), "bytes")


if __name__ == "__main__":
    main()
