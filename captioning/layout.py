"""Where the pipeline's outputs live; dvc.yaml names the same paths."""
from pathlib import Path

from captioning.errors import UserError
from captioning.files import read_json, read_lines, sha256

CAPTIONS_TABLE = Path("data/captions.parquet")
PARSE_REPORT = Path("data/reports/parse_report.json")
IMAGE_LIST = Path("data/images.txt")  # captioned images that have a file: what extraction reads
SPLIT_DIR = Path("data/split")
SPLIT_REPORT = Path("data/reports/split_report.json")
FEATURES_DIR = Path("data/features")
# Beside, not inside, the features folder: its timings differ every run, and inside they would change the
# folder's hash, so DVC would retrain after any re-extraction (another engine, `-f`) with identical features.
EXTRACT_REPORT = Path("data/reports/extract_report.json")
MODEL_DIR = Path("data/model")
# Outside the project: where backbone weights converted once are kept (default ~/.cache/captioning), for
# every project and process of the user (efficientnet_lite.cache_dir)
CACHE_ENV = "CAPTIONING_CACHE"
CHECKPOINT_DIR = Path("checkpoints")
LIVE_DIR = Path("dvclive")
TRAIN_METRICS = Path("metrics/train.json")
PREDICTIONS = Path("data/predictions.parquet")
EVAL_METRICS = Path("metrics/eval.json")
DECODE_SETTINGS = Path("data/decode.json")  # evaluate's decode settings, which the caption command and server use
PLOTS_DIR = Path("plots")
SPLITS = ("train", "dev", "test")

# The files of a feature folder (FEATURES_DIR, or any folder extraction wrote) and of a model folder
# (MODEL_DIR, or a --model-dir): extraction and training write them; the stages, the caption command, the
# server and the benchmarks read them. BACKBONE_SPEC is in both: training copies it beside the model, so
# new images get the backbone the training features came from.
FEATURE_MATRIX = "features.npy"
FEATURE_INDEX = "index.parquet"  # image name -> row of FEATURE_MATRIX
BACKBONE_SPEC = "backbone.json"
MODEL_FILE = "model.keras"
VOCAB_FILE = "vocab.json"
NGRAM_STATISTICS = "ngram_df.json"  # consensus.NgramStatistics, which both reranks weigh n-grams by
NEIGHBOUR_INDEX = "neighbours.npz"  # neighbours.NeighbourIndex, which the neighbours rerank compares with


def split_file(name: str) -> Path:
    return SPLIT_DIR / f"{name}.txt"


def read_split(name: str) -> list[str]:
    require_current_split()
    return read_lines(split_file(name))


def require_current_split() -> None:
    """Stop when a file of data.split_dir changed after the split stage read it. dvc.yaml cannot list those
    files (data.split_dir may be null), so after an edit in place DVC reran nothing, and training and
    scoring went on with the old lists. The split report records each file's sha256; a report without
    them (a seeded split, one written before they were recorded, or none in a clone) has nothing to compare,
    and a file that is gone (a clone that pulled the split, on a machine without the files) is no reason
    to stop, as for the backbone weights file (feature_files.FeatureStore)."""
    sources = read_json(SPLIT_REPORT).get("sources", {}) if SPLIT_REPORT.is_file() else {}
    changed = [path for path, digest in sources.items() if Path(path).is_file() and sha256(path) != digest]
    if changed:
        raise UserError(f"{', '.join(changed)} changed since the split stage read it, so {SPLIT_DIR} is out of "
                        "date (DVC does not track the files in data.split_dir): run `dvc repro -f -s split`, "
                        "then `dvc repro`.")


def read_image_list() -> list[str]:
    """IMAGE_LIST's names, one a line (names may hold spaces: a TAB-separated token file allows them)."""
    return read_lines(IMAGE_LIST)


# The stage that writes each output a later stage reads: named when a stage is run before its inputs exist.
WRITTEN_BY = {CAPTIONS_TABLE: "parse_pickle", IMAGE_LIST: "parse_pickle", SPLIT_DIR: "split",
              FEATURES_DIR: "extract_resnet_features", MODEL_DIR: "train_lstm", LIVE_DIR: "train_lstm",
              PREDICTIONS: "evaluate", DECODE_SETTINGS: "evaluate"}


def require(*paths: Path) -> None:
    """Stop with one clear line, not a traceback, when an earlier stage's output is missing."""
    for path in map(Path, paths):
        if not path.exists():
            stage = next((name for out, name in WRITTEN_BY.items() if path == out or out in path.parents), None)
            origin = f"the {stage} stage writes it" if stage else "an earlier stage writes it"
            raise UserError(f"{path} not found: {origin}. Run `dvc repro` in the project folder, which runs "
                            "the stages in order.")
