"""Train/dev/test split by image, never by caption, so no test photo is ever seen in training."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from captioning import files
from captioning.encodings import as_utf8, decode
from captioning.errors import UserError

OFFICIAL_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}


def official_split(split_dir: str | Path, images: list[str]) -> tuple[dict[str, list[str]], dict]:
    """The Flickr8k split files, restricted to `images` (those with captions and a file)."""
    split_dir = Path(split_dir)
    available = set(images)
    splits, report, seen = {}, {"mode": "official", "split_dir": str(split_dir)}, {}
    for name, filename in OFFICIAL_FILES.items():
        path = split_dir / filename
        if not path.is_file():
            raise UserError(f"data.split_dir is {split_dir}, but {path} is missing. Put the three "
                            f"Flickr_8k.*Images.txt files there, or set data.split_dir: null for a seeded split.")
        listed = _listed_images(path)
        for image in listed:
            if image in seen and seen[image] != name:
                raise UserError(f"{image} is listed in both {OFFICIAL_FILES[seen[image]]} and {filename}; "
                                "an image may be in one split only.")
            seen[image] = name
        splits[name] = sorted(set(listed) & available)
        report[name] = {"listed": len(listed), "available": len(splits[name])}
        # DVC cannot list these files (data.split_dir may be null): readers of data/split compare them with this
        report.setdefault("sources", {})[str(path)] = files.sha256(path)
    unlisted = sorted(available - seen.keys())
    report["images_in_no_split"] = {"count": len(unlisted), "images": unlisted}
    return splits, report


def _listed_images(path: Path) -> list[str]:
    """The image names of a split file, one per line, however it was saved (UTF-8 with or without a
    byte-order mark, UTF-16, cp1252; LF, CRLF or CR line ends)."""
    lines = (decode(line)[0].strip() for line in as_utf8(path.read_bytes()).splitlines())
    return [line for line in lines if line]


def seeded_split(images: list[str], seed: int, train_fraction: float, dev_fraction: float) -> tuple[dict, dict]:
    """Shuffle the images with `seed` and cut them by the fractions (checked in params.SplitParams)."""
    order = np.random.default_rng(seed).permutation(sorted(images))
    n_train = int(round(len(order) * train_fraction))
    n_dev = int(round(len(order) * dev_fraction))
    splits = {"train": sorted(order[:n_train]), "dev": sorted(order[n_train:n_train + n_dev]),
              "test": sorted(order[n_train + n_dev:])}
    splits = {name: [str(image) for image in names] for name, names in splits.items()}
    report = {"mode": "seeded", "seed": seed, **{name: {"available": len(v)} for name, v in splits.items()}}
    return splits, report


def summary(splits: dict[str, list[str]], report: dict, report_path: str | Path) -> str:
    """The stage's one line: images per split and, for the official files, how many each lists and how
    many captioned images none lists (those are used nowhere, so the line says so, not only the report)."""
    if report["mode"] != "official":
        return ", ".join(f"{name} {len(images)} images" for name, images in splits.items())
    line = ", ".join(f"{name} {len(images)} of {report[name]['listed']} listed images"
                     for name, images in splits.items())
    unlisted = report["images_in_no_split"]["count"]
    if unlisted:
        line += (f"; {unlisted} captioned image{'s' if unlisted != 1 else ''} in no split file, not used "
                 f"(named in {report_path})")
    return line


def require_trainable(splits: dict[str, list[str]], official: bool) -> None:
    """Stop at the split, not after a long extraction: training needs train photos, and dev photos, whose loss
    picks the epoch kept (and stops early). An empty test split only stops evaluate, so it is a warning."""
    empty = [name for name in ("train", "dev") if not splits[name]]
    if not empty:
        return
    remedy = ("the official lists in data.split_dir name none of your photos for it: add its photos, or set "
              "data.split_dir: null for a seeded split" if official else
              "raise split.train_fraction / split.dev_fraction, or add photos")
    raise UserError(f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty, and training "
                    f"needs both train and dev photos: {remedy}.")
