"""Consensus choice among beam-search captions: minimum Bayes risk with CIDEr-D as the utility.

Beam search returns the most probable wording. When each image's references are several wordings of
one content (Flickr8k, the demo), that is close to an arbitrary pick, while caption metrics reward
the wording the others agree with. Minimum-Bayes-risk selection (Kumar & Byrne, 2004) picks the
beam with the highest expected utility against all beams, weighted by their probabilities. The
utility is the metric the field ranks by, CIDEr-D, so n-grams that every caption shares ("a",
"picture of") count for little and the words that carry content count for much.

CIDEr-D weighs n-grams by inverse document frequency. Those frequencies come from the training
captions: a handful of beams of one image is no corpus. They are saved with the model
(`ngram_df.json`) at training time, so the caption command chooses exactly as `evaluate` does.
The formula is pycocoevalcap's CIDEr-D (tf-idf vectors of 1..4-grams, clipped cosine, Gaussian
length penalty with sigma 6, times 10) with the document frequencies given rather than taken from
the references at hand; a test checks it against pycocoevalcap where the two coincide.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pycocoevalcap.cider.cider_scorer import precook

from captioning.files import read_json, write_json
from captioning.text import clean_caption

MAX_N = 4
SIGMA = 6.0


class NgramStatistics:
    """Document frequencies of n-grams over a caption corpus, one document per image."""

    def __init__(self, document_frequency: dict[tuple[str, ...], float], n_documents: int):
        self.document_frequency = document_frequency
        self.log_documents = math.log(max(n_documents, 1))
        self.n_documents = n_documents

    @classmethod
    def from_captions(cls, captions_per_image: Iterable[Iterable[str]]) -> NgramStatistics:
        frequency: dict[tuple[str, ...], float] = defaultdict(float)
        n_documents = 0
        for captions in captions_per_image:
            n_documents += 1
            for ngram in {g for caption in captions for g in precook(clean_caption(caption), MAX_N)}:
                frequency[ngram] += 1
        # An n-gram in one document gets the same idf as an unseen one (CIDEr floors frequencies at 1),
        # so only the others are kept: most n-grams of a real corpus are singletons.
        return cls({g: f for g, f in frequency.items() if f > 1}, n_documents)

    @classmethod
    def from_table(cls, captions) -> NgramStatistics:
        """From a captions table (columns image, caption): each image's captions are one document."""
        return cls.from_captions(group for _, group in captions.groupby("image", sort=True)["caption"])

    def save(self, path: str | Path) -> None:
        write_json(path, {"n_documents": self.n_documents,
                          "document_frequency": {" ".join(g): f for g, f in sorted(self.document_frequency.items())}})

    @classmethod
    def load(cls, path: str | Path) -> NgramStatistics:
        stored = read_json(path)
        return cls({tuple(g.split(" ")): f for g, f in stored["document_frequency"].items()}, stored["n_documents"])

    def vector(self, caption: str) -> tuple[list[dict], list[float], int]:
        """tf-idf weights per n-gram order, their norms, and the caption's length in words."""
        text = clean_caption(caption)
        weights: list[dict] = [{} for _ in range(MAX_N)]
        for ngram, count in precook(text, MAX_N).items():
            idf = self.log_documents - math.log(max(1.0, self.document_frequency.get(ngram, 0.0)))
            weights[len(ngram) - 1][ngram] = count * idf
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        return weights, norms, len(text.split())

    @staticmethod
    def similarity(candidate: tuple, reference: tuple) -> float:
        """CIDEr-D of one candidate against one reference, both from `vector`."""
        (cand, cand_norms, cand_len), (ref, ref_norms, ref_len) = candidate, reference
        total = 0.0
        for n in range(MAX_N):
            overlap = sum(min(w, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, w in cand[n].items())
            if cand_norms[n] and ref_norms[n]:
                overlap /= cand_norms[n] * ref_norms[n]
            total += overlap
        return 10.0 * total / MAX_N * math.exp(-((cand_len - ref_len) ** 2) / (2 * SIGMA ** 2))

    def cider(self, candidate: str, references: list[str]) -> float:
        """Mean CIDEr-D of `candidate` against `references`, as pycocoevalcap scores one image."""
        return self.cider_of_vector(self.vector(candidate), [self.vector(r) for r in references])

    def cider_of_vector(self, candidate: tuple, references: list[tuple]) -> float:
        """`cider` from vectors: references that are scored against many times are vectorised once."""
        return float(np.mean([self.similarity(candidate, reference) for reference in references]))


def consensus_index(captions: list[str], log_probs: np.ndarray, statistics: NgramStatistics) -> int:
    """Index of the caption with the highest probability-weighted CIDEr-D against all of them.

    Ties go to the more probable caption, so identical beams behave like plain beam search.
    """
    log_probs = np.asarray(log_probs, np.float64)
    weights = np.exp(log_probs - log_probs.max())
    weights /= weights.sum()
    vectors = [statistics.vector(c) for c in captions]
    gains = [sum(w * statistics.similarity(v, other) for w, other in zip(weights, vectors, strict=True))
             for v in vectors]
    return _best(gains, log_probs)


def neighbour_consensus_index(captions: list[str], log_probs: np.ndarray, references: list[tuple],
                              statistics: NgramStatistics) -> int:
    """Index of the caption with the highest CIDEr-D against `references` (from `statistics.vector`), the
    captions of the training photos nearest the image (see `captioning.neighbours`); ties go to the more
    probable caption."""
    return _best([statistics.cider_of_vector(statistics.vector(c), references) for c in captions], log_probs)


def _best(gains: list[float], log_probs: np.ndarray) -> int:
    # Rounded, so gains equal up to float noise count as a tie.
    return min(range(len(gains)), key=lambda k: (-round(gains[k], 9), -log_probs[k]))
