"""Feature extraction split across machines: shard i of n takes every n-th image, and merging the
shard folders gives exactly the folder one run writes (the same features.npy bytes, index.parquet and
backbone.json; report.json adds per-shard timings).

Exact equality holds because an image's feature does not depend on the other images in its batch
(features.compute_features). Every n-th image, not contiguous ranges, so each shard gets the same mix
of image sizes and bad files whatever order the image list has.

    python -m captioning extract-shard --index 0 --count 2 --out shards/0    # on machine 0
    python -m captioning extract-shard --index 1 --count 2 --out shards/1    # on machine 1
    python -m captioning merge-features shards/0 shards/1 --out data/features

No TensorFlow at import: merging needs only NumPy, and extraction imports it when it runs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from captioning import files
from captioning.errors import UserError

SHARD_FILE = "shard.json"  # only in a shard folder: which part of which image list it holds
FEATURE_FILES = ("features.npy", "index.parquet", "backbone.json", "report.json")


def list_digest(images: list[str]) -> str:
    return hashlib.sha256("\n".join(images).encode("utf-8")).hexdigest()


def shard_images(images: list[str], index: int, count: int) -> list[str]:
    """Shard `index` of `count`: images index, index + count, index + 2 count, ..."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"the shard count must be a whole number >= 1, got {count!r}.")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise UserError(f"the shard index must be 0 to {count - 1} for {count} shards, got {index!r}.")
    if count > len(images):
        raise UserError(f"{count} shards for {len(images)} images would leave some shards empty; use at most "
                        f"{len(images)}.")
    return images[index::count]


def extract_shard(images: list[str], images_dir: Path, out_dir: Path, spec, batch_size: int,
                  index: int, count: int) -> dict:
    """Extract shard `index` of `count` of `images` (the full list, as in data/images.txt) into `out_dir`."""
    from captioning.features import extract_features  # TensorFlow only when extracting

    part = shard_images(images, index, count)
    out_dir = Path(out_dir)
    (out_dir / SHARD_FILE).unlink(missing_ok=True)  # a folder holds a finished shard only once this is written
    report = extract_features(part, images_dir, out_dir, spec, batch_size, allow_all_failed=True)
    files.write_json(out_dir / SHARD_FILE, {"index": index, "count": count, "images": len(part),
                                            "images_total": len(images), "images_sha256": list_digest(images)})
    return report


def merge_shards(shard_dirs: list[Path], images: list[str], out_dir: Path, expected: dict | None = None,
                 chunk: int = 4096) -> dict:
    """Join the shard folders of `images` into `out_dir`, exactly as one extraction of `images` writes it.

    `expected`: backbone settings the shards must have been extracted with (params.yaml's features.*),
    so the merged folder never claims settings it was not made with.
    """
    shards = _read_shards([Path(d) for d in shard_dirs], images, Path(out_dir))
    made_with = shards[0]["backbone"]
    differ = sorted(key for key, value in (expected or {}).items() if made_with.get(key) != value)
    if differ:
        made = ", ".join(f"features.{k}={made_with.get(k)!r}" for k in differ)
        raise UserError(f"the shards were extracted with {made}"
                        + " but params.yaml has " + ", ".join(f"{expected[k]!r}" for k in differ)
                        + ": extract the shards again with the current params.yaml.")
    count = len(shards)
    # Image p of the full list is image p // count of shard p % count; the rows keep the full list's order.
    rows = [(p % count, shards[p % count]["row_of"].get(name)) for p, name in enumerate(images)]
    kept = [(p, shard, row) for p, (shard, row) in enumerate(rows) if row is not None]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out_dir / "features.npy", suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(kept), shards[0]["dim"]))
        for start in range(0, len(kept), chunk):
            block = kept[start:start + chunk]
            for shard in range(count):
                picked = [(offset, row) for offset, (_, s, row) in enumerate(block) if s == shard]
                if picked:
                    offsets, source = map(list, zip(*picked, strict=True))
                    out[[start + o for o in offsets]] = shards[shard]["matrix"][source]
        out.flush()
        del out
    files.write_parquet(out_dir / "index.parquet",
                        pd.DataFrame({"image": [images[p] for p, _, _ in kept], "row": np.arange(len(kept))}))
    files.write_json(out_dir / "backbone.json", shards[0]["backbone"])
    report = _merged_report(shards, images)
    files.write_json(out_dir / "report.json", report)
    return report


