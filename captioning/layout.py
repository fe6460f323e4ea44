"""Where the pipeline's outputs live; dvc.yaml names the same paths."""
from pathlib import Path

CAPTIONS_TABLE = Path("data/captions.parquet")
PARSE_REPORT = Path("data/reports/parse_report.json")
IMAGE_LIST = Path("data/images.txt")  # captioned images that have a file: what extraction reads
SPLIT_DIR = Path("data/split")
SPLIT_REPORT = Path("data/reports/split_report.json")
FEATURES_DIR = Path("data/features")
MODEL_DIR = Path("data/model")
CHECKPOINT_DIR = Path("checkpoints")
LIVE_DIR = Path("dvclive")
TRAIN_METRICS = Path("metrics/train.json")
PREDICTIONS = Path("data/predictions.parquet")
EVAL_METRICS = Path("metrics/eval.json")
PLOTS_DIR = Path("plots")
SPLITS = ("train", "dev", "test")


def split_file(name: str) -> Path:
    return SPLIT_DIR / f"{name}.txt"


def read_split(name: str) -> list[str]:
    return [line for line in split_file(name).read_text(encoding="utf-8").splitlines() if line]
