"""Prompt adherence of the demo model: does "a red circle in the top left" come out red, round, top left?

The demo model (train.py's `demo` preset) is trained on the procedural shapes of data.py, so its outputs
can be read back with plain pixel arithmetic instead of a learned detector (the GenEval idea, shrunk to a
world of 8 colours, 3 shapes and 5 positions):

    prompt ──► sample.load_pipeline(ckpt).generate ──► image ──► classify_image ──► objects ──► score

The classifier, step by step:
  1. background = median colour of the border pixels;
  2. foreground mask = pixels far from the background; its connected components are the objects
     (components under 0.4% of the image are noise and ignored);
  3. colour = nearest palette entry to the median of the object's solid core;
  4. coverage ("alpha") of every pixel = how far it sits between background and object colour, so the
     anti-aliased edges count by fraction; position = nearest named position to the coverage centroid;
  5. shape = area / (width × height), where width and height are measured from the coverage profiles:
     a square fills its box (1.0), a circle π/4 ≈ 0.79, an upright triangle 0.5 -- unless the object is far
     from convex: a five-pointed star (the fine-tuning exercise's new shape, README "Fine-tuning") covers
     0.47 of its convex hull, the three others ≥ 0.9, so "solidity" (area / hull area) < 0.7 reads as a star.
It is checked on rendered ground truth by tests/test_eval_shapes.py.
`--round-trip` reads that ground truth after a checkpoint's own encoder and decoder instead of sampling: the
best its frozen decoder allows (the demo's rounds the points of a small star off; data.STAR_SIDE says why).

Scoring (GenEval's two-object and colour-attribution questions, in miniature): a one-object prompt is right
when the largest object found has its colour, shape and position. A two-object prompt is scored per object
(the object found at each named place: its colour, its shape, and whether the place is occupied) and per
image (`all`: both objects right in all three). Every number is reported with its range over the seeds.

Usage:  python benchmarks/eval_shapes.py [--ckpt RUN_DIR[,RUN_DIR...]] [--prompts old|star|all] [--seeds 0,1,2,3]
                                         [--out eval_shapes.json] [--steps N] [--cfg S] [--limit N] [--round-trip]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
from data import NEW_SHAPES, PAIR_POSITIONS, PALETTE, POSITIONS, SHAPES, STAR_SIDE, caption_for, \
    parse_caption, render_shapes  # noqa: E402

# Thresholds. The nearest palette colour is at least ~240 RGB units from white, so a quarter of that marks
# foreground; shape fills split halfway between the ideal values 0.5, π/4 and 1.
FOREGROUND_DIST = 90.0
CORE_FRACTION = 0.8          # a pixel belongs to the solid core at >= 80% of the object's largest distance
MIN_AREA_FRACTION = 0.004    # smaller components are noise
TRIANGLE_MAX_FILL = (0.5 + np.pi / 4) / 2   # 0.64
SQUARE_MIN_FILL = (np.pi / 4 + 1.0) / 2     # 0.89
STAR_MAX_SOLIDITY = 0.7      # area / convex-hull area: a regular star 0.47, circles, squares, triangles >= 0.9


# ----- Connected components ---------------------------------------------------------------------------------

def _shift(a, dy, dx, fill):
    """a moved by (dy, dx), vacated cells set to `fill` (no wrap-around, unlike np.roll)."""
    out = np.full_like(a, fill)
    H, W = a.shape
    out[max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = a[max(-dy, 0):H - max(dy, 0),
                                                                  max(-dx, 0):W - max(dx, 0)]
    return out


def connected_components(mask):
    """8-connected components of a bool mask [H, W] -> int label map (0 = background, 1..n) and n.

    Label propagation: every foreground pixel starts with its own number (its flat index + 1) and repeatedly
    takes the smallest number among its neighbours, until nothing changes; then each component carries one
    number. Pointer jumping speeds this up: a label v was born at pixel v - 1, in the same component, so a
    pixel may also adopt that pixel's current label. Vectorised: a few milliseconds for a 128² image."""
    big = mask.size + 1
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), big)
    while True:
        smallest = labels
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    smallest = np.minimum(smallest, _shift(labels, dy, dx, big))
        smallest = np.where(mask, smallest, big)
        for _ in range(2):  # pointer jumping (labels only ever decrease, so this never splits a component)
            smallest = np.where(mask, smallest.ravel()[np.where(mask, smallest - 1, 0)], big)
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    uniq, dense = np.unique(np.where(mask, labels, 0), return_inverse=True)  # renumber 1..n, 0 stays 0
    dense = dense.reshape(mask.shape)
    return dense if uniq[0] == 0 else dense + 1, len(uniq) - (uniq[0] == 0)


