"""Two honest baselines, scored exactly like the model, so a user can tell a captioner that looks at
the image from one that prints the same sentence for every photo.

- frequent: the most frequent training caption, for every image.
- nearest: the caption of the training image whose feature vector is closest (cosine); among that
  image's captions, the consensus one (highest CIDEr against its other captions).
"""
from __future__ import annotations

from collections import Counter

import pandas as pd
from pycocoevalcap.cider.cider import Cider


def most_frequent_caption(train_captions: pd.Series) -> str:
    counts = Counter(train_captions)
    return min(counts, key=lambda caption: (-counts[caption], caption))


def consensus_captions(captions: pd.DataFrame) -> dict[str, str]:
    """For each image, the caption most similar to its other captions (CIDEr against the rest)."""
    res, gts, owner = {}, {}, {}
    for image, group in captions.groupby("image", sort=True):
        texts = list(group["caption"])
        if len(texts) == 1:
            res[f"{image}#0"], gts[f"{image}#0"], owner[f"{image}#0"] = [texts[0]], [texts[0]], image
            continue
        for i, text in enumerate(texts):
            key = f"{image}#{i}"
            res[key], gts[key], owner[key] = [text], texts[:i] + texts[i + 1:], image
    _, scores = Cider().compute_score(gts, res)
    best: dict[str, tuple[float, str]] = {}
    for key, score in zip(res, scores, strict=True):  # Cider keeps the order of the dict it was given
        image = owner[key]
        if image not in best or score > best[image][0]:
            best[image] = (float(score), res[key][0])
    return {image: text for image, (_, text) in best.items()}