def _read_shards(dirs: list[Path], images: list[str], out_dir: Path) -> list[dict]:
    """Load every shard, refusing a set that is not exactly shards 0..n-1 of this image list."""
    if not dirs:
        raise UserError("no shard folders to merge.")
    shards = {}
    for folder in dirs:
        if folder.resolve() == out_dir.resolve():
            raise UserError(f"--out {out_dir} is one of the shard folders; merge into another folder.")
        missing = [name for name in (SHARD_FILE, *FEATURE_FILES) if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder} is not a finished shard (no {', '.join(missing)}): run "
                            "`python -m captioning extract-shard` for it again.")
        info = files.read_json(folder / SHARD_FILE)
        if info["images_sha256"] != list_digest(images) or info["images_total"] != len(images):
            raise UserError(f"{folder} was extracted from another image list than the {len(images)} images "
                            "given: extract every shard from the same data/images.txt.")
        if info["count"] != len(dirs):
            raise UserError(f"{folder} is shard {info['index']} of {info['count']}, but {len(dirs)} folders were "
                            f"given: pass all {info['count']} shards once each.")
        if info["index"] in shards:
            raise UserError(f"{folder} and {shards[info['index']]['folder']} are both shard {info['index']}.")
        index = pd.read_parquet(folder / "index.parquet")
        report = files.read_json(folder / "report.json")
        expected = set(shard_images(images, info["index"], info["count"]))
        held = set(index["image"]) | {failure["image"] for failure in report["failed"]}
        if held != expected or len(index) + report["failed_count"] != len(expected):
            raise UserError(f"{folder} does not hold the images of shard {info['index']} of {info['count']}: "
                            "extract it again.")
        matrix = np.load(folder / "features.npy", mmap_mode="r")
        shards[info["index"]] = {
            "folder": folder, "info": info, "report": report, "matrix": matrix, "dim": matrix.shape[1],
            "row_of": dict(zip(index["image"], index["row"].astype(int), strict=True)),
            "backbone": files.read_json(folder / "backbone.json"),
        }
    ordered = [shards[i] for i in range(len(dirs))]
    for shard in ordered[1:]:
        if shard["backbone"] != ordered[0]["backbone"]:
            raise UserError(f"{shard['folder']} and {ordered[0]['folder']} used different backbones "
                            f"({shard['backbone']} vs {ordered[0]['backbone']}): extract all shards with the "
                            "same params.yaml.")
    return ordered


def _merged_report(shards: list[dict], images: list[str]) -> dict:
    """The single run's report; `seconds` is the shards' total compute time (so images_per_second is
    per machine, comparable with a single run), and `shards` lists each one's time."""
    count = len(shards)
    position = {name: p for p, name in enumerate(images)}
    failed = sorted((failure for shard in shards for failure in shard["report"]["failed"]),
                    key=lambda failure: position[failure["image"]])
    seconds = sum(shard["report"]["seconds"] for shard in shards)
    return {
        "images_requested": len(images),
        "images_extracted": sum(shard["report"]["images_extracted"] for shard in shards),
        "failed_count": len(failed),
        "failed": failed,
        "backbone": shards[0]["backbone"],
        "seconds": round(seconds, 2),
        "images_per_second": round(len(images) / seconds, 2) if seconds else None,
        "shards": [{"index": i, "count": count, "images": shard["info"]["images"],
                    "seconds": shard["report"]["seconds"], "images_per_second": shard["report"]["images_per_second"]}
                   for i, shard in enumerate(shards)],
    }