# ----- The classifier ---------------------------------------------------------------------------------------

def convex_hull_area(mask):
    """Area in pixels of the convex hull of a bool mask's pixels (each pixel a unit square): Andrew's monotone
    chain over the pixel corners, then the shoelace formula."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    corners = np.unique(np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]), axis=0)
    points = [tuple(p) for p in corners.tolist()]          # sorted by x, then y (np.unique sorts rows)

    def half(pts):
        hull = []
        for p in pts:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1]) -
                                      (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
        return hull[:-1]
    hull = np.array(half(points) + half(points[::-1]), dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _nearest(value, table):
    """Key of `table` whose value is nearest (Euclidean) to `value`."""
    return min(table, key=lambda k: float(np.sum((np.asarray(table[k], float) - value) ** 2)))


def classify_image(image):
    """PIL image or uint8 array [H, W, 3] -> list of objects, largest first:
    dicts {color, shape, position, cx, cy (fractions), fill, area (fraction of the image)}."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)[..., :3]
    H, W, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])   # [2H+2W, 3]
    background = np.median(border, axis=0)
    diff = arr - background                                             # [H, W, 3]
    dist = np.linalg.norm(diff, axis=-1)                                # [H, W]
    labels, n = connected_components(dist > FOREGROUND_DIST)
    ys, xs = np.mgrid[0:H, 0:W] + 0.5                                   # pixel centres

    found = []
    for k in range(1, n + 1):
        comp = labels == k
        if comp.sum() < MIN_AREA_FRACTION * H * W:
            continue
        core = comp & (dist >= CORE_FRACTION * dist[comp].max())
        color_rgb = np.median(arr[core], axis=0)
        # Coverage: projection of each pixel onto the background->object colour line, 0..1. Taken over the
        # component grown by one pixel, so that faint edge pixels under the mask threshold still count.
        grown = comp.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= _shift(comp, dy, dx, False)
        axis = color_rgb - background
        alpha = np.clip(diff @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0) * grown   # [H, W]
        area = alpha.sum()
        # Extent from coverage profiles: the most-covered pixel of each column (row) says what fraction of
        # that column (row) the object spans; their sum is the object's width (height) to sub-pixel accuracy.
        width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
        fill = area / max(width * height, 1e-6)
        solidity = float((alpha >= 0.5).sum()) / max(convex_hull_area(alpha >= 0.5), 1.0)
        shape = "star" if solidity < STAR_MAX_SOLIDITY else "triangle" if fill < TRIANGLE_MAX_FILL else \
            "square" if fill > SQUARE_MIN_FILL else "circle"
        cx, cy = (alpha * xs).sum() / area / W, (alpha * ys).sum() / area / H
        found.append(dict(color=_nearest(color_rgb, PALETTE), shape=shape,
                          position=_nearest(np.array([cx, cy]), POSITIONS),
                          cx=float(cx), cy=float(cy), fill=float(fill), solidity=solidity,
                          area=float(area / (H * W))))
    return sorted(found, key=lambda o: -o["area"])


def score(prompt_objects, found_objects):
    """Did the image show what the prompt asked? -> {objects: [{color, shape, position} per asked object],
    all, count}, every value a bool.

    One asked object is compared with the largest found one. Each of two asked objects is compared with the
    found object at its named place (the largest there): its position is right when that place is occupied,
    its colour and shape when that object has them. `all`: every asked object right in all three (for a pair,
    both objects); `count`: exactly as many objects found as asked."""
    if len(prompt_objects) == 1:
        match = found_objects[0] if found_objects else None
        matches = [match]
        positions = [match is not None and match["position"] == prompt_objects[0]["position"]]
    else:
        by_position = {}
        for obj in found_objects:  # largest first, so the largest object at a position wins
            by_position.setdefault(obj["position"], obj)
        matches = [by_position.get(p["position"]) for p in prompt_objects]
        positions = [m is not None for m in matches]
    objects = [dict(color=m is not None and m["color"] == p["color"], shape=m is not None and m["shape"] == p["shape"],
                    position=at) for p, m, at in zip(prompt_objects, matches, positions)]
    return dict(objects=objects, all=all(all(o.values()) for o in objects),
                count=len(found_objects) == len(prompt_objects))


# ----- The prompts ------------------------------------------------------------------------------------------

