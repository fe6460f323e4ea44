"""Stage train_lstm: features + captions -> trained decoder, DVCLive curves, metrics/train.json."""
import pandas as pd

from captioning import files, layout
from captioning.errors import run_stage
from captioning.params import read_section


def main() -> None:
    config = read_section("train")
    inputs = [layout.CAPTIONS_TABLE, *(layout.split_file(n) for n in ("train", "dev")),
              layout.FEATURES_DIR / layout.FEATURE_MATRIX, layout.FEATURES_DIR / layout.FEATURE_INDEX]
    layout.require(*inputs)
    from captioning.train import TrainPaths, train  # TensorFlow only past the checks above

    paths = TrainPaths(layout.FEATURES_DIR, layout.MODEL_DIR, layout.CHECKPOINT_DIR, layout.LIVE_DIR, tuple(inputs))
    metrics = train(config, pd.read_parquet(layout.CAPTIONS_TABLE), layout.read_split("train"),
                    layout.read_split("dev"), paths)
    if metrics is not None:  # None on a multi_worker worker that is not the chief: it writes nothing
        files.write_json(layout.TRAIN_METRICS, metrics)


if __name__ == "__main__":
    run_stage(main, __doc__)
