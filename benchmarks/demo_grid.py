"""The README's picture: twelve fixed prompts through a model (six single objects, then six pairs), one image each,
labelled, in a 6 x 2 grid.

    python benchmarks/demo_grid.py [--ckpt DIR] [--out assets/demo_grid.png]

Seeds 0, 1, ..., 11 (image j of a batch uses seed + j, as in `sample.py`) and the model's default sampler
settings: the grid shows what `sample.py` gives, not a pick.
"""
import argparse
import os
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import sample  # noqa: E402

PROMPTS = ["a red circle in the top left", "a blue square in the center", "a yellow triangle in the bottom right",
           "a green square in the top right", "a purple triangle in the bottom left", "an orange circle in the center",
           "a yellow circle in the bottom left and a green square in the top right",
           "a purple square in the top left and an orange triangle in the bottom right",
           "a red triangle in the top left and a blue circle in the top right",
           "a black square in the bottom left and a cyan triangle in the bottom right",
           "a green triangle in the top right and a red square in the bottom right",
           "a cyan circle in the top left and a black triangle in the bottom left"]
COLS, LABEL_HEIGHT = 6, 28
SCALE = 2                  # pixels doubled (nearest): room for the labels, and every generated pixel visible


def label(prompt):
    """'a red circle in the top left and ...' -> 'red circle, top left' lines, one per object."""
    return "\n".join(part.split(" ", 1)[1].replace(" in the ", ", ") for part in prompt.split(" and "))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="run folder or checkpoint (default: the shipped demo)")
    p.add_argument("--out", default="assets/demo_grid.png", help="where to write the PNG")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every image")
    args = p.parse_args(argv)
    images = sample.load_pipeline(args.ckpt, device="cpu").generate(PROMPTS, seed=args.seed, progress=False)
    w, h = images[0].width * SCALE, images[0].height * SCALE
    images = [image.resize((w, h), Image.NEAREST) for image in images]
    rows = -(-len(images) // COLS)
    grid = Image.new("RGB", (COLS * w, rows * (h + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
        x, y = (i % COLS) * w, (i // COLS) * (h + LABEL_HEIGHT)
        grid.paste(image, (x, y))
        draw.multiline_text((x + 3, y + h + 1), label(prompt), fill=(60, 60, 60), spacing=1)
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
