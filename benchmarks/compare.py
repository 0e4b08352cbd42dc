"""Side by side: the variants of an experiment against its default, and where they differ.

    python benchmarks/compare.py ex/1 --out ex/1.png

reads every image sample.py wrote into a folder (the PNGs with `svg_t2i` settings; grids and trajectories are
skipped), one per `--tag` (sample.py --tag LABEL), and makes one picture: the top row holds the reference (the
image tagged `default`, or --reference) and each variant, labelled with its tag and the settings that differ
from the reference's; below each variant, its amplified difference |variant - reference| x 8 (black: the same
pixel), labelled with the mean absolute difference out of 255. x 8 makes a difference of 32 levels white, and
one of 1 level, a rounding, still visible as a dark grey. The README's exercises end with this command.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402  (save_png: atomic, never over an existing file)

AMPLIFY = 8                 # the difference image shows |a - b| x 8, clipped to 255
SETTINGS = ("steps", "cfg", "renorm", "cfg_trunc", "solver", "shift", "size", "seed", "system", "checkpoint", "prompt")
LINE = 12                   # pixels per label line (the default font is 10 px)


def read_variants(folder):
    """{tag: (pixels [H, W, 3] uint8, settings)} of the images in `folder`, in the order they were written (the
    README's order of the commands); one image per tag, or an error."""
    found = {}
    by_time = lambda name: (os.stat(os.path.join(folder, name)).st_mtime_ns, name)
    for name in sorted(os.listdir(folder), key=by_time):
        path = os.path.join(folder, name)
        if not name.endswith(".png") or name.startswith("."):
            continue
        with Image.open(path) as img:
            meta = img.info.get("svg_t2i")
            if meta is None:
                continue
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: its svg_t2i settings are not JSON; move it out of the folder") from None
            if "n" in meta or "trajectory" in meta or "compare" in meta:     # a grid, a trajectory, a comparison
                continue
            tag = meta.get("tag")
            if tag is None:
                raise ValueError(f"{path} has no tag: write each variant with sample.py --tag LABEL (the "
                                 "default one with --tag default)")
            if tag in found:
                raise ValueError(f"{folder}: two images tagged {tag!r} ({found[tag][2]} and {name}); compare.py "
                                 "wants one image per tag (one prompt, one seed, --n 1)")
            found[tag] = (np.asarray(img.convert("RGB")), meta, name)
    if not found:
        raise ValueError(f"{folder}: no images written by sample.py in it")
    return {tag: (pixels, meta) for tag, (pixels, meta, _) in found.items()}


def differing(meta, reference):
    """The settings of `meta` that differ from the reference's, as 'key value' words."""
    words = []
    for key in SETTINGS:
        if meta.get(key) != reference.get(key):
            value = meta.get(key)
            words.append(("no renorm" if value is False else "renorm") if key == "renorm" else f"{key} {value}")
    return ", ".join(words) or "same settings"


def wrap(line, width, font):
    """Break a label into lines that fit `width` pixels."""
    lines, current = [], ""
    for word in line.split(" "):
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width - 4:
            lines.append(current)
            trial = word
        current = trial
    return lines + [current]


def compare(variants, reference="default"):
    """-> (PIL image, {tag: mean |variant - reference| out of 255}): the grid described at the top."""
    if reference not in variants:
        raise ValueError(f"no image tagged {reference!r} among {sorted(variants)}: write the reference with "
                         f"sample.py --tag {reference}, or pass --reference TAG")
    ref_pixels, ref_meta = variants[reference]
    others = [tag for tag in variants if tag != reference]
    for tag in others:
        if variants[tag][0].shape != ref_pixels.shape:
            raise ValueError(f"{tag!r} is {variants[tag][0].shape[1]}x{variants[tag][0].shape[0]} pixels, the "
                             f"reference {ref_pixels.shape[1]}x{ref_pixels.shape[0]}: compare images of one size")
    h, w = ref_pixels.shape[:2]
    font = ImageFont.load_default()
    top = {reference: wrap(f"{reference} (reference)", w, font)}
    top.update({tag: wrap(f"{tag}: {differing(variants[tag][1], ref_meta)}", w, font) for tag in others})
    label_h = LINE * max(len(lines) for lines in top.values()) + 4
    columns = [reference, *others]
    grid = Image.new("RGB", (w * len(columns), 2 * h + label_h + 2 * LINE + 4), "white")
    draw = ImageDraw.Draw(grid)
    means = {}
    for k, tag in enumerate(columns):
        x = k * w
        grid.paste(Image.fromarray(variants[tag][0]), (x, 0))
        for i, line in enumerate(top[tag]):
            draw.text((x + 2, h + 2 + i * LINE), line, fill="black", font=font)
        y = h + label_h
        if tag == reference:
            for i, line in enumerate(wrap(f"below: |variant - {reference}| x{AMPLIFY}", w, font)):
                draw.text((x + 2, y + 2 + i * LINE), line, fill="black", font=font)
            continue
        diff = np.abs(variants[tag][0].astype(np.int16) - ref_pixels.astype(np.int16))     # [H, W, 3], 0..255
        means[tag] = float(diff.mean())
        grid.paste(Image.fromarray(np.minimum(diff * AMPLIFY, 255).astype(np.uint8)), (x, y))
        draw.text((x + 2, y + h + 2), f"mean |diff| {means[tag]:.2f}", fill="black", font=font)
    return grid, means


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a --out folder of sample.py runs, one image per --tag")
    p.add_argument("--out", required=True, help="the picture to write (PNG); a name already taken gets -1, -2, ...")
    p.add_argument("--reference", default="default", help="the tag of the image the others are compared with")
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.folder):
            raise ValueError(f"{args.folder} is not a folder: pass the --out folder of the sample.py runs")
        variants = read_variants(args.folder)
        grid, means = compare(variants, args.reference)
        meta = json.dumps(dict(compare=dict(folder=args.folder, reference=args.reference, amplify=AMPLIFY,
                                            mean_abs_diff={tag: round(m, 3) for tag, m in means.items()})))
        written = sample.save_png(grid, args.out, meta)
    except (ValueError, OSError) as err:
        raise SystemExit(f"compare.py: {err}") from None
    for tag, mean in means.items():
        print(f"{tag}: mean |diff| from {args.reference} {mean:.2f} of 255")
    print(written)


if __name__ == "__main__":
    main()
