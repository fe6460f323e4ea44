"""Stage evaluate: caption every test image, score it and two baselines with pycocoevalcap."""
import pandas as pd

from captioning import files, layout
from captioning.bundle import save_decode_settings
from captioning.errors import run_stage
from captioning.params import read_section


def main() -> None:
    settings = read_section("decode")
    layout.require(layout.MODEL_DIR / layout.MODEL_FILE, layout.FEATURES_DIR / layout.FEATURE_INDEX,
                   layout.CAPTIONS_TABLE, layout.split_file("train"), layout.split_file("test"))
    from captioning.evaluation import evaluate  # TensorFlow only past the checks above

    metrics, predictions = evaluate(layout.MODEL_DIR, layout.FEATURES_DIR, pd.read_parquet(layout.CAPTIONS_TABLE),
                                    layout.read_split("train"), layout.read_split("test"), settings)
    files.write_parquet(layout.PREDICTIONS, predictions)
    save_decode_settings(layout.DECODE_SETTINGS, layout.MODEL_DIR, settings.as_kwargs())
    files.write_json(layout.EVAL_METRICS, metrics)
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("bleu1", "bleu4", "cider") if metrics[k] is not None)
    print(f"{metrics['test_images']} test images: {summary}; baselines cider: frequent "
          f"{metrics['baseline_frequent']['cider']:.3f}, nearest {metrics['baseline_nearest']['cider']:.3f}")


if __name__ == "__main__":
    run_stage(main, __doc__)
