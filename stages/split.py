"""Stage split: captioned images -> train/dev/test image lists (by image, never by caption)."""
import pandas as pd

from captioning import files, layout
from captioning.errors import run_stage
from captioning.params import read_params, read_section
from captioning.split import official_split, require_trainable, seeded_split, summary


def main() -> None:
    split_dir = read_params("data.split_dir")["data"]["split_dir"]
    options = read_section("split")
    layout.require(layout.CAPTIONS_TABLE)
    images = sorted(pd.read_parquet(layout.CAPTIONS_TABLE, columns=["image"])["image"].unique())
    if split_dir:
        splits, report = official_split(split_dir, images)
    else:
        splits, report = seeded_split(images, options.seed, options.train_fraction, options.dev_fraction)
    require_trainable(splits, official=bool(split_dir))
    for name in layout.SPLITS:
        files.write_lines(layout.split_file(name), splits[name])
    files.write_json(layout.SPLIT_REPORT, report)
    print(summary(splits, report, layout.SPLIT_REPORT))
    if not splits["test"]:
        print("warning: the test split is empty; evaluate will stop with an explanation")


if __name__ == "__main__":
    run_stage(main, __doc__)
