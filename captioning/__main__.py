"""Command line: `python -m captioning caption IMG|URL ...`, `python -m captioning serve`,
`python -m captioning demo` and `python -m captioning plots-template`."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from captioning import layout
from captioning.bundle import check_bundle, decode_settings, with_overrides
from captioning.errors import UserError, one_line, run_cli
from captioning.fetch import FetchLimits
from captioning.params import read_section
from captioning.serve_limits import ServeLimits

# The smallest --max-body-mb and --fetch-max-mb: each must hold at least one small photo (a 640-pixel JPEG is
# 50-100 KB). Below it the server started, loaded its model and then refused every upload with a 413, and
# every URL fetch failed.
MIN_PHOTO_MB = 0.1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captioning", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser(
        "caption", help="caption new images with the trained model",
        description="Caption images with the trained model; prints 'path<TAB>caption' per image. "
                    "Unreadable images get a one-line error on stderr and exit status 2; "
                    "the others are still captioned.")
    caption.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...) or http(s) image URLs")
    caption.add_argument("--model-dir", type=Path, default=layout.MODEL_DIR,
                         help="trained model bundle (default: %(default)s)")
    caption.add_argument("--beam", type=int, default=None,
                         help="beam width; 1 = greedy (default: the settings evaluate used, see --decode-settings)")
    _decode_argument(caption)
    caption.add_argument("--out", type=Path, default=None,
                         help="write the image with its caption under it to this PNG "
                              "(with several images: FILE-<n>.png)")
    _fetch_arguments(caption)
    serve = commands.add_parser(
        "serve", help="serve captions over HTTP: a web page, POST /caption, GET /health",
        description="Start the captioning server (FastAPI on uvicorn). The model is loaded once; requests that "
                    "arrive together share one batched pass. Ctrl-C or SIGTERM stops it.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s; 0 = any free port)")
    serve.add_argument("--model", "--model-dir", dest="model_dir", type=Path, default=layout.MODEL_DIR,
                       help="trained model bundle (default: %(default)s)")
    _decode_argument(serve)
    limits = ServeLimits()  # the flags' defaults
    serve.add_argument("--max-batch", type=int, default=limits.max_batch,
                       help="images in one batched pass (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=_finite, default=limits.max_wait_s * 1000,
                       help="how long a request waits for others to share its pass (default: %(default)s)")
    serve.add_argument("--max-body-mb", type=_finite, default=limits.max_body_bytes / 2**20,
                       help=f"request body limit, at least {MIN_PHOTO_MB:g} (default: %(default)s)")
    serve.add_argument("--max-files", type=int, default=limits.max_files,
                       help="images in one request (default: %(default)s)")
    serve.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                       help="width x height limit of one image (default: %(default)s)")
    serve.add_argument("--request-timeout", type=_finite, default=limits.request_timeout_s,
                       help="seconds a client has to send a request's headers, and the first part of its body; "
                            "then 408 and the connection is closed (default: %(default)s)")
    serve.add_argument("--min-body-rate", type=_finite, default=limits.min_body_rate / 1024,
                       help="KB/s: each KB of a body that arrives gives the client 1/N s more past --request-timeout "
                            "(default: %(default)s)")
    serve.add_argument("--max-connections", type=int, default=limits.max_connections,
                       help="connections open at once; more are answered 503 (default: %(default)s)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    _fetch_arguments(serve)
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
    return parser


def _finite(text: str) -> float:
    """A float flag: inf or nan would pass every `> 0` check and then hang a wait or break a conversion."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0 to 65535; 0 = any free one)")
    return value


def _fetch_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FetchLimits()
    parser.add_argument("--fetch-timeout", type=_finite, default=defaults.timeout_s,
                        help="seconds one image URL may take in all, DNS and redirects included (default: %(default)s)")
    parser.add_argument("--fetch-max-mb", type=_finite, default=defaults.max_bytes / 2**20,
                        help=f"size limit of an image from a URL, at least {MIN_PHOTO_MB:g} (default: %(default)s)")
    parser.add_argument("--fetch-max-redirects", type=int, default=defaults.max_redirects,
                        help="redirects followed per URL (default: %(default)s)")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="also fetch URLs on loopback, private and link-local addresses (refused by default)")


def _decode_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-settings", type=Path, default=layout.DECODE_SETTINGS,
                        help="the decode settings evaluate wrote for this model (default: %(default)s)")


