"""Captioning new image files, exactly as `evaluate` captions test images.

The backbone is rebuilt from the model bundle's backbone.json (same weights setting, seed,
precision and image size as extraction), images are loaded by the same function, and decoding uses
the same Captioner, so a test image gets the very caption `evaluate` wrote for it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from captioning import files
from captioning.decode import Captioner
from captioning.features import BackboneSpec, build_backbone, compute_features


def caption_files(paths: list[Path], model_dir: Path, settings: dict, out: Path | None = None,
                  batch_size: int = 32) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Return ([(path, caption)], [(path, error)]); all good images are decoded as one batch."""
    spec = BackboneSpec(**files.read_json(Path(model_dir) / "backbone.json"))
    backbone = build_backbone(spec)
    features = np.zeros((len(paths), backbone.output_shape[-1]), np.float32)
    errors = compute_features(backbone, [str(p) for p in paths], spec.image_size, batch_size, features, progress=False)
    good = [i for i in range(len(paths)) if i not in errors]
    captions = Captioner.load(model_dir).captions(features[good], **settings) if good else []
    results = [(paths[i], caption) for i, caption in zip(good, captions, strict=True)]
    if out is not None:
        from captioning.plots import captioned_image

        for n, (path, caption) in enumerate(results):
            target = out if len(results) == 1 else out.with_name(f"{out.stem}-{n + 1}{out.suffix or '.png'}")
            captioned_image(path, caption, target)
    return results, [(paths[i], errors[i]) for i in sorted(errors)]
