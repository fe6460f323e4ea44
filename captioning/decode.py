"""Greedy and beam-search decoding, compiled with tf.function and batched over many images.

Rules shared by both: <pad>, <start> and <unk> are never emitted (their logits are masked), <end>
is not allowed as the first word (no empty captions), no n-gram of `no_repeat_ngram` words occurs
twice in a caption (the "a black shirt and a black shirt" loops a weak language model falls into;
the same blocking as `no_repeat_ngram_size` in Hugging Face and OpenNMT; 0 turns it off), decoding
stops at <end> or `max_length` words, and an unfinished caption is returned as it stands. With beam
width 1 beam search takes the greedy choices (top-k breaks ties towards the lower id, like argmax), except
where two words' log-probabilities differ by less than float32 can tell apart once added to the caption's
summed score: beam search then takes the lower id.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioning import consensus, layout
from captioning.errors import UserError
from captioning.model import inference_models
from captioning.neighbours import NeighbourIndex
from captioning.tf_setup import keras, tf
from captioning.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary

NEG_INF = -1e9


def _real(scores):
    """Beams made only of allowed words: a caption's summed log-probability is far above NEG_INF, and one
    masked word (NEG_INF) puts it far below."""
    return scores > NEG_INF / 2


class Captioner:
    """A trained decoder plus its vocabulary, turning feature vectors into captions.

    `statistics` (the training captions' n-gram document frequencies) is what both reranks weigh
    n-grams by, and `neighbour_index` (the training photos' features and captions) is what the
    `neighbours` rerank compares with; without them only `rerank: none` is possible.
    """

    def __init__(self, model: keras.Model, vocab: Vocabulary,
                 statistics: consensus.NgramStatistics | None = None, neighbour_index: NeighbourIndex | None = None):
        self.vocab = vocab
        self.statistics = statistics
        self.neighbour_index = neighbour_index
        self._photo_vectors: dict[int, list[tuple]] = {}  # see _caption_vectors
        self.encoder, self.step = inference_models(model)
        self.banned, self.no_end = (tf.constant(mask) for mask in word_rules(len(vocab)))
        # Fixed signatures with an unknown batch size: one trace serves every batch. The loops are
        # explicit tf.while_loops and AutoGraph is off: AutoGraph rewrites Python loops from the source
        # file, and when that fails (it did once in CI) it runs the loop unconverted, which cannot work.
        features = tf.TensorSpec([None, self.encoder.input_shape[-1]], tf.float32)
        scalar = tf.TensorSpec([], tf.int32)
        self._greedy = tf.function(self._greedy_ids, input_signature=[features, scalar, scalar], autograph=False)
        self._sample = tf.function(self._sampled_ids, autograph=False,
                                   input_signature=[features, tf.TensorSpec([None, 2], tf.int32)])
        self._beam = tf.function(self._beam_ids, input_signature=[features, scalar, scalar,
                                                                  tf.TensorSpec([], tf.float32), scalar],
                                 autograph=False)

    @classmethod
    def load(cls, model_dir: str | Path) -> Captioner:
        import captioning.model  # noqa: F401  registers the custom loss and metric

        model_dir = Path(model_dir)
        model = keras.models.load_model(model_dir / layout.MODEL_FILE, compile=False)
        statistics_file = model_dir / layout.NGRAM_STATISTICS
        statistics = consensus.NgramStatistics.load(statistics_file) if statistics_file.is_file() else None
        index_file = model_dir / layout.NEIGHBOUR_INDEX
        neighbour_index = NeighbourIndex.load(index_file) if index_file.is_file() else None
        return cls(model, Vocabulary.load(model_dir / layout.VOCAB_FILE), statistics, neighbour_index)

    def _log_probs(self, tokens, states, first_step, history, no_repeat_ngram):
        """Next-word log-probabilities of each row, after the rules above; `history` is (rows, words so far)."""
        outputs = self.step([tokens[:, None], *states], training=False)
        logits = outputs[0] + self.banned + tf.cast(first_step, tf.float32) * self.no_end
        log_probs = tf.nn.log_softmax(logits)
        repeats = repeated_ngram_mask(history, no_repeat_ngram, len(self.vocab))
        return tf.where(repeats, NEG_INF, log_probs), list(outputs[1:])

    def _greedy_ids(self, features, max_length: int, no_repeat_ngram: int):
        return self._one_path(features, max_length, no_repeat_ngram,
                              lambda t, log_probs: tf.argmax(log_probs, axis=-1, output_type=tf.int32))

    def _sampled_ids(self, features, seeds):
        """One caption per row drawn word by word from the model's distribution (under the rules above,
        without n-gram blocking): what self-critical training (scst.py) learns from. Word t is drawn with
        the stateless seed `seeds[t]`, so the same seeds give the same captions; len(seeds) is the
        maximum length."""
        return self._one_path(features, tf.shape(seeds)[0], 0, lambda t, log_probs: tf.random.stateless_categorical(
            log_probs, 1, seed=seeds[t], dtype=tf.int32)[:, 0])

    def _one_path(self, features, max_length, no_repeat_ngram, choose):
        """Greedy or sampled decoding: one word per row and step, `choose(t, log_probs)` picks it."""
        batch = tf.shape(features)[0]

        def step(t, tokens, states, done, history):
            log_probs, states = self._log_probs(tokens, states, tf.equal(t, 0), history, no_repeat_ngram)
            tokens = tf.where(done, PAD_ID, choose(t, log_probs))
            history = tf.concat([history, tokens[:, None]], axis=1)
            return t + 1, tokens, states, done | tf.equal(tokens, END_ID), history

        start = (tf.constant(0), tf.fill([batch], START_ID), list(self.encoder(features, training=False)),
                 tf.zeros([batch], tf.bool), tf.zeros([batch, 0], tf.int32))
        *_, history = _repeat(step, start, max_length)
        return history

    def sample_ids(self, features: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """(rows, len(seeds)) word ids of sampled captions, <pad> after <end> (see `_sampled_ids`)."""
        return self._sample(tf.constant(np.asarray(features, np.float32)),
                            tf.constant(np.asarray(seeds, np.int32))).numpy()

    def _beam_ids(self, features, beam_size: int, max_length: int, length_penalty: float, no_repeat_ngram: int):
        batch = tf.shape(features)[0]
        vocab = len(self.vocab)
        is_end = tf.equal(tf.range(vocab), END_ID)

        def normalise(scores, lengths):
            return scores / tf.pow(tf.maximum(lengths, 1.0), length_penalty)

        # A caption that ends leaves the beam for a pool of the beam_size best finished ones (as in Hugging
        # Face and OpenNMT). Left in the beam, it was pushed out by partial captions that scored higher so far
        # but lower once longer, and beam search returned a less probable caption than one it had found.
        # An image is done once its pool is full and no partial caption can beat the pool's worst one
        # (exact without a length penalty, where a longer caption only loses probability); with beam width 1
        # that is where greedy stops.
        def step(t, tokens, states, scores, history, pool_scores, pool_lengths, done, pool):
            log_probs, states = self._log_probs(tokens, states, tf.equal(t, 0),
                                                tf.reshape(history, [batch * beam_size, -1]), no_repeat_ngram)
            candidates = scores[:, :, None] + tf.reshape(log_probs, [batch, beam_size, vocab])
            # An <end> counts when it ranks among the beam_size best next steps. A beam wider than the words
            # allowed here fills up with placeholders (a banned or blocked word, or a start-up beam): their
            # <end> never counts.
            best, flat = tf.math.top_k(tf.reshape(candidates, [batch, beam_size * vocab]), k=beam_size)
            ends = tf.equal(flat % vocab, END_ID) & _real(best) & ~done[:, None]
            ended = tf.concat([tf.gather(history, flat // vocab, batch_dims=1),
                               tf.fill([batch, beam_size, 1], END_ID)], axis=2)
            # Merge them into the pool, the pool first so that ties keep the caption found first.
            merged_scores = tf.concat([pool_scores, tf.where(ends, best, NEG_INF * 2.0)], axis=1)
            merged_lengths = tf.concat([pool_lengths, tf.fill([batch, beam_size], tf.cast(t + 1, tf.float32))], axis=1)
            merged = tf.concat([tf.concat([pool, tf.fill([batch, beam_size, 1], PAD_ID)], axis=2), ended], axis=1)
            _, kept = tf.math.top_k(tf.where(_real(merged_scores), normalise(merged_scores, merged_lengths),
                                             NEG_INF * 10.0), k=beam_size)
            pool_scores = tf.gather(merged_scores, kept, batch_dims=1)
            pool_lengths = tf.gather(merged_lengths, kept, batch_dims=1)
            pool = tf.gather(merged, kept, batch_dims=1)
            # The beam goes on with the best partial captions.
            scores, flat = tf.math.top_k(tf.reshape(tf.where(is_end, NEG_INF * 2.0, candidates),
                                                    [batch, beam_size * vocab]), k=beam_size)
            parent = flat // vocab
            word = tf.cast(flat % vocab, tf.int32)
            history = tf.concat([tf.gather(history, parent, batch_dims=1), word[:, :, None]], axis=2)
            rows = tf.reshape(tf.range(batch)[:, None] * beam_size + parent, [-1])
            states = [tf.gather(s, rows) for s in states]
            worst = tf.reduce_min(normalise(pool_scores, pool_lengths), axis=1)
            full = tf.reduce_all(_real(pool_scores), axis=1)
            done = done | (full & (worst >= normalise(scores[:, 0], tf.cast(t + 1, tf.float32))))
            return t + 1, tf.reshape(word, [-1]), states, scores, history, pool_scores, pool_lengths, done, pool

        # Only the first beam is live at the start, so the first expansion is not k copies of one word.
        first = tf.concat([[0.0], tf.fill([beam_size - 1], NEG_INF)], axis=0)
        empty = tf.zeros([batch, beam_size, 0], tf.int32)
        start = (tf.constant(0), tf.fill([batch * beam_size], START_ID),
                 [tf.repeat(s, beam_size, axis=0) for s in self.encoder(features, training=False)],
                 tf.tile(first[None, :], [batch, 1]),  # (batch, beam) summed log-probs
                 empty, tf.fill([batch, beam_size], NEG_INF * 2.0), tf.ones([batch, beam_size]),
                 tf.zeros([batch], tf.bool), empty)
        _, _, _, scores, history, pool_scores, pool_lengths, _, pool = _repeat(step, start, max_length, growing=(4, 8))
        # Score by length-normalised log-probability. When any caption finished, the finished ones are the
        # final beams; when none did, the partial ones of max_length words are.
        # The pick among the final beams happens in `choose_beams` (plain argmax, or a rerank).
        finished = tf.reduce_any(_real(pool_scores), axis=1, keepdims=True)
        scores = tf.where(finished, pool_scores, scores)
        normalised = normalise(scores, tf.where(finished, pool_lengths, tf.cast(max_length, tf.float32)))
        return tf.where(finished[:, :, None], pool, history), tf.where(_real(scores), normalised, NEG_INF * 10.0)

    def caption_ids(self, features: np.ndarray, *, method: str, beam_size: int, max_length: int,
                    length_penalty: float, batch_size: int, rerank: str, no_repeat_ngram: int,
                    neighbours: int | None = None, progress: bool = False) -> list[np.ndarray]:
        """Each image's caption as word ids. The settings have no defaults: params.yaml's `decode` section
        is their one source (`**read_section("decode").as_kwargs()`, as evaluate passes them), so a library
        caller cannot decode otherwise than the pipeline without saying so. `neighbours` is needed only by
        `rerank: neighbours` (which stops without it)."""
        self.require_rerank_support(method, rerank)
        results = []
        with tqdm(total=len(features), desc=f"{method} decoding", unit="img", disable=not progress) as bar:
            for start in range(0, len(features), batch_size):
                rows = np.asarray(features[start:start + batch_size], np.float32)
                if method == "greedy":
                    ids = self.greedy_ids(rows, max_length, no_repeat_ngram)
                else:
                    beams, scores = self.final_beams(rows, beam_size, max_length, length_penalty, no_repeat_ngram)
                    ids = self.choose_beams(rows, beams, scores, rerank, neighbours)
                results.extend(np.asarray(ids))
                bar.update(len(rows))
        return results

    def require_rerank_support(self, method: str, rerank: str) -> None:
        """Stop with one line, before any decoding, when these settings need statistics the model lacks."""
        if method != "beam" or rerank == "none":
            return
        needed = {layout.NGRAM_STATISTICS: self.statistics}
        if rerank == "neighbours":
            needed[layout.NEIGHBOUR_INDEX] = self.neighbour_index
        missing = [name for name, loaded in needed.items() if loaded is None]
        if missing:
            raise UserError(f"decode.rerank: {rerank} needs {' and '.join(missing)} beside the model (written by "
                            "train_lstm), and this model has none. Retrain it with `dvc repro`, or set "
                            "decode.rerank: none.")

    def greedy_ids(self, features, max_length: int, no_repeat_ngram: int) -> np.ndarray:
        """Greedy captions' word ids (rows, max_length) for one batch of features, <pad> after <end>."""
        return self._greedy(tf.constant(np.asarray(features, np.float32)), tf.constant(max_length),
                            tf.constant(no_repeat_ngram)).numpy()

    def final_beams(self, features, beam_size: int, max_length: int, length_penalty: float,
                    no_repeat_ngram: int) -> tuple[np.ndarray, np.ndarray]:
        """Every image's final beams (image, beam, word ids) and their scores, before the pick:
        what the server shows as the alternatives to the chosen caption."""
        beams, scores = self._beam(tf.constant(np.asarray(features, np.float32)), tf.constant(beam_size),
                                   tf.constant(max_length), tf.constant(length_penalty, tf.float32),
                                   tf.constant(no_repeat_ngram))
        return beams.numpy(), scores.numpy()

    def captions(self, features: np.ndarray, **settings) -> list[str]:
        return [self.vocab.decode(ids) for ids in self.caption_ids(features, **settings)]

    def choose_beams(self, features: np.ndarray, beams: np.ndarray, scores: np.ndarray, rerank: str,
                     neighbours: int | None = None) -> list[np.ndarray]:
        """Each image's pick among its final beams (`final_beams`' output for the rows of `features`);
        `neighbours` (decode.neighbours) is how many nearest training photos the `neighbours` rerank asks."""
        if rerank == "neighbours":
            if not neighbours:
                raise ValueError("rerank 'neighbours' needs the number of neighbours (decode.neighbours)")
            references = [[v for photo in photos for v in self._caption_vectors(int(photo))]
                          for photos in self.neighbour_index.nearest_photos(features, neighbours)]
        else:
            references = [None] * len(beams)
        return [self.choose_beam(b, s, rerank, r) for b, s, r in zip(beams, scores, references, strict=True)]

    def _caption_vectors(self, photo: int) -> list[tuple]:
        """CIDEr-D vectors of training photo `photo`'s captions. Vectorising is most of the neighbours
        rerank's cost, and the same photos are neighbours of many images, so each is done once; the cache
        holds at most every training photo, as the index itself does."""
        if photo not in self._photo_vectors:
            self._photo_vectors[photo] = [self.statistics.vector(c) for c in self.neighbour_index.captions[photo]]
        return self._photo_vectors[photo]

    def choose_beam(self, beams: np.ndarray, scores: np.ndarray, rerank: str,
                    references: list[tuple] | None = None) -> np.ndarray:
        """Pick one of an image's final beams (rows of `beams`, scored by `scores`).

        `none`: the highest score. `consensus`: minimum Bayes risk with CIDEr-D as the utility over
        the live beams, weighted by their probabilities (see `captioning.consensus`). `neighbours`: the
        highest CIDEr-D against `references`, the vectors (`NgramStatistics.vector`) of the captions of the
        training photos nearest the image (see `captioning.neighbours`).
        """
        live = np.flatnonzero(scores > NEG_INF)
        if rerank == "none" or len(live) < 2:
            return beams[int(np.argmax(scores))]
        captions = [self.vocab.decode(beams[i]) for i in live]
        if rerank == "neighbours":
            return beams[live[consensus.neighbour_consensus_index(captions, scores[live], references,
                                                                  self.statistics)]]
        return beams[live[consensus.consensus_index(captions, scores[live], self.statistics)]]


def word_rules(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Additive logit masks of the rules every decoder follows: `banned` (<pad>, <start> and <unk>,
    never emitted) and `no_end` (added at the first word only: no empty captions)."""
    banned = np.zeros(vocab_size, np.float32)
    banned[[PAD_ID, START_ID, UNK_ID]] = NEG_INF
    no_end = np.zeros(vocab_size, np.float32)
    no_end[END_ID] = NEG_INF
    return banned, no_end


def _repeat(step, start: tuple, times, growing: tuple[int, ...] = (-1,)) -> tuple:
    """Run `step(t, *state) -> (t + 1, *new state)` `times` times from `start` (t = 0 first) in one
    tf.while_loop. The loop variables at `growing` (word histories) gain a column each step, so only their
    last dimension is left open; every other variable keeps its shape."""
    invariants = [tf.nest.map_structure(lambda v: v.shape, value) for value in start]
    for index in growing:
        invariants[index] = start[index].shape[:-1] + [None]
    return tf.while_loop(lambda t, *_: t < times, step, start, shape_invariants=tuple(invariants))


def repeated_ngram_mask(history, n, vocab_size: int):
    """(rows, vocab) bool: True where the word would complete an n-gram the row already holds.

    For every earlier position j whose n-1 words equal the row's last n-1 words, the word that followed
    them is banned: with n = 1 (an empty window, which every position matches) every word the row holds,
    as Hugging Face's no_repeat_ngram_size=1 does; n = 0 bans nothing (blocking off). The history is padded on
    the left with n-1 ids that no word has (-1), so the row's "last n-1 words" exist from the first step and
    never match a real earlier window.
    """
    rows, length = tf.shape(history)[0], tf.shape(history)[1]
    # Only 0 means off: `decode.no_repeat_ngram: 1` passes params.yaml's check and must not be silently ignored.
    enabled = n >= 1
    n = tf.maximum(n, 1)
    padded = tf.concat([tf.fill([rows, n - 1], -1), history], axis=1)
    positions, prefix = tf.range(length), tf.range(n - 1)  # one (n-1 words, follower) pair per word so far
    earlier = tf.gather(padded, positions[:, None] + prefix[None, :], axis=1)  # (rows, length, n-1)
    last = padded[:, length:]  # the last n-1 entries
    matches = tf.reduce_all(tf.equal(earlier, last[:, None, :]), axis=2) & enabled
    followers = tf.gather(padded, positions + n - 1, axis=1)  # (rows, length): the word after each window
    where = tf.where(matches)  # (hits, 2): row, position
    words = tf.gather_nd(followers, where)
    hits = tf.scatter_nd(tf.stack([tf.cast(where[:, 0], tf.int32), words], axis=1), tf.ones_like(words),
                         [rows, vocab_size])
    return hits > 0
