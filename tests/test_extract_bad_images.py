"""Extraction over a folder mixing good and bad images: bad ones are reported, never crash the run or
shift rows; and an image's feature does not depend on which images share its batch.

image_size 32 (the smallest ResNet-50 accepts) keeps the random-weight backbone fast on 2 cores."""
from __future__ import annotations

import re
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from captioning import features, files
from captioning.backbones import build_backbone, make_spec
from captioning.errors import UserError
from captioning.feature_files import FEATURE_FILES, FeatureStore
from captioning.features import compute_features, extract_features
from captioning.tiny_project import PROJECT, make_project, run

SIZE = 32
SPEC = make_spec("random", 0, SIZE, "float32")
# compute_features gives a lone image a twin, because oneDNN picks other kernels for a batch of one;
# batches of 2+ agree bit for bit. So an image's feature is exactly the same in any batch: that is what
# lets the caption command reproduce evaluate's captions. A leak between images would differ by O(0.1).


def write_good(folder, name: str, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / name, quality=90)


def write_bad(folder) -> dict[str, str]:
    """name -> a word the report's reason must contain."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo\n")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "whole.jpg")
    (folder / "cut.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:150])
    (folder / "whole.jpg").unlink()
    return {"empty.jpg": "empty", "notes.jpg": "not an image", "cut.jpg": "cannot decode", "gone.jpg": "not found"}


GOOD = ["a.jpg", "b.jpg", "c.jpg"]
HEIC_PHOTO = PROJECT / "tests/fixtures/heic/upright.heic"  # an iPhone's, see make_fixtures.py there


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(SPEC)


def features_of(backbone, paths, batch_size: int) -> tuple[np.ndarray, dict]:
    out = np.zeros((len(paths), 2048), np.float32)
    errors = compute_features(backbone, [str(p) for p in paths], SIZE, batch_size, out, progress=False)
    return out, errors


@pytest.fixture(scope="module")
def good_images(tmp_path_factory, backbone) -> tuple:
    """The good images' folder and their features, each image computed in a batch of its own."""
    folder = tmp_path_factory.mktemp("good")
    for seed, name in enumerate(GOOD):
        write_good(folder, name, seed)
    alone, errors = features_of(backbone, [folder / name for name in GOOD], batch_size=1)
    assert not errors
    return folder, alone


def test_mixed_folder(tmp_path, good_images):
    folder, alone = good_images
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for name in GOOD:
        shutil.copy(folder / name, images_dir / name)
    bad = write_bad(images_dir)
    # Bad images first, last and in between; batches of 3 mix good and bad, and the last one is short.
    requested = ["empty.jpg", "a.jpg", "notes.jpg", "b.jpg", "cut.jpg", "gone.jpg", "c.jpg"]

    report = extract_features(requested, images_dir, tmp_path / "out", SPEC, batch_size=3)

    matrix = np.load(tmp_path / "out" / "features.npy")
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert matrix.shape == (3, 2048) and matrix.dtype == np.float32
    assert list(index["image"]) == GOOD and list(index["row"]) == [0, 1, 2]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(FEATURE_FILES)
    assert (report["images_requested"], report["images_extracted"], report["failed_count"]) == (7, 3, 4)
    listed = [entry["image"] for entry in report["failed"]]
    assert sorted(listed) == sorted(bad) and len(set(listed)) == len(listed)
    for entry in report["failed"]:
        assert bad[entry["image"]] in entry["reason"], entry
    # Each good row is that image's feature, as computed alone by a backbone built from the same spec.
    np.testing.assert_array_equal(matrix, alone)
    assert not np.allclose(matrix[0], matrix[1])  # rows really differ: not all zeros or a constant
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_a_run_killed_half_way_leaves_no_mix_of_two_runs(tmp_path, good_images, backbone, monkeypatch):
    """A second extraction killed while writing its files: FeatureStore refuses the folder instead of
    pairing the new index with the old features (or the old backbone)."""
    folder, _ = good_images
    monkeypatch.setattr(features, "build_backbone", lambda spec: backbone)
    extract_features(GOOD, folder, tmp_path / "out", SPEC, batch_size=2)
    assert len(FeatureStore(tmp_path / "out").row_of) == 3

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(features.files, "write_json", killed)  # dies writing backbone.json
    with pytest.raises(KeyboardInterrupt):
        extract_features(GOOD[:2], folder, tmp_path / "out", SPEC, batch_size=2)
    monkeypatch.undo()
    with pytest.raises(UserError, match="lacks features.npy, backbone.json: feature extraction did not finish"):
        FeatureStore(tmp_path / "out")


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def one_row_more_in_the_index(folder):
    files.write_parquet(folder / "index.parquet", pd.DataFrame({"image": [*GOOD, "extra.jpg"], "row": range(4)}))


@pytest.mark.parametrize("damage, named", [
    (lambda folder: cut_in_half(folder / "features.npy"), "features.npy"),
    (lambda folder: cut_in_half(folder / "index.parquet"), "index.parquet"),
    (lambda folder: cut_in_half(folder / "backbone.json"), "backbone.json"),
    (lambda folder: (folder / "backbone.json").write_text("[]"), "backbone.json"),
    (one_row_more_in_the_index, "features.npy"),
], ids=["features-cut", "index-cut", "backbone-cut", "backbone-not-a-spec", "index-longer-than-features"])
def test_a_damaged_feature_folder_is_one_line_naming_the_file(tmp_path, good_images, backbone, monkeypatch,
                                                              damage, named):
    """A folder copied in part (an interrupted copy, a full disk) has all three files but not all their bytes:
    training and evaluation stopped with a NumPy, Arrow or JSON traceback, or read rows that do not exist."""
    folder, _ = good_images
    monkeypatch.setattr(features, "build_backbone", lambda spec: backbone)
    extract_features(GOOD, folder, tmp_path / "out", SPEC, batch_size=2)
    damage(tmp_path / "out")
    damaged = re.escape(str(tmp_path / "out" / named))
    with pytest.raises(UserError, match=rf"{damaged} is damaged .*dvc repro -f extract_resnet_features"):
        FeatureStore(tmp_path / "out")


