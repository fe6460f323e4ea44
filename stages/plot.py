"""Stage plot: dataset samples, learning curves, test predictions, and the best/worst test images."""
from pathlib import Path

import pandas as pd

from captioning import layout
from captioning.errors import run_stage
from captioning.params import read_params
from captioning.plots import best_worst_grid, image_grid, learning_curves, read_live_history, with_references


def main() -> None:
    params = read_params("data.images", "plot")
    images_dir = Path(params["data"]["images"])
    n_samples, grid = params["plot"]["n_samples"], params["plot"]["grid_size"]
    layout.require(layout.CAPTIONS_TABLE, layout.PREDICTIONS, layout.LIVE_DIR)

    captions = pd.read_parquet(layout.CAPTIONS_TABLE)
    samples = [(images_dir / image, "\n".join(group["raw_caption"]))
               for image, group in list(captions.groupby("image", sort=True))[:n_samples]]
    image_grid(samples, layout.PLOTS_DIR / "samples.png", columns=min(n_samples, 2), title="Dataset samples")

    learning_curves(read_live_history(layout.LIVE_DIR), layout.PLOTS_DIR / "learning_curves.png")

    predictions = pd.read_parquet(layout.PREDICTIONS)
    shown = [(images_dir / row.image, with_references(row.generated, list(row.references)))
             for row in predictions.head(grid).itertuples()]
    image_grid(shown, layout.PLOTS_DIR / "predictions.png", title="Test images: model vs references")

    best_worst_grid(predictions, images_dir, layout.PLOTS_DIR / "best_worst.png")
    print(f"plots written to {layout.PLOTS_DIR}/")


if __name__ == "__main__":
    run_stage(main, __doc__)
