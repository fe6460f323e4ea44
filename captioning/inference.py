"""The trained captioner loaded once, for the caption command and the server alike.

`LoadedCaptioner` holds the backbone rebuilt from the model bundle's backbone.json (same weights
setting, seed, precision and image size as extraction), the decoder and the decode settings
`evaluate` used. Images are loaded by `images.load_image` and run through
`features.FeatureComputer.forward`, the very forward pass extraction uses, so a test image gets the
caption `evaluate` wrote for it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning import files, layout
from captioning.backbones import build_backbone
from captioning.batching import allowed_batch_sizes, padded_size
from captioning.bundle import check_bundle
from captioning.decode import NEG_INF, Captioner
from captioning.errors import without_credentials
from captioning.feature_files import BackboneSpec
from captioning.features import FeatureComputer
from captioning.fetch import FetchError, FetchLimits, fetch, is_url
from captioning.images import ImageError, load_image


def load_backbone(model_dir: Path):
    """The backbone the model's features came from, and its spec: the one place it is rebuilt."""
    spec = BackboneSpec(**files.read_json(Path(model_dir) / layout.BACKBONE_SPEC))
    return build_backbone(spec), spec


@dataclass
class Decoded:
    caption: str
    beams: list[dict]  # [{"caption", "score"}], best first; a greedy caption has score None


class LoadedCaptioner:
    """Backbone + Captioner + decode settings, loaded once; `caption(pixels)` any number of times.

    Every pass is padded to one of `batch_sizes` (batching.allowed_batch_sizes(max_batch)), so a long
    running server meets only those shapes and its memory stays flat; padding rows are repeats of the
    last image, and batches of 2 or more give every row the same bits whatever the batch size.
    """

    def __init__(self, model_dir: Path, settings: dict, max_batch: int = 16):
        check_bundle(model_dir)
        self.model_dir = Path(model_dir)
        self.settings = dict(settings)
        self.batch_sizes = allowed_batch_sizes(max_batch)
        self.backbone, self.spec = load_backbone(model_dir)
        self._forward = FeatureComputer(self.backbone, self.spec.image_size).forward
        self.captioner = Captioner.load(model_dir)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def describe(self) -> dict:
        """Which backbone and weights the model uses, and how it decodes by default."""
        return {"model_dir": str(self.model_dir), "backbone": self.spec.to_json(), "decode": self.settings}

    def warm_up(self) -> None:
        """Run the forward pass and the decoder once at every allowed batch size, so no request is the
        slow first one and memory is at its plateau from the start; a model that cannot decode with its
        settings (consensus without statistics) fails here."""
        for size in self.batch_sizes:
            pixels = np.zeros((size, self.image_size, self.image_size, 3), np.uint8)
            self.decode(self.features(pixels), self.settings)

    def _padded(self, rows: np.ndarray) -> np.ndarray:
        extra = padded_size(len(rows), self.batch_sizes) - len(rows)
        return np.concatenate([rows, np.repeat(rows[-1:], extra, axis=0)]) if extra else rows

    def features(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, np.uint8)
        return self._forward(self._padded(pixels)).numpy()[:len(pixels)]

    def decode(self, features: np.ndarray, settings: dict) -> list[Decoded]:
        """One batched decode; the caption is the one `Captioner.caption_ids` picks, the beams beside it."""
        self.captioner.require_rerank_support(settings["method"], settings["rerank"])
        count = len(features)
        features = self._padded(features)
        if settings["method"] == "greedy":
            ids = self.captioner.greedy_ids(features, settings["max_length"], settings["no_repeat_ngram"])
            captions = [self.captioner.vocab.decode(row) for row in ids]
            out = [Decoded(caption, [{"caption": caption, "score": None}]) for caption in captions]
        else:
            beams, scores = self.captioner.final_beams(features, settings["beam_size"], settings["max_length"],
                                                       settings["length_penalty"], settings["no_repeat_ngram"])
            beams, scores = beams[:count], scores[:count]
            # Settings saved before the neighbours rerank existed have no `neighbours`, and do not need it.
            chosen = self.captioner.choose_beams(features[:count], beams, scores, settings["rerank"],
                                                 settings.get("neighbours"))
            out = [self._with_beams(b, s, c) for b, s, c in zip(beams, scores, chosen, strict=True)]
        return out[:count]

    def _with_beams(self, beams: np.ndarray, scores: np.ndarray, chosen: np.ndarray) -> Decoded:
        """The chosen caption, with every live beam beside it, most probable first."""
        live = [i for i in np.argsort(-scores, kind="stable") if scores[i] > NEG_INF]
        decode = self.captioner.vocab.decode
        return Decoded(decode(chosen), [{"caption": decode(beams[i]), "score": round(float(scores[i]), 4)}
                                        for i in live])

    def caption(self, pixels: np.ndarray, settings: dict | None = None) -> list[Decoded]:
        return self.decode(self.features(pixels), settings or self.settings)

    def caption_many(self, pixels: list[np.ndarray], settings: list[dict]) -> list[Decoded | Exception]:
        """A server batch: one forward pass for all images, one decode per distinct setting. A setting
        that fails to decode fails its own images (their result is the exception), not the others'."""
        features = self.features(np.stack(pixels))
        groups: dict[tuple, list[int]] = {}
        for row, options in enumerate(settings):
            groups.setdefault(tuple(sorted(options.items())), []).append(row)
        results: list[Decoded | Exception | None] = [None] * len(pixels)
        for key, rows in groups.items():
            try:
                decoded = self.decode(features[rows], dict(key))
            except Exception as err:  # noqa: BLE001 - handed to these images' requests, which answer it
                decoded = [err] * len(rows)
            for row, result in zip(rows, decoded, strict=True):
                results[row] = result
        return results


