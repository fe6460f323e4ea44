"""Scoring as `evaluate` does it: three caption sets (the model's and the two baselines') scored with one
METEOR Java process (`CaptionScorer`), against one process per set (`score_captions` three times, as
`evaluate` did before). Each set is one of an image's five demo captions scored against the other four,
so the three sets differ as the model's and the baselines' do. Every figure includes BLEU, ROUGE-L and
CIDEr, which cost the same on both sides; the scores of the two sides are compared as a correctness check.
Java runs in its own process, so only wall clock means anything here (no CPU-time ratio).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from common import median

from captioning.demo import captions_for, plan_scenes
from captioning.scoring import CaptionScorer, score_captions
from captioning.timing import Stopwatch

SETS = 3  # the model, the frequent baseline, the nearest baseline


def caption_sets(n_images: int) -> list[tuple[dict, dict]]:
    """(candidates, references) per set: set k scores each image's caption k against its other four."""
    captions = {scene.name: captions_for(scene, i, seed=0) for i, scene in enumerate(plan_scenes(n_images, seed=0))}
    return [({name: texts[k] for name, texts in captions.items()},
             {name: texts[:k] + texts[k + 1:] for name, texts in captions.items()}) for k in range(SETS)]


def run(workdir: Path, n_images: int, repeats: int) -> dict:
    sets = caption_sets(n_images)
    score_captions(*sets[0])  # warm-up: Java's first start reads its jar and tables from disk
    one_process, process_per_set = [], []
    for _ in range(repeats):
        with Stopwatch() as watch:
            separate = [score_captions(candidates, references) for candidates, references in sets]
        process_per_set.append(watch.seconds)

        with Stopwatch() as watch, CaptionScorer() as scorer:
            shared = [scorer.score(candidates, references) for candidates, references in sets]
        one_process.append(watch.seconds)
        assert [corpus for corpus, _ in shared] == [corpus for corpus, _ in separate], "the scores differ"
    return {
        "meteor_reuse_speedup": {
            "value": median(process_per_set) / median(one_process),
            "raw": {"process_per_set_seconds": process_per_set, "one_process_seconds": one_process,
                    "images": n_images, "sets": SETS, "java": shutil.which("java") is not None},
        },
    }
