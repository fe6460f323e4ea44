"""Command line: `python -m captioning caption IMG ...`, `python -m captioning demo`,
`python -m captioning plots-template`, and `extract-shard` / `merge-features` (feature extraction
split across machines, see captioning/shards.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioning import layout
from captioning.errors import UserError, one_line, run_cli
from captioning.params import PARAMS_FILE, read_params

BUNDLE_FILES = ("model.keras", "vocab.json", "backbone.json")
DEFAULT_DECODE = {"method": "beam", "beam_size": 3, "length_penalty": 0.0, "rerank": "consensus",
                  "max_length": 20}  # as params.yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captioning", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser(
        "caption", help="caption new images with the trained model",
        description="Caption images with the trained model; prints 'path<TAB>caption' per image. "
                    "Unreadable images get a one-line error on stderr and exit status 2; "
                    "the others are still captioned.")
    caption.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    caption.add_argument("--model-dir", type=Path, default=layout.MODEL_DIR,
                         help="trained model bundle (default: %(default)s)")
    caption.add_argument("--beam", type=int, default=None,
                         help="beam width; 1 = greedy (default: decode.* in params.yaml)")
    caption.add_argument("--out", type=Path, default=None,
                         help="write the image with its caption under it to this PNG "
                              "(with several images: FILE-<n>.png)")
    demo = commands.add_parser(
        "demo", help="generate the offline demo dataset from params.yaml's demo section",
        description="Generate the deterministic demo dataset (shape scenes with 5 captions each).")
    demo.add_argument("--params", type=Path, default=Path("params.yaml"))
    template = commands.add_parser(
        "plots-template", help="write the offline HTML template for `dvc plots show`",
        description="Write an HTML template for `dvc plots show` with Vega, Vega-Lite and Vega-Embed inline, "
                    "so the charts draw without a network. Point DVC at it with "
                    "`dvc config --local plots.html_template plots/offline.html` (scripts/setup.sh does both).")
    template.add_argument("--out", type=Path, default=None,
                          help="where to write it (default: .dvc/plots/offline.html)")
    shard = commands.add_parser(
        "extract-shard", help="extract the features of one shard of the images (one machine's part)",
        description="Extract ResNet-50 features for shard INDEX of COUNT (every COUNT-th image of data/images.txt) "
                    "with the features.* settings of params.yaml, into OUT. Merge all shards with merge-features.")
    shard.add_argument("--index", type=int, required=True, help="this shard, 0 to COUNT-1")
    shard.add_argument("--count", type=int, required=True, help="number of shards")
    shard.add_argument("--out", type=Path, required=True, help="folder for this shard's files")
    merge = commands.add_parser(
        "merge-features", help="join shard folders into the features folder one extraction writes",
        description="Join the folders of shards 0..COUNT-1 into exactly the files one extract_resnet_features run "
                    "writes. Then `dvc commit extract_resnet_features` records them as that stage's output.")
    merge.add_argument("shards", nargs="+", type=Path, help="every shard folder, once each, in any order")
    merge.add_argument("--out", type=Path, default=layout.FEATURES_DIR,
                       help="the features folder to write (default: %(default)s)")
    return parser


def _decode_settings(beam: int | None) -> dict:
    """decode.* from params.yaml (checked like the evaluate stage's), or the defaults outside a project."""
    settings = dict(DEFAULT_DECODE)
    if PARAMS_FILE.exists():
        settings = read_params(*(f"decode.{key}" for key in DEFAULT_DECODE))["decode"]
    if beam is not None:
        if beam < 1:
            raise UserError(f"--beam must be at least 1, got {beam}")
        settings.update(method="greedy" if beam == 1 else "beam", beam_size=beam)
    return settings


def caption_command(args) -> int:
    if not (args.model_dir / "model.keras").exists():
        raise UserError(f"no trained model in {args.model_dir}: run `dvc repro` first (or pass --model-dir).")
    missing = [name for name in BUNDLE_FILES if not (args.model_dir / name).exists()]
    if missing:
        raise UserError(f"the model in {args.model_dir} is incomplete (no {', '.join(missing)}): "
                        "rerun `dvc repro` (or pass --model-dir).")
    settings = _decode_settings(args.beam)
    from captioning.serve import caption_files  # TensorFlow only past the checks above

    results, errors = caption_files(args.images, args.model_dir, settings, args.out)
    for path, caption in results:
        print(f"{path}\t{caption}")
    for path, reason in errors:
        print(f"error: {path}: {one_line(reason)}", file=sys.stderr)
    return 2 if errors else 0


def demo_command(args) -> int:
    from captioning.demo import generate_demo

    options = read_params("demo", path=args.params)["demo"]  # checked like every stage's params
    summary = generate_demo(Path(options["out_dir"]), n_images=options["n_images"],
                            image_size=options["image_size"], seed=options["seed"])
    state = "up to date" if summary["skipped"] else "written"
    print(f"demo {state}: {summary['n_images']} images, {summary['n_captions']} captions, "
          f"{summary['vocab_size']} words -> {options['out_dir']}")
    return 0


def plots_template_command(args) -> int:
    from captioning.offline_plots import TEMPLATE_PATH, write_template

    out = args.out or TEMPLATE_PATH
    changed = write_template(out)
    print(f"{'wrote' if changed else 'up to date:'} {out}")
    return 0


def extract_shard_command(args) -> int:
    params = read_params("data.images", "features")
    options = params["features"]
    layout.require(layout.IMAGE_LIST)
    from captioning.shards import extract_shard, shard_images

    images = layout.IMAGE_LIST.read_text(encoding="utf-8").split()
    shard_images(images, args.index, args.count)  # a bad --index/--count fails before TensorFlow loads
    from captioning.features import make_spec

    spec = make_spec(options["weights"], options["seed"], options["image_size"], options["precision"])
    report = extract_shard(images, params["data"]["images"], args.out, spec, options["batch_size"],
                           args.index, args.count)
    print(f"shard {args.index} of {args.count}: {report['images_extracted']} images -> {args.out} "
          f"({report['images_per_second']} images/s); {report['failed_count']} failed")
    return 0


def merge_features_command(args) -> int:
    from captioning.shards import merge_shards

    layout.require(layout.IMAGE_LIST)
    settings = ("weights", "seed", "image_size", "precision")  # what decides a feature (BackboneSpec)
    expected = read_params(*(f"features.{key}" for key in settings))["features"] if PARAMS_FILE.exists() else None
    report = merge_shards(args.shards, layout.IMAGE_LIST.read_text(encoding="utf-8").split(), args.out, expected)
    print(f"{len(args.shards)} shards -> {args.out}: {report['images_extracted']} images, "
          f"{report['failed_count']} failed")
    return 0


def main() -> None:
    args = _parser().parse_args()
    commands = {"caption": caption_command, "demo": demo_command, "plots-template": plots_template_command,
                "extract-shard": extract_shard_command, "merge-features": merge_features_command}
    status = commands[args.command](args)
    sys.exit(status)


def cli() -> None:
    """The `captioning` console script (pyproject.toml): the same commands, output and one-line errors
    with exit status 2 as `python -m captioning`."""
    run_cli(main)


if __name__ == "__main__":
    cli()
