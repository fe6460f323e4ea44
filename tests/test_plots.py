"""The `plot` stage's figures on small and unusual inputs (the stage runs on synthetic outputs, no repro)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from captioning import layout, plots


def write_stage_inputs(root, n_test: int) -> None:
    """What the plot stage reads: params, captions table, predictions, DVCLive curves and the images."""
    images = root / "images"
    images.mkdir()
    names = [f"img{i:02d}.png" for i in range(n_test)]
    for i, name in enumerate(names):
        Image.new("RGB", (32, 24), (i * 9 % 256, 80, 160)).save(images / name)
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"images": str(images)}, "plot": {"n_samples": 2, "grid_size": 4}}))
    (root / "data").mkdir()
    pd.DataFrame({"image": names, "raw_caption": [f"a caption of {n}" for n in names]}).to_parquet(
        root / layout.CAPTIONS_TABLE)
    pd.DataFrame({"image": names, "generated": ["a thing"] * n_test,
                  "references": [["a ref", "another ref"]] * n_test,
                  "cider": np.linspace(0.1, 2.0, n_test)}).to_parquet(root / layout.PREDICTIONS)
    for split in ("train", "val"):
        for metric in ("loss", "accuracy"):
            folder = root / layout.LIVE_DIR / "plots" / "metrics" / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{metric}.tsv").write_text(f"timestamp\tstep\t{metric}\n0\t0\t0.5\n1\t1\t0.4\n")


@pytest.mark.parametrize("n_test", [1, 5, 6, 7, 11, 12, 20])
def test_best_worst_never_shows_an_image_twice_and_says_what_it_shows(tmp_path, monkeypatch, n_test):
    """A test split under 12 images used to fill both rows with the same images (the tiny project's 6
    test images were all "6 best" and all "6 worst") under a title promising 6 of each."""
    from stages import plot as stage

    write_stage_inputs(tmp_path, n_test)
    monkeypatch.chdir(tmp_path)
    grids = {}

    def record(items, path, columns=3, title=""):
        grids[path.name] = (items, columns, title)

    monkeypatch.setattr(plots, "image_grid", record)  # wherever the stage builds its grids from
    monkeypatch.setattr(stage, "image_grid", record, raising=False)
    stage.main()

    items, columns, title = grids["best_worst.png"]
    names = [path.name for path, _ in items]
    assert len(names) == len(set(names)), f"an image is shown twice: {names}"
    ciders = pd.read_parquet(layout.PREDICTIONS).set_index("image")["cider"]
    best, worst = names[:columns], names[columns:]
    assert best and len(best) <= 6 and len(worst) <= 6 and len(worst) <= len(best)
    assert min(ciders[best]) >= max(ciders[worst], default=-1.0), "a worst image scored above a best one"
    assert title.startswith(f"{len(best)} best (top) and {len(worst)} worst (bottom)"), title
    if n_test >= 12:  # a big enough split: six of each, as before
        assert (len(best), len(worst)) == (6, 6)
    else:  # every image shown (at most one odd image goes to the best row)
        assert len(best) + len(worst) == n_test and len(best) - len(worst) in (0, 1)
