"""The offline demo dataset: seeded shape scenes with Flickr8k-style captions.

The pipeline needs a dataset that works without internet, so this module draws one. Each image
holds one to three shapes of a single colour and kind on a plain background; each image gets
five differently worded captions built from one small shared vocabulary.

The scenes are designed around what the default features can carry. With `features.weights:
random`, average-pooled ResNet-50 features keep colour, shape kind and count (linearly
predictable, see `bench/demo_learnability.py`) but lose position, so captions name count,
colour, shape and (in some captions) background and never say where things are. Position, size
and rotation vary only to keep the task from being trivial.

Everything is a pure function of the arguments: attributes come from one seeded stream, each
image's layout and caption wordings from their own streams keyed by its index, JPEGs are written
with fixed settings and no metadata, so the same arguments give byte-identical files (and image i
does not depend on `n_images`). A manifest of the arguments lets a rerun skip work when the output is already there.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioning.errors import UserError
from captioning.files import atomic_path, read_json, write_json

# Bump when the drawing or the captions change, so an old manifest no longer matches.
GENERATOR_VERSION = 3

COLOURS = {  # name -> RGB; far apart in hue and brightness so pooled features keep them apart
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (245, 205, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15)}

NUMBER_WORDS = {2: "two", 3: "three"}  # one shape is "a <colour> <shape>"
SHAPE_ADJECTIVES = {"circle": "round", "square": "square", "triangle": "triangular"}

JPEG_QUALITY = 95
SUPERSAMPLE = 2            # draw at 2x and downsample: smooth edges, still deterministic
COLOUR_JITTER = 12         # +- per channel, so colour is a region, not one exact value
# Shape "radius" as a fraction of the image side. A narrow range keeps count readable from the
# pooled features (wider ranges let one big shape look like two small ones: count 0.69 -> 0.80
# at n=600 going from 0.11-0.17 to 0.13-0.16).
RADIUS_RANGE = (0.14, 0.17)
MAX_ROTATION_DEG = 10.0
SQUARE_SCALE = 0.8 * math.sqrt(2)  # centre-to-corner distance / r: side 1.6 r, a bit smaller than the circle
TRIANGLE_SCALE = 1.15              # centre-to-corner distance / r for the triangle
MANIFEST = "demo_manifest.json"
CAPTIONS = "captions.pkl"
PICKLE_PROTOCOL = 4


@dataclass(frozen=True)
class Scene:
    """What an image shows: the attributes its captions name."""
    name: str
    count: int
    colour: str
    shape: str
    background: str


def image_name(index: int) -> str:
    return f"demo_{index + 1:05d}.jpg"


def plan_scenes(n_images: int, seed: int) -> list[Scene]:
    """Attributes for each image, balanced: every block of all combinations is a seeded shuffle.

    Block b is shuffled by its own generator, so image i gets the same attributes whatever
    `n_images` is, and every combination appears equally often up to one partial block.
    """
    combos = list(itertools.product(COUNTS, COLOURS, SHAPES, BACKGROUNDS))
    scenes: list[Scene] = []
    for block in itertools.count():
        if len(scenes) >= n_images:
            break
        order = np.random.default_rng([seed, 0, block]).permutation(len(combos))
        for j in order[: n_images - len(scenes)]:
            count, colour, shape, background = combos[j]
            scenes.append(Scene(image_name(len(scenes)), count, colour, shape, background))
    return scenes


def _noun_phrase(scene: Scene) -> str:
    if scene.count == 1:
        return f"a {scene.colour} {scene.shape}"
    return f"{NUMBER_WORDS[scene.count]} {scene.colour} {scene.shape}s"


def _shape_phrase(scene: Scene) -> str:
    adjective = SHAPE_ADJECTIVES[scene.shape]
    lead = {1: "a single", 2: "a pair of", 3: "a group of three"}[scene.count]
    plural = "s" if scene.count > 1 else ""
    return f"{lead} {scene.colour} {adjective} shape{plural}"


# How annotators word a scene, as (text, weight). Every caption names the whole content (count,
# colour, shape); captions differ in optional parts, and some wordings are much more common than
# others, as in Flickr8k where most captions lead with the subject and a few add an opener or the
# setting. With equally likely wordings (generator version 2) the most probable caption under any
# model is an arbitrary pick among them; real references have a favourite wording, and so do these.
OPENERS = (("", 6), ("a picture of ", 2), ("there {verb} ", 2), ("a photo of ", 1), ("an image of ", 1))
SUBJECTS = ((_noun_phrase, 4), (_shape_phrase, 1))
SETTINGS = (("", 5), (" on a {background} background", 3), (" against a {background} background", 1))
CAPTIONS_PER_IMAGE = 5


def captions_for(scene: Scene, index: int, seed: int) -> list[str]:
    """Five differently worded captions of one scene, Flickr8k style (ending in " .").

    The wordings are a weighted draw without replacement from OPENERS x SUBJECTS x SETTINGS, from a
    generator keyed by (seed, image index) only, so image i's captions do not depend on `n_images`.
    """
    combos = list(itertools.product(OPENERS, SUBJECTS, SETTINGS))
    weights = np.array([o[1] * s[1] * t[1] for o, s, t in combos], float)
    picks = np.random.default_rng([seed, 2, index]).choice(
        len(combos), size=CAPTIONS_PER_IMAGE, replace=False, p=weights / weights.sum())
    verb = "is" if scene.count == 1 else "are"
    captions = []
    for j in picks:
        (opener, _), (subject, _), (setting, _) = combos[j]
        text = opener.format(verb=verb) + subject(scene) + setting.format(background=scene.background)
        captions.append(f"{text} .")
    return captions


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square or an equilateral triangle of circumradius-ish size r, rotated."""
    if shape == "square":
        corners, radius, start = 4, SQUARE_SCALE * r, math.pi / 4
    else:
        corners, radius, start = 3, TRIANGLE_SCALE * r, -math.pi / 2
    return [
        (cx + radius * math.cos(start + angle + 2 * math.pi * k / corners),
         cy + radius * math.sin(start + angle + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def _layout(rng: np.random.Generator, count: int, side: float) -> list[tuple[float, float, float]]:
    """Non-overlapping (cx, cy, r) for `count` shapes of similar size, by seeded rejection.

    Candidates are drawn 64 at a time and the first one clear of the shapes already placed is
    kept; if none is, the whole layout starts again a little smaller (rare).
    """
    base = rng.uniform(*RADIUS_RANGE) * side
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(count):
            r = base * rng.uniform(0.9, 1.1, size=64)
            margin = 1.2 * r + 0.02 * side
            cx = margin + rng.random(64) * (side - 2 * margin)
            cy = margin + rng.random(64) * (side - 2 * margin)
            ok = np.ones(64, bool)
            for x, y, q in placed:
                ok &= np.hypot(cx - x, cy - y) > 1.25 * (r + q) + 0.03 * side
            if not ok.any():
                break
            j = int(ok.argmax())
            placed.append((float(cx[j]), float(cy[j]), float(r[j])))
        if len(placed) == count:
            return placed
        base *= 0.95


def draw_scene(scene: Scene, index: int, image_size: int, seed: int) -> Image.Image:
    """Render one scene; the layout generator is keyed by (seed, image index) only."""
    rng = np.random.default_rng([seed, 1, index])
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    base = np.array(COLOURS[scene.colour])
    for cx, cy, r in _layout(rng, scene.count, side):
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(base + jitter, 0, 255))
        angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(scene.shape, cx, cy, r, angle), fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buffer.getvalue()


def _manifest(n_images: int, image_size: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "n_images": n_images,
            "image_size": image_size, "seed": seed}


def _vocabulary(lines: list[str]) -> list[str]:
    return sorted({word for line in lines for word in line.split("\t", 1)[1].split() if word != "."})


def _summary(scenes: list[Scene], lines: list[str], captions_sha256: str, skipped: bool) -> dict:
    vocabulary = _vocabulary(lines)
    return {
        "n_images": len(scenes),
        "n_captions": len(lines),
        "vocab_size": len(vocabulary),
        "vocabulary": vocabulary,
        "attributes": {
            attr: {str(value): sum(getattr(s, attr) == value for s in scenes) for value in values}
            for attr, values in (("count", COUNTS), ("colour", COLOURS), ("shape", SHAPES),
                                 ("background", BACKGROUNDS))
        },
        "captions_sha256": captions_sha256,
        "skipped": skipped,
    }


def _is_current(out_dir: Path, manifest: dict, scenes: list[Scene]) -> str | None:
    """The captions hash if `out_dir` already holds this exact output, else None."""
    try:
        stored = read_json(out_dir / MANIFEST)
        data = (out_dir / CAPTIONS).read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or {k: stored.get(k) for k in manifest} != manifest:
        return None
    digest = hashlib.sha256(data).hexdigest()
    if stored.get("captions_sha256") != digest:
        return None
    images = out_dir / "images"
    if {p.name for p in images.glob("demo_*.jpg")} != {s.name for s in scenes}:
        return None
    return digest


def check_not_stale(captions_file: str | Path) -> None:
    """Refuse demo data made by an older generator: after an upgrade, `dvc repro` would otherwise
    train and score on the old captions without a word (the demo folder is not a DVC output)."""
    manifest = Path(captions_file).parent / MANIFEST
    if not manifest.is_file():
        return  # not the demo: the user's own data
    try:
        made_by = read_json(manifest).get("generator_version")
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object
        made_by = "unknown"
    if made_by != GENERATOR_VERSION:
        raise UserError(f"{manifest} says this demo data was made by generator version {made_by}, and this "
                        f"code writes version {GENERATOR_VERSION}. Remake it with `python -m captioning demo`, "
                        "then run `dvc repro` again.")


def write_demo(out_dir: str | Path, *, n_images: int, image_size: int, seed: int,
               params_file: str | Path = "params.yaml") -> str:
    """generate_demo for `python -m captioning demo` and parse_pickle; returns the line that says what it did.

    A folder that cannot be written is one line naming the param to change, not an OSError traceback."""
    try:
        summary = generate_demo(Path(out_dir), n_images=n_images, image_size=image_size, seed=seed)
    except OSError as err:
        raise UserError(f"cannot write the demo into {out_dir} ({err}): set demo.out_dir in {params_file} to a "
                        "folder you can write") from None
    state = "up to date" if summary["skipped"] else "written"
    return (f"demo {state}: {summary['n_images']} images, {summary['n_captions']} captions, "
            f"{summary['vocab_size']} words -> {out_dir}")


def match_params(captions_file: str | Path, *, out_dir: str, n_images: int, image_size: int, seed: int) -> str:
    """Make the demo data parse_pickle is about to read the data that params.yaml's `demo` section describes.

    The demo folder is no stage's output (`python -m captioning demo` writes it), so a change of the demo
    params alone (`dvc exp run -S demo.n_images=500`) reran nothing, or, once parse_pickle listed them, would
    parse the old images while the experiment showed the new params. When `captions_file` is the demo's
    (`demo.out_dir`/captions.pkl), the demo is written again if its manifest records other settings or another
    generator version (when they match, generate_demo only reads the manifest). Any other captions file is
    the user's own data, which the demo params do not describe: the returned line says so.
    """
    demo_captions = Path(out_dir) / CAPTIONS
    if Path(captions_file).resolve() != demo_captions.resolve():
        check_not_stale(captions_file)  # a demo folder kept elsewhere must still be this generator's
        return f"demo.* params not used: data.captions is {captions_file}, not the demo's {demo_captions}"
    return write_demo(out_dir, n_images=n_images, image_size=image_size, seed=seed)


def generate_demo(out_dir, *, n_images: int, image_size: int, seed: int) -> dict:
    """Write `out_dir/images/demo_NNNNN.jpg` and `out_dir/captions.pkl`; return a summary.

    captions.pkl is a pickled list of Flickr8k token lines "name.jpg#k\\tcaption", k = 0..4.
    Skips the work when the manifest shows the same arguments and the files are all present.
    """
    out_dir = Path(out_dir)
    scenes = plan_scenes(n_images, seed)
    lines = [f"{scene.name}#{k}\t{caption}"
             for index, scene in enumerate(scenes) for k, caption in enumerate(captions_for(scene, index, seed))]
    manifest = _manifest(n_images, image_size, seed)

    digest = _is_current(out_dir, manifest, scenes)
    if digest is not None:
        return _summary(scenes, lines, digest, skipped=True)

    (out_dir / MANIFEST).unlink(missing_ok=True)  # a half-finished rerun must not look current
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    wanted = {s.name for s in scenes}
    for stale in images.glob("demo_*.jpg"):
        if stale.name not in wanted:
            stale.unlink()
    for index, scene in enumerate(scenes):
        with atomic_path(images / scene.name, suffix=".jpg") as tmp:
            tmp.write_bytes(_jpeg_bytes(draw_scene(scene, index, image_size, seed)))
    data = pickle.dumps(lines, protocol=PICKLE_PROTOCOL)
    with atomic_path(out_dir / CAPTIONS, suffix=".pkl") as tmp:
        tmp.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    write_json(out_dir / MANIFEST, {**manifest, "captions_sha256": digest})
    return _summary(scenes, lines, digest, skipped=False)