def _eval_prompts():
    """Every single object (8 colours × 3 shapes × 5 positions = 120), then 48 pairs: each of the 6 pairs of
    corners (the places pairs are drawn at) eight times, colours and shapes cycled so that the two objects
    always differ in both (the colour of one must not bleed into the other)."""
    colors, positions = list(PALETTE), list(POSITIONS)
    singles = [caption_for([dict(color=c, shape=s, position=p)])
               for c in colors for s in SHAPES for p in positions]
    pairs = []
    position_pairs = [(a, b) for i, a in enumerate(PAIR_POSITIONS) for b in PAIR_POSITIONS[i + 1:]]  # 6
    for variant in range(8):
        for k, (pa, pb) in enumerate(position_pairs):
            j = 3 * k + variant
            pairs.append(caption_for([
                dict(color=colors[j % 8], shape=SHAPES[(k + variant) % 3], position=pa),
                dict(color=colors[(j + 3) % 8], shape=SHAPES[(k + variant + 1) % 3], position=pb)]))
    return singles + pairs


EVAL_PROMPTS = _eval_prompts()
# The fine-tuning exercise's new concept: a lone star in every colour and position (8 x 5 = 40).
STAR_PROMPTS = [caption_for([dict(color=c, shape=s, position=p)]) for s in NEW_SHAPES for c in PALETTE for p in POSITIONS]


# ----- Generate and report ----------------------------------------------------------------------------------

OBJECT_KEYS, IMAGE_KEYS = ("color", "shape", "position"), ("all", "count")


def summarize(records):
    """Per-prompt records -> {group: {n, color, shape, position, all, count}}: colour, shape and position are
    fractions of asked objects (two per pair prompt), `all` and `count` fractions of images (a pair counts
    only when both objects are right)."""
    is_new = lambda r: any(shape in r.get("prompt", "").split() for shape in NEW_SHAPES)
    groups = {"single": [r for r in records if r["n_objects"] == 1 and not is_new(r)],
              "two": [r for r in records if r["n_objects"] == 2 and not is_new(r)]}
    if any(map(is_new, records)):                # the fine-tuning exercise's stars, a group of their own
        groups["star"] = [r for r in records if is_new(r)]
    out = {}
    for g, rs in groups.items():
        objects = [o for r in rs for o in r["score"]["objects"]]
        rate = lambda hits: sum(hits) / len(hits) if hits else float("nan")
        out[g] = dict(n=len(rs), **{k: rate([o[k] for o in objects]) for k in OBJECT_KEYS},
                      **{k: rate([r["score"][k] for r in rs]) for k in IMAGE_KEYS})
    return out


def summarize_seeds(records, seeds):
    """-> (per-seed summaries {seed: summary}, spread {group: {key: (mean, min, max) over the seeds}})."""
    per_seed = {seed: summarize([r for r in records if r["seed"] == seed]) for seed in seeds}
    spread = {}
    for g in per_seed[seeds[0]]:
        spread[g] = {}
        for k in OBJECT_KEYS + IMAGE_KEYS:
            values = [per_seed[seed][g][k] for seed in seeds]
            spread[g][k] = (float(np.mean(values)), min(values), max(values))
    return per_seed, spread


def print_table(summary, spread):
    """One row per group, each number followed by its [min-max] over the seeds."""
    keys = OBJECT_KEYS + IMAGE_KEYS
    print(f"{'':8s}{'n':>6s}" + "".join(f"{k:>20s}" for k in keys))
    for g, s in summary.items():
        if not s["n"]:
            continue
        cells = [f"{s[k]:.3f} [{spread[g][k][1]:.2f}-{spread[g][k][2]:.2f}]" for k in keys]
        print(f"{g:8s}{s['n']:6d}" + "".join(f"{c:>20s}" for c in cells))


def evaluate(pipe, prompts, seeds, options, batch_size):
    """Generate every prompt with every seed and read each image back -> per-image records."""
    records = []
    for seed in seeds:
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b:b + batch_size]
            # generate() seeds image j with seed + j: prompt number i of the list gets seed·1000 + i, so no
            # two prompts share their noise, and the result does not depend on --batch-size.
            images = pipe.generate(batch, seed=seed * 1000 + b, progress=False, **options)
            for prompt, image in zip(batch, images):
                asked, found = parse_caption(prompt), classify_image(image)
                records.append(dict(prompt=prompt, seed=seed, n_objects=len(asked), found=found,
                                    score=score(asked, found)))
    return records


