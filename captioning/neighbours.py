"""The training photos as a decoder's reference: their feature vectors and captions, and the cosine
nearest ones to a new photo.

Two users: the nearest-neighbour baseline (the caption of the closest training photo) and the
`neighbours` rerank, which picks among a photo's final beams the one that agrees most with what
people wrote about the training photos that look most like it (k-nearest-neighbour consensus,
Devlin et al. 2015, "Exploring Nearest Neighbor Approaches for Image Captioning"). Beam search
alone ranks wordings by the decoder's probabilities; the neighbours' captions bring in the words
other annotators used for photos like this one.

`train_lstm` saves the index beside the model (`neighbours.npz`: plain arrays, loaded without
pickle), so the caption command and the server rerank exactly as `evaluate` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from captioning import files


def unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


# Candidates kept from the fast float32 pass beyond the k asked for, to be scored again exactly: more than
# enough for the rows that float32 noise can reorder around the k-th (a photo under a few names, say).
SHORTLIST_EXTRA = 16


def nearest_neighbours(query: np.ndarray, pool: np.ndarray, k: int = 1, chunk: int = 8192) -> np.ndarray:
    """(queries, min(k, pool)) indices into `pool` of each query row's cosine-nearest rows, nearest first
    (ties to the lower index), scanning the pool in chunks so a large pool never makes one huge matrix.

    A row's neighbours do not depend on the other rows of `query`: evaluate asks for a batch of test photos,
    the caption command and the server for one or a few, and they must pick the same neighbours."""
    query = unit_rows(query)
    k = min(k, len(pool))
    shortlist = min(k + SHORTLIST_EXTRA, len(pool))
    best_score = np.full((len(query), 0), -np.inf, np.float32)
    best_index = np.zeros((len(query), 0), np.int64)
    for start in range(0, len(pool), chunk):
        similarity = query @ unit_rows(pool[start:start + chunk]).T
        scores = np.concatenate([best_score, similarity], axis=1)
        indices = np.concatenate([best_index, np.broadcast_to(np.arange(start, start + similarity.shape[1]),
                                                              similarity.shape)], axis=1)
        order = np.lexsort((indices, -scores), axis=1)[:, :shortlist]  # highest similarity, then lowest index
        best_score = np.take_along_axis(scores, order, axis=1)
        best_index = np.take_along_axis(indices, order, axis=1)
    # BLAS's float32 matrix product sums each cosine in an order that depends on the shapes (how many queries
    # come together, where a pool row falls in its block), so one pair scored differently in the last bit in
    # a batch and alone, and two equal pool rows (one photo under two names) did not tie. The shortlist is
    # scored again pair by pair, the same way whatever the batch: float32 products are exact in float64,
    # whose summing noise is far below float32's step, so equal rows tie and the lower index wins.
    if best_index.size == 0:  # no queries, or an empty pool
        return best_index[:, :k]
    exact = np.stack([_pair_cosines(query, pool[best_index[:, j]]) for j in range(best_index.shape[1])], axis=1)
    order = np.lexsort((best_index, -exact), axis=1)[:, :k]
    return np.take_along_axis(best_index, order, axis=1)


def _pair_cosines(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine of each unit query row with the matching row of `rows`, in float64, rounded to float32."""
    return (query.astype(np.float64) * unit_rows(rows).astype(np.float64)).sum(axis=1).astype(np.float32)


class NeighbourIndex:
    """Training photos' features (one row each) and their captions, in the same order."""

    def __init__(self, features: np.ndarray, captions: list[list[str]]):
        if len(features) != len(captions):
            raise ValueError(f"{len(features)} feature rows for {len(captions)} photos' captions")
        self.features = np.asarray(features, np.float32)
        self.captions = captions

    @classmethod
    def from_table(cls, captions: pd.DataFrame, store) -> NeighbourIndex:
        """From a captions table (columns image, caption) of photos that all have features in `store`."""
        groups = captions.groupby("image", sort=True)["caption"]
        images = [image for image, _ in groups]
        return cls(store.get(images), [list(texts) for _, texts in groups])

    def save(self, path: str | Path) -> None:
        counts = np.array([len(texts) for texts in self.captions], np.int64)
        flat = np.array([text for texts in self.captions for text in texts], dtype=str)
        with files.atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, features=self.features, caption_counts=counts, captions=flat)

    @classmethod
    def load(cls, path: str | Path) -> NeighbourIndex:
        with np.load(path, allow_pickle=False) as stored:  # plain arrays only: nothing in the file runs
            flat, counts = stored["captions"].tolist(), stored["caption_counts"]
            bounds = np.concatenate([[0], np.cumsum(counts)])
            return cls(stored["features"], [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])

    def nearest_photos(self, features: np.ndarray, k: int) -> np.ndarray:
        """For each row of `features`, the indices of its k cosine-nearest training photos, nearest first."""
        return nearest_neighbours(features, self.features, k)
