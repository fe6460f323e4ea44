"""The parser on the real Flickr8k files in $FLICKR8K_DIR (facts from shared/flickr8k/SOURCES.md).

Skipped when FLICKR8K_DIR is unset; a failure when it is set but a file is missing (conftest.flickr8k).
Every pickle is written to a temporary folder, never next to the data.
"""
from __future__ import annotations

import pickle
from collections import defaultdict

import pandas as pd
import pytest

from captioning.captions import load_captions

LINES = 40460                     # Flickr8k.token.txt: 8092 names x 5 captions
IMAGE_NAMES = 8092
PHOTOS = 809                      # JPEGs in Images/, each with its 5 captions
KEPT = PHOTOS * 5
BOGUS = "2258277193_586949ec62.jpg.1"  # a name in the token files that no JPEG has
BOGUS_LINES = range(6731, 6736)   # its 5 lines in Flickr8k.token.txt
KAGGLE_ROWS = LINES - 5           # captions.txt is the token file without the bogus name
NO_REPAIRS = {"literal_backslash_t": 0, "bare_t": 0, "spaces": 0, "missing": 0}


@pytest.fixture(scope="module")
def data(flickr8k):
    lemma = flickr8k / "Flickr8k.lemma.token.txt"
    if not lemma.exists():
        pytest.fail(f"FLICKR8K_DIR={flickr8k} is set but lacks {lemma.name}")
    return flickr8k


@pytest.fixture(scope="module")
def images(data):
    return data / "Images"


@pytest.fixture(scope="module")
def token_lines(data) -> list[str]:
    return (data / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def token_parse(data, images):
    return load_captions(data / "Flickr8k.token.txt", images)


def key_rows(table: pd.DataFrame) -> list[tuple]:
    return list(zip(table["image"], table["caption_number"], table["raw_caption"], table["caption"], strict=True))


def assert_token_counts(report: dict, table: pd.DataFrame, bogus_sources: list[str]) -> None:
    """The counts every full copy of the token file must give, whatever its shape."""
    assert report["lines_read"] == report["rows_parsed"] == LINES
    assert report["skipped_count"] == 0 and report["skipped"] == []
    assert report["image_names"] == IMAGE_NAMES
    assert report["images_found"] == PHOTOS
    assert report["rows_kept"] == len(table) == KEPT
    missing = report["missing_images"]
    assert missing["captions_excluded"] == LINES - KEPT
    assert missing["count"] == IMAGE_NAMES - PHOTOS
    assert missing["images"][BOGUS] == bogus_sources
    assert report["images_without_captions"] == {"count": 0, "images": []}
    assert table.groupby("image")["caption_number"].apply(list).map([0, 1, 2, 3, 4].__eq__).all()


def test_token_file(data, token_parse):
    table, report = token_parse
    assert report["format"] == "token_txt"
    assert report["separator_repairs"] == NO_REPAIRS
    assert_token_counts(report, table, [f"line {n}" for n in BOGUS_LINES])
    assert table["image"].nunique() == PHOTOS


def test_lemma_file_has_the_same_counts(data, images):
    path = data / "Flickr8k.lemma.token.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    bogus_lines = [f"line {n}" for n, line in enumerate(lines, 1) if line.startswith(BOGUS + "#")]
    assert len(bogus_lines) == 5
    table, report = load_captions(path, images)
    assert_token_counts(report, table, bogus_lines)


def test_kaggle_captions_txt_is_the_token_file_without_the_bogus_name(data, images, token_parse):
    table, report = load_captions(data / "captions.txt", images)
    assert report["format"] == "kaggle_csv"
    assert report["lines_read"] == report["rows_parsed"] == KAGGLE_ROWS
    assert report["skipped_count"] == 0
    assert report["image_names"] == IMAGE_NAMES - 1
    assert report["images_found"] == PHOTOS and report["rows_kept"] == KEPT
    assert report["missing_images"]["captions_excluded"] == KAGGLE_ROWS - KEPT
    assert BOGUS not in report["missing_images"]["images"]
    assert key_rows(table) == key_rows(token_parse[0])


def _by_image(lines: list[str]) -> dict[str, list[str]]:
    captions = defaultdict(dict)
    for line in lines:
        key, caption = line.split("\t")
        image, _, number = key.rpartition("#")
        captions[image][int(number)] = caption
    return {image: [numbered[k] for k in sorted(numbered)] for image, numbered in captions.items()}


def _dataframe(lines: list[str]) -> pd.DataFrame:
    keys, captions = zip(*(line.split("\t") for line in lines), strict=True)
    return pd.DataFrame({"image": [key.rpartition("#")[0] for key in keys], "caption": captions})


SHAPES = {  # name -> (build the pickled object from the token lines, format, sources of the bogus name)
    "str": (lambda lines: "\n".join(lines) + "\n", "pickle:str", [f"line {n}" for n in BOGUS_LINES]),
    "bytes": (lambda lines: ("\n".join(lines) + "\n").encode(), "pickle:bytes", [f"line {n}" for n in BOGUS_LINES]),
    "list of lines": (list, "pickle:list", [f"item {n - 1}" for n in BOGUS_LINES]),
    # a dict has no line numbers: its sources are the key and the position in the caption list
    "dict image -> captions": (_by_image, "pickle:dict", [f"key '{BOGUS}' item {k}" for k in range(5)]),
    "dataframe": (_dataframe, "pickle:dataframe", [f"row {n - 1}" for n in BOGUS_LINES]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_pickles_of_the_token_file_in_every_shape(tmp_path, images, token_lines, token_parse, shape):
    build, fmt, bogus_sources = SHAPES[shape]
    path = tmp_path / "captions.pkl"
    path.write_bytes(pickle.dumps(build(token_lines), protocol=pickle.HIGHEST_PROTOCOL))
    table, report = load_captions(path, images, allow_pandas_pickle=(fmt == "pickle:dataframe"))
    assert report["format"] == fmt
    assert_token_counts(report, table, bogus_sources)
    assert key_rows(table) == key_rows(token_parse[0])


def test_the_dataframe_pickle_is_refused_without_the_opt_in(tmp_path, images, token_lines):
    from captioning.errors import UserError

    path = tmp_path / "captions.pkl"
    path.write_bytes(pickle.dumps(_dataframe(token_lines)))
    with pytest.raises(UserError, match=r"allow_pandas_pickle: true"):
        load_captions(path, images)


@pytest.mark.parametrize("copy", ["tabs turned to spaces on lines 1, 6, 12", "CRLF line endings"])
def test_damaged_copies_seen_in_the_wild_give_the_same_table(tmp_path, images, token_lines, token_parse, copy):
    """SOURCES.md: one public copy lost 3 TABs to spaces; another had CRLF endings."""
    lines = list(token_lines)
    if copy.startswith("tabs"):
        for n in (1, 6, 12):
            lines[n - 1] = lines[n - 1].replace("\t", " ")
        body, repairs = "\n".join(lines) + "\n", {**NO_REPAIRS, "spaces": 3}
    else:
        body, repairs = "\r\n".join(lines) + "\r\n", NO_REPAIRS
    path = tmp_path / "Flickr8k.token.txt"
    path.write_bytes(body.encode())
    table, report = load_captions(path, images)
    assert report["separator_repairs"] == repairs
    assert_token_counts(report, table, [f"line {n}" for n in BOGUS_LINES])
    assert key_rows(table) == key_rows(token_parse[0])