def nan_rows(bad_rows):
    """An engine (extract_features' compute_rows) whose backbone gives NaN for the images at `bad_rows`,
    as a damaged weights file does; the other rows are finite."""
    def compute_rows(paths, out):
        out[:] = 1.0
        out[bad_rows, 5] = np.nan
        return {}
    return compute_rows


def test_nan_features_are_refused_at_extraction_naming_the_images(tmp_path):
    names = [f"{i:02d}.jpg" for i in range(14)]
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"^12 of 14 images got NaN or inf features from the resnet50 backbone "
                                        r"\(02.jpg, 03.jpg, .*, 11.jpg, \.\.\.\): its weights \(random\) are "
                                        r"likely damaged") as raised:
        extract_features(names, tmp_path / "images", tmp_path / "out", SPEC, 2, compute_rows=nan_rows(slice(2, None)))
    assert "\n" not in str(raised.value) and "features.weights" in str(raised.value)
    assert not list((tmp_path / "out").iterdir())  # nothing a later stage could read


def test_a_feature_folder_with_nan_rows_is_refused_by_its_readers(tmp_path):
    """A folder from before the extraction check (or edited since): training and evaluation refuse it."""
    (tmp_path / "images").mkdir()
    extract_features(GOOD, tmp_path / "images", tmp_path / "out", SPEC, 2, compute_rows=nan_rows([]))
    assert len(FeatureStore(tmp_path / "out").row_of) == 3
    matrix = np.load(tmp_path / "out/features.npy", mmap_mode="r+")
    matrix[1, 7] = np.inf
    matrix.flush()
    del matrix
    with pytest.raises(UserError, match=r"features.npy holds NaN or inf features for 1 images \(b.jpg\)"):
        FeatureStore(tmp_path / "out")


def test_all_bad_is_a_user_error(tmp_path, backbone, monkeypatch):
    monkeypatch.setattr(features, "build_backbone", lambda spec: backbone)  # same spec; saves a rebuild
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    bad = write_bad(images_dir)
    with pytest.raises(UserError, match=r"none of the 4 images .* could be decoded; first error: \S+: "):
        extract_features(sorted(bad), images_dir, tmp_path / "out", SPEC, batch_size=2)
    assert not (tmp_path / "out" / "features.npy").exists()


def test_missing_images_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="images folder not found"):
        extract_features(["a.jpg"], tmp_path / "nowhere", tmp_path / "out", SPEC, batch_size=2)


def test_feature_independent_of_batch_and_order(good_images, backbone):
    """The same image gives the same feature alone, in a full batch in reverse order, and beside a bad
    image in its batch (whose zero placeholder must not leak into its neighbours)."""
    folder, alone = good_images
    paths = [folder / name for name in GOOD]
    together, _ = features_of(backbone, paths[::-1], batch_size=3)
    with_bad, errors = features_of(backbone, [paths[2], folder / "missing.jpg", paths[0]], batch_size=3)
    assert list(errors) == [1]
    np.testing.assert_array_equal(together[::-1], alone)
    np.testing.assert_array_equal(with_bad[[0, 2]], alone[[2, 0]])


def test_the_stage_reads_image_names_with_spaces_whole(tmp_path):
    """images.txt has one name a line; a TAB-separated token file allows names with spaces."""
    project = make_project(tmp_path / "project", demo=False,
                           params={"data": {"images": "photos"}, "features": {"image_size": 32}})
    (project / "photos").mkdir()
    write_good(project / "photos", "my photo.jpg", 1)
    write_good(project / "photos", "b.jpg", 2)
    (project / "data").mkdir(exist_ok=True)
    (project / "data/images.txt").write_text("b.jpg\nmy photo.jpg\n")
    run([sys.executable, "-m", "stages.extract_resnet_features"], project)
    report = files.read_json(project / "data/reports/extract_report.json")
    assert (report["images_requested"], report["images_extracted"], report["failed"]) == (2, 2, [])
    assert sorted(pd.read_parquet(project / "data/features/index.parquet")["image"]) == ["b.jpg", "my photo.jpg"]


def test_the_stage_extracts_an_iphone_heic_photo(tmp_path):
    """An HEIC photo in the images folder was listed as failed ("convert it to JPEG"): it is extracted now."""
    project = make_project(tmp_path / "project", demo=False,
                           params={"data": {"images": "photos"}, "features": {"image_size": SIZE}})
    (project / "photos").mkdir()
    write_good(project / "photos", "b.jpg", 2)
    shutil.copy(HEIC_PHOTO, project / "photos" / "IMG_0001.HEIC")
    (project / "data").mkdir(exist_ok=True)
    (project / "data/images.txt").write_text("IMG_0001.HEIC\nb.jpg\n")
    run([sys.executable, "-m", "stages.extract_resnet_features"], project)
    report = files.read_json(project / "data/reports/extract_report.json")
    assert (report["images_requested"], report["images_extracted"], report["failed"]) == (2, 2, [])
    store = FeatureStore(project / "data/features")
    assert np.abs(store.get(["IMG_0001.HEIC"])).sum() > 0  # a real feature row, not a failed image's zeros
