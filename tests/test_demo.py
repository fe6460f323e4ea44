"""The demo dataset generator: deterministic, well-formed, Flickr8k-shaped. No TensorFlow here."""
from __future__ import annotations

import pickle
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from PIL import Image

from captioning.demo import (
    COLOURS,
    COUNTS,
    GENERATOR_VERSION,
    MANIFEST,
    NUMBER_WORDS,
    SHAPE_ADJECTIVES,
    SHAPES,
    captions_for,
    check_not_stale,
    generate_demo,
    match_params,
    plan_scenes,
)
from captioning.errors import UserError
from captioning.text import tokenize

N, SIZE, SEED = 30, 64, 7
ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(root: Path) -> list[str]:
    return pickle.loads((root / "captions.pkl").read_bytes())


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_images=N, image_size=SIZE, seed=SEED)
    return out


def test_two_runs_are_byte_identical(demo_dir, tmp_path):
    generate_demo(tmp_path, n_images=N, image_size=SIZE, seed=SEED)
    assert _files(tmp_path) == _files(demo_dir)


def test_another_seed_gives_other_images(demo_dir, tmp_path):
    generate_demo(tmp_path, n_images=N, image_size=SIZE, seed=SEED + 1)
    assert _files(tmp_path)["images/demo_00001.jpg"] != _files(demo_dir)["images/demo_00001.jpg"]


def test_token_lines_parse_flickr8k_style(demo_dir):
    lines = _lines(demo_dir)
    assert isinstance(lines, list) and all(isinstance(line, str) for line in lines)
    assert len(lines) == 5 * N
    by_image = defaultdict(list)
    for line in lines:
        key, caption = line.split("\t")
        name, k = key.rsplit("#", 1)
        assert name.startswith("demo_") and name.endswith(".jpg")
        by_image[name].append((int(k), caption))
        assert caption.endswith(" .") and caption == caption.strip() and "  " not in caption
    assert len(by_image) == N
    for name, caps in by_image.items():
        assert [k for k, _ in caps] == [0, 1, 2, 3, 4]
        assert len({" ".join(tokenize(c)) for _, c in caps}) == 5, name


def test_images_are_rgb_jpegs_of_the_right_size(demo_dir):
    names = {line.split("#")[0] for line in _lines(demo_dir)}
    on_disk = {p.name for p in (demo_dir / "images").iterdir()}
    assert on_disk == names
    for name in names:
        with Image.open(demo_dir / "images" / name) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
            assert not image.info.get("exif")


def test_summary_counts_and_vocabulary(tmp_path):
    summary = generate_demo(tmp_path, n_images=N, image_size=SIZE, seed=SEED)
    assert summary["n_images"] == N and summary["n_captions"] == 5 * N
    assert not summary["skipped"]
    assert set(summary["vocabulary"]) >= set(COLOURS) | {"circle", "square", "triangle", "two", "three"}
    assert sum(summary["attributes"]["count"].values()) == N


def test_rerun_with_same_args_skips_and_other_args_regenerate(tmp_path):
    first = generate_demo(tmp_path, n_images=N, image_size=SIZE, seed=SEED)
    before = _files(tmp_path)
    again = generate_demo(tmp_path, n_images=N, image_size=SIZE, seed=SEED)
    assert again["skipped"] and again["captions_sha256"] == first["captions_sha256"]
    assert _files(tmp_path) == before
    smaller = generate_demo(tmp_path, n_images=N - 10, image_size=SIZE, seed=SEED)
    assert not smaller["skipped"]
    assert len(list((tmp_path / "images").iterdir())) == N - 10  # stale images removed


def test_a_missing_image_forces_regeneration(tmp_path):
    generate_demo(tmp_path, n_images=N, image_size=SIZE, seed=SEED)
    (tmp_path / "images" / "demo_00003.jpg").unlink()
    assert not generate_demo(tmp_path, n_images=N, image_size=SIZE, seed=SEED)["skipped"]
    assert (tmp_path / "images" / "demo_00003.jpg").exists()


def test_attributes_are_balanced_and_stable_across_n():
    scenes = plan_scenes(720, SEED)
    for attr, values in (("count", COUNTS), ("colour", COLOURS), ("shape", SHAPES)):
        tally = Counter(getattr(s, attr) for s in scenes)
        assert set(tally) == set(values) and len(set(tally.values())) == 1, attr
    assert plan_scenes(100, SEED) == scenes[:100]


