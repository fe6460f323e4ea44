"""The training photos' index: cosine k-nearest rows, a pickle-free file, and the neighbours rerank's pick."""
import numpy as np
import pandas as pd
import pytest
from test_consensus import REFERENCES, _statistics

from captioning.consensus import neighbour_consensus_index
from captioning.neighbours import NeighbourIndex, nearest_neighbours


def test_nearest_neighbours_are_the_k_highest_cosines_whatever_the_chunk():
    rng = np.random.default_rng(3)
    pool = rng.normal(size=(50, 6)).astype(np.float32)
    pool[7] = pool[3] * 2.5  # the same direction as row 3: a tie, which goes to the lower index
    query = np.concatenate([rng.normal(size=(4, 6)), pool[3:4] * 0.1]).astype(np.float32)
    unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
    expected = np.argsort(-(unit(query) @ unit(pool).T), axis=1, kind="stable")[:, :5]
    for chunk in (50, 16, 7, 1):
        found = nearest_neighbours(query, pool, k=5, chunk=chunk)
        assert found.shape == (5, 5)
        np.testing.assert_array_equal(found, expected)
    assert list(found[-1, :2]) == [3, 7]
    assert nearest_neighbours(query, pool[:3], k=5).shape == (5, 3)  # k beyond the pool: the whole pool


class _Store:
    """A feature store's `get` over named rows, as FeatureStore offers it."""

    def __init__(self, rows: dict):
        self.rows = rows

    def get(self, images):
        return np.stack([self.rows[name] for name in images])


def test_index_survives_a_save_and_load_without_pickle(tmp_path):
    kept = {"a.jpg": 2, "b.jpg": 2, "c.jpg": 3}  # photos with different numbers of captions
    table = pd.DataFrame([(image, caption) for image, count in kept.items() for caption in REFERENCES[image][:count]],
                         columns=["image", "caption"])
    rows = {"a.jpg": [1.0, 0.0], "b.jpg": [0.0, 1.0], "c.jpg": [-1.0, 0.1]}
    index = NeighbourIndex.from_table(table.sample(frac=1, random_state=0), _Store(rows))
    index.save(tmp_path / "neighbours.npz")
    with np.load(tmp_path / "neighbours.npz", allow_pickle=False) as stored:  # plain arrays only
        assert stored["captions"].dtype.kind == "U"
    loaded = NeighbourIndex.load(tmp_path / "neighbours.npz")
    np.testing.assert_array_equal(loaded.features, index.features)
    assert [sorted(texts) for texts in loaded.captions] == [sorted(REFERENCES[k][:kept[k]]) for k in sorted(kept)]
    def nearest_captions(features, k):
        return [[text for photo in photos for text in loaded.captions[photo]]
                for photos in loaded.nearest_photos(np.array(features), k)]

    near_a = nearest_captions([[0.9, 0.2]], k=1)[0]
    assert sorted(near_a) == sorted(REFERENCES["a.jpg"][:2])
    assert len(nearest_captions([[0.9, 0.2], [-1.0, 0.0]], k=2)[1]) == 5  # c's 3 + a's 2


def test_neighbour_consensus_picks_what_the_neighbours_wrote():
    statistics = _statistics()
    captions = ["a red circle", "two blue squares on a black background", "three green triangles"]
    log_probs = np.log([0.5, 0.3, 0.2])
    references = REFERENCES["b.jpg"]
    chosen = neighbour_consensus_index(captions, log_probs, [statistics.vector(r) for r in references], statistics)
    assert chosen == 1  # not the most probable: the one the neighbours' captions agree with
    assert chosen == int(np.argmax([statistics.cider(c, references) for c in captions]))
    # Nothing in common with any beam: every gain is 0, and the most probable beam stays.
    assert neighbour_consensus_index(captions, log_probs, [statistics.vector("an orange hexagon")], statistics) == 0


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros((4, 3))])
def test_index_refuses_rows_and_captions_that_do_not_match(bad):
    with pytest.raises(ValueError, match="feature rows"):
        NeighbourIndex(bad, [["a"], ["b"], ["c"]])


def test_neighbours_of_a_photo_do_not_depend_on_the_batch_and_equal_rows_tie():
    """evaluate asks for a batch of test photos, the caption command and the server for one: each must get
    the same neighbours. A photo present twice in the pool (one picture under two names) is an exact tie,
    which goes to the lower index; float32 BLAS scored such pairs differently in a batch."""
    rng = np.random.default_rng(0)
    unique = rng.normal(size=(500, 512)).astype(np.float32)
    order = rng.permutation(1000)
    pool = np.concatenate([unique, unique])[order]  # every photo twice, at random places
    where = np.argsort(order)  # unique[i] is pool rows where[i] and where[i + 500]
    expected = np.sort(np.stack([where[:500], where[500:]], axis=1), axis=1)
    query = (unique + 0.05 * rng.normal(size=unique.shape)).astype(np.float32)
    together = nearest_neighbours(query, pool, k=2)
    np.testing.assert_array_equal(together, expected)
    for size in (1, 7, 64):
        np.testing.assert_array_equal(
            np.concatenate([nearest_neighbours(query[i:i + size], pool, k=2) for i in range(0, 500, size)]), together)