def round_trip(pipe, prompts):
    """The ceiling a checkpoint's decoder allows: every prompt's ground truth (data.render_shapes, clean sizes)
    encoded by its frozen DINOv3 and decoded by its decoder, then read back like a sample -> per-image records
    (seed 0). A DiT that reproduced the training latents exactly would score this; a shape the decoder never
    saw (the star) comes back with rounded points."""
    import torch
    size = pipe.settings()[0]                                   # the model's default (square) size
    records = []
    for b in range(0, len(prompts), 30):
        # each object at its clean size: the old shapes' default, a star at the size shapes:star trains on
        batch = [[dict(o, side=STAR_SIDE) if o["shape"] in NEW_SHAPES else o for o in parse_caption(p)]
                 for p in prompts[b:b + 30]]
        truth = np.stack([np.asarray(render_shapes(objects, size)) for objects in batch])
        x = torch.from_numpy(truth).permute(0, 3, 1, 2).to(pipe.device, torch.float32) / 127.5 - 1   # [n, 3, H, W]
        dtype = next(pipe.autoencoder.decoder.parameters()).dtype
        with torch.no_grad():
            pixels = pipe.autoencoder.decode(pipe.autoencoder.encode(x).to(dtype)).float()
        pixels = ((pixels + 1) / 2).clamp(0, 1).mul(255).byte().permute(0, 2, 3, 1).cpu().numpy()
        for prompt, asked, image in zip(prompts[b:b + 30], batch, pixels):
            found = classify_image(image)
            records.append(dict(prompt=prompt, seed=0, n_objects=len(asked), found=found, score=score(asked, found)))
    return records


def print_side_by_side(results):
    """One column per checkpoint: `all` and shape for each group, mean over the seeds."""
    names = [r["ckpt"] or "demo" for r in results]
    print("side by side (mean over seeds): " + " | ".join(f"[{i}] {n}" for i, n in enumerate(names)))
    groups = [g for g in ("single", "two", "star") if any(g in r["summary"] for r in results)]
    print(f"{'':18s}" + "".join(f"{'[' + str(i) + ']':>10s}" for i in range(len(results))))
    for g in groups:
        for k in ("all", "shape", "color", "position"):
            cells = [r["summary"].get(g, {}).get(k, float("nan")) for r in results]
            print(f"{g + ' ' + k:18s}" + "".join(f"{c:10.3f}" for c in cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Prompt adherence of a shapes model (colour, shape, position).")
    ap.add_argument("--ckpt", default=None, help="run folder or checkpoint, or several separated by commas (a "
                    "side-by-side table at the end); default: sample.py's default, the shipped demo")
    ap.add_argument("--prompts", choices=("old", "star", "all"), default="all", help="the demo's world (120 single "
                    "objects, 48 pairs), the fine-tuning exercise's 40 stars, or both")
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds; every prompt runs with each")
    ap.add_argument("--out", default="eval_shapes.json", help="where to write the JSON of results")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the sampler's)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the sampler's)")
    ap.add_argument("--cfg-trunc", type=float, default=None, help="guidance only while t < this (sample.py "
                    "--cfg-trunc; default: every step)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts (quick checks)")
    ap.add_argument("--round-trip", action="store_true", help="instead of sampling, read back each prompt's "
                    "rendered ground truth after the checkpoint's autoencoder (encode, decode): what its frozen "
                    "decoder allows at best")
    ap.add_argument("--batch-size", type=int, default=30, help="prompts per generate() call")
    args = ap.parse_args(argv)

    import sample  # only here: the classifier above must work without the generator
    options = {k: v for k, v in (("steps", args.steps), ("cfg", args.cfg), ("cfg_trunc", args.cfg_trunc))
               if v is not None}
    prompts = dict(old=EVAL_PROMPTS, star=STAR_PROMPTS, all=EVAL_PROMPTS + STAR_PROMPTS)[args.prompts]
    prompts = prompts[:args.limit] if args.limit else prompts
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results = []
    for ckpt in (args.ckpt.split(",") if args.ckpt else [None]):
        start = time.time()
        pipe = sample.load_pipeline(ckpt)
        if args.round_trip:                      # no noise: one pass, reported as seed 0
            seeds, records = [0], round_trip(pipe, prompts)
        else:
            records = evaluate(pipe, prompts, seeds, options, args.batch_size)
        summary = summarize(records)
        per_seed, spread = summarize_seeds(records, seeds)
        print(f"{ckpt or 'the shipped demo'}: one object: colour, shape, position of the largest object found; two "
              "objects: colour, shape,\nposition per asked object (the object found at its named place), `all` = "
              f"every object right;\n[min-max] over the {len(seeds)} seeds")
        print_table(summary, spread)
        print(f"{len(records)} images in {time.time() - start:.0f} s")
        results.append(dict(ckpt=ckpt, seeds=seeds, options=options, summary=summary, per_seed=per_seed,
                            spread=spread, records=records))
    if len(results) > 1:
        print_side_by_side(results)
    with open(args.out, "w") as f:
        json.dump(results[0] if len(results) == 1 else dict(runs=results), f, indent=1)
    print(f"wrote {args.out}")
    return results[0]["summary"] if len(results) == 1 else [r["summary"] for r in results]


if __name__ == "__main__":
    main()