def read_source(source: str | Path, image_size: int, fetch_limits: FetchLimits,
                max_pixels: int | None = None) -> tuple[np.ndarray, bytes | None]:
    """Pixels of a file path or an image URL (and the URL's bytes), or ImageError/FetchError."""
    if is_url(str(source)):
        data = fetch(str(source), fetch_limits)
        return load_image(data, image_size, max_pixels), data
    return load_image(source, image_size, max_pixels), None


def _numbered(out: Path, position: int, count: int) -> Path:
    """`out` itself for one image; for several, numbered by the image's place among the arguments, so which
    file shows which image does not depend on whether the images before it could be read."""
    return out if count == 1 else out.with_name(f"{out.stem}-{position}{out.suffix or '.png'}")


def _draw(image, caption: str, target: Path) -> list[tuple[object, str]]:
    """Write the captioned picture; an unwritable target is an error line, and the caption is kept."""
    from captioning.plots import captioned_image

    try:
        captioned_image(image, caption, target)
    except (OSError, ValueError) as err:
        return [(target, f"cannot write the captioned image ({getattr(err, 'strerror', None) or err})")]
    return []


def caption_files(sources: list, model_dir: Path, settings: dict, out: Path | None = None,
                  batch_size: int = 32, fetch_limits: FetchLimits | None = None
                  ) -> tuple[list[tuple[object, str]], list[tuple[object, str]]]:
    """Return ([(source, caption)], [(source, error)]) for file paths and image URLs (fetched within
    `fetch_limits`, default FetchLimits())."""
    results, errors = [], []
    for batch_results, batch_errors in caption_batches(sources, model_dir, settings, out, batch_size, fetch_limits):
        results += batch_results
        errors += batch_errors
    return results, errors


def caption_batches(sources: list, model_dir: Path, settings: dict, out: Path | None = None,
                    batch_size: int = 32, fetch_limits: FetchLimits | None = None):
    """caption_files one batch at a time: yields each batch's ([(source, caption)], [(source, error)]) as
    soon as it is done, so a long list's captions are not all lost to a Ctrl-C near its end."""
    fetch_limits = fetch_limits or FetchLimits()
    loaded = LoadedCaptioner(model_dir, settings, max_batch=batch_size)
    for start in range(0, len(sources), batch_size):
        good, pixels, shown, errors = [], [], [], []
        for position, source in enumerate(sources[start:start + batch_size], start + 1):
            try:
                array, data = read_source(source, loaded.image_size, fetch_limits)
            except (ImageError, FetchError) as err:  # a URL is named without the password it may hold
                errors.append((without_credentials(str(source)) if is_url(str(source)) else source, str(err)))
                continue
            good.append(source)
            pixels.append(array)
            if out is not None:  # a URL's bytes are kept only to draw them, and only until its batch is drawn
                shown.append((position, io.BytesIO(data) if data is not None else source))
        decoded = [d.caption for d in loaded.caption(np.stack(pixels))] if good else []
        if out is not None:
            for (position, image), caption in zip(shown, decoded, strict=True):
                errors += _draw(image, caption, _numbered(out, position, len(sources)))
        yield list(zip(good, decoded, strict=True)), errors