def _check_holds_a_photo(flag: str, megabytes: float) -> None:
    if megabytes < MIN_PHOTO_MB:
        raise UserError(f"{flag} {megabytes:g} would refuse nearly every photo; use at least {MIN_PHOTO_MB:g} "
                        "(about 100 KB)")


def _fetch_limits(args) -> FetchLimits:
    if args.fetch_timeout <= 0 or args.fetch_max_redirects < 0:
        raise UserError("--fetch-timeout must be positive, --fetch-max-redirects at least 0")
    _check_holds_a_photo("--fetch-max-mb", args.fetch_max_mb)
    return FetchLimits(timeout_s=args.fetch_timeout, max_bytes=int(args.fetch_max_mb * 2**20),
                       max_redirects=args.fetch_max_redirects, allow_private=args.allow_private_urls)


def caption_command(args) -> int:
    check_bundle(args.model_dir)
    try:
        settings = with_overrides(decode_settings(args.model_dir, args.decode_settings), beam_size=args.beam)
    except UserError as err:
        raise UserError(f"--beam: {err}" if args.beam is not None else err) from None
    limits = _fetch_limits(args)
    from captioning.inference import caption_batches  # TensorFlow only past the checks above

    # A file name that is not UTF-8 (an old archive's Latin-1 "café.jpg") arrives as surrogate escapes (PEP 383);
    # under a UTF-8 locale other than C, stdout refused it, with a traceback and every later line unprinted.
    # Its own bytes are printed instead, as ls prints them (stderr already shows them escaped).
    sys.stdout.reconfigure(errors="surrogateescape")
    failed = False
    # Printed batch by batch: a long list's finished captions are already out when it is interrupted.
    for results, errors in caption_batches(args.images, args.model_dir, settings, args.out, fetch_limits=limits):
        for path, caption in results:
            print(f"{path}\t{caption}", flush=True)
        for path, reason in errors:
            print(f"error: {path}: {one_line(reason)}", file=sys.stderr, flush=True)
        failed = failed or bool(errors)
    return 2 if failed else 0


def serve_command(args) -> int:
    check_bundle(args.model_dir)
    settings = decode_settings(args.model_dir, args.decode_settings)  # fails here, before TensorFlow loads
    if min(args.max_batch, args.max_files, args.max_pixels, args.max_connections) < 1 or args.max_wait_ms < 0 \
            or args.request_timeout <= 0 or args.min_body_rate <= 0:
        raise UserError("--max-batch, --max-files, --max-pixels, --max-connections must be at least 1, "
                        "--request-timeout and --min-body-rate positive, --max-wait-ms at least 0")
    _check_holds_a_photo("--max-body-mb", args.max_body_mb)
    fetch_limits = _fetch_limits(args)
    from captioning.malloc import limit_arenas  # ctypes: only the server needs it

    limit_arenas()  # before TensorFlow and the request threads start
    from captioning.serve import serve  # TensorFlow only past the checks above

    serve(args.model_dir, settings, args.host, args.port, _serve_limits(args, fetch_limits),
          access_log=args.access_log)
    return 0


def _serve_limits(args, fetch_limits: FetchLimits) -> ServeLimits:
    """The flags in the server's units (the inverse of the defaults' conversions in _parser)."""
    return ServeLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_files=args.max_files,
                       max_pixels=args.max_pixels, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
                       request_timeout_s=args.request_timeout, min_body_rate=args.min_body_rate * 1024,
                       max_connections=args.max_connections, fetch=fetch_limits)


def demo_command(args) -> int:
    from captioning.demo import write_demo

    options = read_section("demo", path=args.params)  # checked like every stage's params
    print(write_demo(options.out_dir, n_images=options.n_images, image_size=options.image_size, seed=options.seed,
                     params_file=args.params))
    return 0


def plots_template_command(args) -> int:
    from captioning.offline_plots import TEMPLATE_PATH, write_template

    out = args.out or TEMPLATE_PATH
    try:
        changed = write_template(out)
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror or err}): pass --out with a file path "
                        "you can write") from None
    print(f"{'wrote' if changed else 'up to date:'} {out}")
    return 0


def main() -> None:
    args = _parser().parse_args()
    commands = {"caption": caption_command, "serve": serve_command, "demo": demo_command,
                "plots-template": plots_template_command}
    status = commands[args.command](args)
    sys.exit(status)


def cli() -> None:
    """The `captioning` console script (pyproject.toml): the same commands, output and one-line errors
    with exit status 2 as `python -m captioning`."""
    run_cli(main)


if __name__ == "__main__":
    cli()
