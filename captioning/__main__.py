"""Command line: `python -m captioning caption IMG|URL ...`, `python -m captioning serve`,
`python -m captioning demo` and `python -m captioning plots-template`."""
from __future__ import annotations

import argparse
import math
import sys
import typing
from dataclasses import dataclass
from fractions import Fraction
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
MEGABYTE, KILOBYTE, MILLISECOND = Fraction(2**20), Fraction(1024), Fraction(1, 1000)  # in bytes and seconds


@dataclass(frozen=True)
class LimitFlag:
    """A flag for one field of ServeLimits or FetchLimits, in the unit a person types (MB, ms): the field holds
    the flag's value times `scale`. Its default is the field's own, so the flags cannot drift from the server."""

    flag: str
    field: str
    number: type  # int or float: what the flag takes
    help: str
    scale: Fraction = Fraction(1)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")  # argparse's name for the flag's value

    def add_to(self, parser: argparse.ArgumentParser, limits) -> None:
        # Fractions keep both conversions exact: 0.005 s shows as 5.0 ms, and 7 ms arrives as 0.007 s.
        default = self.number(Fraction(getattr(limits, self.field)) / self.scale)
        parser.add_argument(self.flag, type=_finite if self.number is float else int, default=default, help=self.help)

    def value_of(self, args, field_type: type) -> int | float:
        return field_type(Fraction(getattr(args, self.dest)) * self.scale)


SERVE_FLAGS = (
    LimitFlag("--max-batch", "max_batch", int, "images in one batched pass (default: %(default)s)"),
    LimitFlag("--max-wait-ms", "max_wait_s", float,
              "how long a request waits for others to share its pass (default: %(default)s)", MILLISECOND),
    LimitFlag("--max-body-mb", "max_body_bytes", float,
              f"request body limit, at least {MIN_PHOTO_MB:g} (default: %(default)s)", MEGABYTE),
    LimitFlag("--max-files", "max_files", int, "images in one request (default: %(default)s)"),
    LimitFlag("--max-pixels", "max_pixels", int, "width x height limit of one image (default: %(default)s)"),
    LimitFlag("--request-timeout", "request_timeout_s", float,
              "seconds a client has to send a request's headers, and the first part of its body; "
              "then 408 and the connection is closed; and to read on when its unread answers fill the "
              "socket (default: %(default)s)"),
    LimitFlag("--min-body-rate", "min_body_rate", float,
              "KB/s: each KB of a body that arrives gives the client 1/N s more past --request-timeout "
              "(default: %(default)s)", KILOBYTE),
    LimitFlag("--max-connections", "max_connections", int,
              "connections open at once; more are answered 503 (default: %(default)s)"),
)
FETCH_FLAGS = (
    LimitFlag("--fetch-timeout", "timeout_s", float,
              "seconds one image URL may take in all, DNS and redirects included (default: %(default)s)"),
    LimitFlag("--fetch-max-mb", "max_bytes", float,
              f"size limit of an image from a URL, at least {MIN_PHOTO_MB:g} (default: %(default)s)", MEGABYTE),
    LimitFlag("--fetch-max-redirects", "max_redirects", int, "redirects followed per URL (default: %(default)s)"),
)


def _limits_from(args, flags: tuple[LimitFlag, ...], limits_class: type, **others):
    """`limits_class` (ServeLimits, FetchLimits) from the flags' values, each in the field's unit and type."""
    field_types = typing.get_type_hints(limits_class)
    return limits_class(**{flag.field: flag.value_of(args, field_types[flag.field]) for flag in flags}, **others)


def _program_name() -> str:
    """The usage line's name for the way the user ran us: `captioning` (the console script, as the README
    says to type it) or `python -m captioning`. argparse's own default, the script's file name, would be
    `__main__.py` under -m (until Python 3.14)."""
    script = Path(sys.argv[0]).name
    return "python -m captioning" if script == "__main__.py" else script


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_program_name(), description=__doc__)
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
    for flag in SERVE_FLAGS:
        flag.add_to(serve, ServeLimits())
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
    for flag in FETCH_FLAGS:
        flag.add_to(parser, FetchLimits())
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
    return _limits_from(args, FETCH_FLAGS, FetchLimits, allow_private=args.allow_private_urls)


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
    return _limits_from(args, SERVE_FLAGS, ServeLimits, fetch=fetch_limits)


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
