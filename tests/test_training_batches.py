"""The batches a resumed run trains on are the ones an uninterrupted run has at that epoch, also when the
caption count is no multiple of the batch size (an epoch then starts part-way into a permutation)."""
from __future__ import annotations

import numpy as np
import pytest

from captioning.train import CaptionSet, steps_per_epoch, training_batches

EPOCHS = 4


def caption_ids(data: CaptionSet, batch_size: int, first_epoch: int, count: int) -> list[list[int]]:
    """The captions of each of the first `count` batches from `first_epoch` on (a caption's id is its word)."""
    matrix = np.zeros((len(data), 4), dtype=np.float32)
    stream = training_batches(data, matrix, batch_size, seed=3, first_epoch=first_epoch).take(count)
    return [inputs["tokens"].numpy()[:, 1].tolist() for inputs, _ in stream]


@pytest.mark.parametrize("captions,batch_size", [(30, 8), (30, 10), (7, 16)])
def test_a_resumed_run_gets_the_batches_of_an_uninterrupted_one(captions, batch_size):
    ids = np.arange(captions, dtype=np.int32)
    sequences = np.stack([np.ones_like(ids), ids + 4, np.full_like(ids, 2)], axis=1)  # <start> id <end>
    data = CaptionSet(np.arange(captions, dtype=np.int64), sequences)
    steps = steps_per_epoch(data, batch_size)
    straight = caption_ids(data, batch_size, 0, EPOCHS * steps)
    for done in range(1, EPOCHS):
        assert caption_ids(data, batch_size, done, (EPOCHS - done) * steps) == straight[done * steps:], done
    # the stream is whole permutations one after another: every caption once per `captions` draws
    drawn = [caption for batch in straight for caption in batch]
    for start in range(0, len(drawn) - captions + 1, captions):
        assert sorted(drawn[start:start + captions]) == (ids + 4).tolist()