def test_captions_name_the_attributes_and_never_position():
    for index, scene in enumerate(plan_scenes(72, SEED)):
        captions = captions_for(scene, index, SEED)
        assert len(set(captions)) == 5
        for caption in captions:
            words = set(caption.split())
            assert scene.colour in words
            assert words & {scene.shape, scene.shape + "s", SHAPE_ADJECTIVES[scene.shape]}
            assert words & ({NUMBER_WORDS[scene.count], "pair"} if scene.count > 1 else {"a", "single"})
            assert not words & {"left", "right", "top", "bottom", "middle", "center", "corner"}


def _wording(caption: str) -> str:
    """A caption with its content words blanked: what is left is how it is worded."""
    content = {*COLOURS, "white", "black", *SHAPES, *(s + "s" for s in SHAPES), *SHAPE_ADJECTIVES.values(),
               *NUMBER_WORDS.values(), "single", "pair", "group"}
    return " ".join("_" if word in content else word for word in caption.split())


def test_wordings_have_a_favourite_like_real_references():
    # With five equally likely wordings a model's most probable caption is an arbitrary one of them;
    # real references favour some wordings. The plain subject must lead, in most images' references.
    scenes = plan_scenes(360, SEED)
    per_image = [{_wording(c) for c in captions_for(s, i, SEED)} for i, s in enumerate(scenes)]
    tally = Counter(w for wordings in per_image for w in wordings)
    (first, n_first), (_, n_second) = tally.most_common(2)
    assert first in {"a _ _ .", "_ _ _ ."}, tally.most_common(3)
    assert n_first > 1.15 * n_second
    assert len(tally) > 10  # and still many different wordings overall


def test_captions_of_an_image_do_not_depend_on_n_images():
    short, long = plan_scenes(10, SEED), plan_scenes(50, SEED)
    assert [captions_for(s, i, SEED) for i, s in enumerate(short)] == \
           [captions_for(s, i, SEED) for i, s in enumerate(long[:10])]


def test_stale_demo_data_is_refused_with_the_command_to_remake_it(tmp_path):
    generate_demo(tmp_path, n_images=3, image_size=SIZE, seed=SEED)
    check_not_stale(tmp_path / "captions.pkl")  # current: fine
    check_not_stale(tmp_path / "elsewhere" / "captions.pkl")  # no manifest: the user's own data
    manifest = tmp_path / MANIFEST
    manifest.write_text(manifest.read_text().replace(f'"generator_version": {GENERATOR_VERSION}',
                                                     '"generator_version": 1'))
    with pytest.raises(UserError, match="version 1.*python -m captioning demo"):
        check_not_stale(tmp_path / "captions.pkl")
    manifest.write_text("{not json")
    with pytest.raises(UserError, match="python -m captioning demo"):
        check_not_stale(tmp_path / "captions.pkl")


def test_parse_pickle_remakes_the_demo_only_when_it_is_the_data(tmp_path):
    """match_params (parse_pickle's first step) writes the demo params' data into demo.out_dir when
    data.captions is the demo's, and says the demo params are not used for other data."""
    out = tmp_path / "demo"
    generate_demo(out, n_images=N, image_size=SIZE, seed=SEED)
    settings = {"out_dir": str(out), "n_images": N - 10, "image_size": SIZE, "seed": SEED}
    own = tmp_path / "mine" / "captions.txt"
    assert match_params(own, **settings).startswith(f"demo.* params not used: data.captions is {own}")
    assert len(list((out / "images").iterdir())) == N  # left alone
    assert match_params(out / "captions.pkl", **settings).startswith(f"demo written: {N - 10} images")
    assert len(_lines(out)) == 5 * (N - 10)
    assert match_params(out / "captions.pkl", **settings).startswith("demo up to date")


def test_bad_arguments_are_user_errors(tmp_path):
    # Checked once, where params.yaml is read (`python -m captioning demo` reads its section so).
    from captioning.params import read_section

    for bad in ({"n_images": 0}, {"image_size": 8}):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(
            {"demo": {"out_dir": "d", "n_images": 5, "image_size": SIZE, "seed": SEED, **bad}}))
        with pytest.raises(UserError):
            read_section("demo", path=tmp_path / "params.yaml")


def test_generator_does_not_import_tensorflow():
    code = "import sys, captioning.demo; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
