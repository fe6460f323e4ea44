"""Stage train_lstm: features + captions -> trained decoder, DVCLive curves, metrics/train.json."""
import pandas as pd

from captioning import files, layout
from captioning.errors import run_cli
from captioning.params import choice, load_params, positive, section

KEYS = ("seed", "epochs", "batch_size", "units", "l1", "dropout", "optimizer", "learning_rate", "clipnorm",
        "min_count", "max_length")


def main() -> None:
    options = section(load_params(), "train", KEYS)
    choice(options["optimizer"], ("adam", "rmsprop", "sgd"), "train.optimizer")
    for key in ("epochs", "batch_size", "units", "learning_rate", "min_count", "max_length"):
        positive(options[key], f"train.{key}", type(options[key]))
    from captioning.train import TrainConfig, train  # TensorFlow only past the checks above

    config = TrainConfig(**{key: options[key] for key in KEYS})
    inputs = [layout.CAPTIONS_TABLE, *(layout.split_file(n) for n in ("train", "dev")),
              layout.FEATURES_DIR / "features.npy", layout.FEATURES_DIR / "index.parquet"]
    metrics = train(config, pd.read_parquet(layout.CAPTIONS_TABLE), layout.read_split("train"),
                    layout.read_split("dev"), layout.FEATURES_DIR, layout.MODEL_DIR, layout.CHECKPOINT_DIR,
                    layout.LIVE_DIR, inputs)
    files.write_json(layout.TRAIN_METRICS, metrics)


if __name__ == "__main__":
    run_cli(main)
