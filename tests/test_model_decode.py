"""The decoder's structure, its masked loss and metric, and the decoding rules (tiny sizes)."""
import inspect

import numpy as np
import pytest
from helpers import TOY_CAPTIONS, fit_toy_decoder, plain_decode

from captioning.decode import NEG_INF, Captioner
from captioning.model import (
    NUM_LSTM_LAYERS,
    MaskedAccuracy,
    masked_loss,
)
from captioning.params import SCHEMA
from captioning.tf_setup import keras
from captioning.vocab import END_ID, PAD_ID, START_ID, UNK_ID

CAPTIONS = TOY_CAPTIONS


@pytest.fixture(scope="module")
def trained():
    model, vocab, features = fit_toy_decoder(seed=0, epochs=40)
    return Captioner(model, vocab), features, model


def test_decoding_has_no_settings_of_its_own(trained):
    """caption_ids' defaults (rerank none, no n-gram blocking) differed from params.yaml's (neighbours rerank,
    no_repeat_ngram 3): a library caller decoded otherwise than evaluate, the caption command and the server
    without a word. params.yaml's `decode` section is now the one source: every setting must be passed (all
    of DecodeSettings.as_kwargs()), and so must the ones the server passes to final_beams and choose_beams."""
    captioner, features, _ = trained
    for method, settings in ((captioner.caption_ids, SCHEMA["decode"]),
                             (captioner.final_beams, ("beam_size", "max_length", "length_penalty", "no_repeat_ngram")),
                             (captioner.choose_beams, ("rerank",))):
        parameters = inspect.signature(method).parameters
        for name in settings:
            # `neighbours` alone may be left out: only rerank neighbours uses it, and stops without it
            assert parameters[name].default is inspect.Parameter.empty or name == "neighbours", (method, name)
    assert inspect.signature(captioner.caption_ids).parameters["neighbours"].default is None
    with pytest.raises(TypeError, match="missing 7 required keyword-only arguments"):
        captioner.caption_ids(features)


def test_architecture_five_lstms_l1_one_dropout(trained):
    model = trained[2]
    lstms = [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
    assert len(lstms) == NUM_LSTM_LAYERS == 5
    for lstm in lstms:
        assert isinstance(lstm.kernel_regularizer, keras.regularizers.L1)
        assert isinstance(lstm.recurrent_regularizer, keras.regularizers.L1)
    assert sum(isinstance(layer, keras.layers.Dropout) for layer in model.layers) == 1
    assert model.get_layer("logits").activation is keras.activations.linear  # logits, loss from_logits
    assert len(model.losses) >= 2 * NUM_LSTM_LAYERS  # the L1 penalties reach the training loss


def test_masked_loss_and_accuracy_ignore_padding():
    targets = np.array([[5, 6, PAD_ID, PAD_ID]])
    logits = np.full((1, 4, 8), -5.0, np.float32)
    logits[0, 0, 5] = 5.0  # right
    logits[0, 1, 7] = 5.0  # wrong
    logits[0, 2:, 3] = 50.0  # padding positions: anything, must not count
    per_token = keras.losses.sparse_categorical_crossentropy(targets[:, :2], logits[:, :2], from_logits=True)
    assert float(masked_loss(targets, logits)) == pytest.approx(float(np.mean(per_token)), rel=1e-5)
    metric = MaskedAccuracy()
    metric.update_state(targets, logits)
    assert float(metric.result()) == pytest.approx(0.5)


def test_model_learns_and_decodes(trained):
    captioner, features, _ = trained
    assert captioner.captions(features, **plain_decode(method="greedy", max_length=10)) == CAPTIONS
    for size in (1, 3):  # any batch size, one image included, through the same compiled function
        assert captioner.captions(features[:size], **plain_decode(method="beam", beam_size=3, max_length=10)) \
            == CAPTIONS[:size]


def test_decoding_does_not_need_autograph(trained, monkeypatch):
    """CI once saw AutoGraph fail to convert the beam loop and run it as plain Python, which cannot
    iterate a symbolic tensor. Blinding AutoGraph to every source file reproduces that failure in the
    old `for t in tf.range(...)` loops; the explicit while-loops must not care."""
    from tensorflow.python.autograph.pyct import inspect_utils  # private: the one place AutoGraph reads source

    def no_source(*_args, **_kwargs):
        raise OSError("source code not available")

    monkeypatch.setattr(inspect_utils, "getimmediatesource", no_source)
    captioner, features, model = trained
    fresh = Captioner(model, captioner.vocab)  # new tf.functions, traced with AutoGraph blind
    assert fresh.captions(features, **plain_decode(method="greedy", max_length=10)) == CAPTIONS
    assert fresh.captions(features, **plain_decode(method="beam", beam_size=3, max_length=10)) == CAPTIONS


def test_beam_width_one_equals_greedy(trained):
    captioner, features, _ = trained
    noisy = features + np.random.default_rng(1).normal(scale=2.0, size=features.shape).astype("float32")
    for batch in (features, noisy):
        greedy = captioner.caption_ids(batch, **plain_decode(method="greedy", max_length=10))
        beam = captioner.caption_ids(batch, **plain_decode(method="beam", beam_size=1, max_length=10,
                                                           length_penalty=0.7))
        assert [list(g) for g in greedy] == [list(b) for b in beam]


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_never_emits_specials_nor_empty(trained, method):
    captioner, features, _ = trained
    noisy = np.random.default_rng(2).normal(scale=5.0, size=(16, features.shape[1])).astype("float32")
    for ids in captioner.caption_ids(noisy, **plain_decode(method=method, beam_size=3, max_length=4)):
        words = list(ids)
        assert len(words) == 4
        assert not {PAD_ID, START_ID, UNK_ID} & set(words[: words.index(END_ID)] if END_ID in words else words)
        assert words[0] != END_ID  # never an empty caption
    assert all(captioner.captions(noisy, **plain_decode(method=method, beam_size=3, max_length=1)))


def test_a_beam_wider_than_the_allowed_words_keeps_only_real_beams(trained):
    """The toy vocabulary allows 10 first words: 16 beams fill up with placeholders, which must neither
    end the real beams (empty captions) nor show up among the final beams."""
    captioner, features, _ = trained
    allowed_first_words = len(captioner.vocab) - 4  # no <pad>, <start>, <unk>, and no <end> first
    wide = allowed_first_words + 6
    for max_length in (1, 10):
        expected = captioner.captions(features, **plain_decode(method="beam", beam_size=3, max_length=max_length))
        assert captioner.captions(features, **plain_decode(method="beam", beam_size=wide,
                                                           max_length=max_length)) == expected
    for length_penalty in (0.0, 1.0):
        beams, scores = captioner.final_beams(features, wide, 1, length_penalty, 0)  # one word: only 10 can exist
        real = scores > NEG_INF  # the server lists these as the alternatives
        assert (real.sum(axis=1) == allowed_first_words).all()
        assert all(ids[0] not in (PAD_ID, START_ID, UNK_ID, END_ID) for ids in beams[real])


class BigramCaptioner(Captioner):
    """A Captioner whose "decoder" is a table of next-word log-probabilities given the previous word, so
    a test can lay out exactly which captions beam search meets."""

    def __init__(self, vocab, log_probs: np.ndarray):
        from captioning.decode import word_rules
        from captioning.tf_setup import tf

        self.vocab, self.statistics, self.neighbour_index = vocab, None, None
        table = tf.constant(log_probs, tf.float32)
        self.encoder = lambda features, training=False: [tf.zeros([tf.shape(features)[0], 1])]
        self.step = lambda inputs, training=False: [tf.gather(table, inputs[0][:, 0]), inputs[1]]
        self.banned, self.no_end = (tf.constant(mask) for mask in word_rules(len(vocab)))
        features, scalar = tf.TensorSpec([None, 1], tf.float32), tf.TensorSpec([], tf.int32)
        self._greedy = tf.function(self._greedy_ids, input_signature=[features, scalar, scalar], autograph=False)
        self._beam = tf.function(self._beam_ids, autograph=False, input_signature=[
            features, scalar, scalar, tf.TensorSpec([], tf.float32), scalar])


def test_beam_search_keeps_a_finished_caption_that_partial_ones_outscore_for_a_while():
    """'b <end>' ranks among the 2 best at step 2, but the next step's partial captions 'a c e' and 'a c f'
    score higher, and they end far less probable. Kept in the beam, the finished caption was pushed out and
    beam 2 answered 'a c e' (only beam 3 kept 'b'); it must answer 'b', and its alternatives must all end."""
    from captioning.vocab import Vocabulary

    fillers = [f"g{i}" for i in range(19)]
    vocab = Vocabulary(["a", "b", "c", "e", "f", *fillers])
    log_probs = np.full((len(vocab), len(vocab)), -30.0)
    follows = {START_ID: {"a": 0.9, "b": 0.1}, "a": {"c": 0.97}, "b": {END_ID: 0.9}, "c": {"e": 0.45, "f": 0.45},
               **{w: {END_ID: 0.06, **{g: 0.94 / 19 for g in fillers}} for w in ("e", "f", *fillers)}}
    for previous, probabilities in follows.items():
        for word, probability in probabilities.items():
            log_probs[vocab.stoi.get(previous, previous), vocab.stoi.get(word, word)] = np.log(probability)
    captioner = BigramCaptioner(vocab, log_probs)
    features = np.zeros((2, 1), np.float32)
    for length_penalty in (0.0, 0.5):
        for beam_size in (2, 3):
            assert captioner.captions(features, **plain_decode(method="beam", beam_size=beam_size, max_length=6,
                                                               length_penalty=length_penalty)) == ["b", "b"]
            beams, scores = captioner.final_beams(features, beam_size, 6, length_penalty, 0)
            live = scores > NEG_INF
            assert live.sum(axis=1).min() >= 2
            assert all(END_ID in list(ids) for ids in beams[live])  # a caption ended: no partial one offered
        # Beam width 1 still stops where greedy stops.
        assert captioner.captions(features, **plain_decode(method="beam", beam_size=1, max_length=6,
                                                           length_penalty=length_penalty)) \
            == captioner.captions(features, **plain_decode(method="greedy", max_length=6))


def _ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_ngram_of_no_repeat_ngram_words_occurs_twice(n):
    """decode.no_repeat_ngram: n (README: no n-gram of n words twice in a caption, as Hugging Face's
    no_repeat_ngram_size). A bigram decoder that loops 'a b a b ..' shows the blocking at work; n = 1 was
    accepted by params.yaml but blocked nothing, so its captions repeated words."""
    from captioning.vocab import Vocabulary

    vocab = Vocabulary(["a", "b", "c", "d", "e"])
    features = np.zeros((1, 1), np.float32)
    tables = [np.random.default_rng(seed).normal(scale=3.0, size=(len(vocab), len(vocab))) for seed in range(4)]
    loop = np.full((len(vocab), len(vocab)), -5.0)
    loop[START_ID, 4] = loop[4, 5] = loop[5, 4] = 3.0  # <start> a b a b ...
    for table in [loop, *tables]:
        captioner = BigramCaptioner(vocab, table)
        for method in ("greedy", "beam"):
            settings = {"method": method, "beam_size": 3, "max_length": 10}
            if table is loop and method == "greedy":  # without blocking it loops: the check below is not vacuous
                looping = captioner.captions(features, **plain_decode(**settings, no_repeat_ngram=0))[0].split()
                assert len(set(_ngrams(looping, n))) < len(_ngrams(looping, n))
            words = captioner.captions(features, **plain_decode(**settings, no_repeat_ngram=n))[0].split()
            assert words and len(set(_ngrams(words, n))) == len(_ngrams(words, n)), (method, words)
        beams, scores = captioner.final_beams(features, 3, 10, 0.0, n)
        for ids in beams[scores > NEG_INF]:
            words = vocab.decode(ids).split()
            assert len(set(_ngrams(words, n))) == len(_ngrams(words, n)), words


def test_unfinished_caption_is_returned_at_max_length(trained):
    captioner, features, _ = trained
    for method in ("greedy", "beam"):
        captions = captioner.captions(features, **plain_decode(method=method, beam_size=3, max_length=2))
        assert all(1 <= len(c.split()) <= 2 for c in captions)
        assert captions[1] == "two blue"  # cut at 2 words, the partial caption is kept


def test_consensus_rerank_picks_the_beam_the_others_agree_with(trained):
    from captioning.consensus import NgramStatistics
    from captioning.decode import NEG_INF
    from captioning.errors import UserError

    captioner, features, model = trained
    vocab = captioner.vocab
    with pytest.raises(UserError, match="rerank: none"):  # no n-gram statistics: say so, don't guess
        captioner.caption_ids(features, **plain_decode(method="beam", rerank="consensus"))

    def ids(text: str) -> list[int]:
        return ([vocab.stoi[w] for w in text.split()] + [END_ID, PAD_ID, PAD_ID])[:5]

    beams = np.array([ids("a red square"),         # most probable, shares little with the others
                      ids("a red circle"),         # the caption the others agree with
                      ids("a red circle circle"),
                      ids("two red circle"),
                      ids("three blue circle")])
    scores = np.array([-1.0, -1.1, -1.2, -1.3, NEG_INF * 10])  # the last beam never finished: out
    reranking = Captioner(model, vocab, NgramStatistics.from_captions([[c] for c in CAPTIONS]))
    assert list(reranking.choose_beam(beams, scores, "none")) == list(beams[0])
    assert list(reranking.choose_beam(beams, scores, "consensus")) == list(beams[1])
    assert list(reranking.choose_beam(beams[:1], scores[:1], "consensus")) == list(beams[0])  # width 1: greedy's pick
    assert len(reranking.captions(features, **plain_decode(method="beam", rerank="consensus"))) == len(features)


def test_neighbours_rerank_picks_the_beam_the_nearest_photos_captions_agree_with(trained):
    from captioning.consensus import NgramStatistics
    from captioning.errors import UserError
    from captioning.neighbours import NeighbourIndex

    captioner, features, model = trained
    statistics = NgramStatistics.from_captions([[c] for c in CAPTIONS])
    without_index = Captioner(model, captioner.vocab, statistics)
    with pytest.raises(UserError, match="neighbours.npz"):  # a model saved before the index existed
        without_index.caption_ids(features, **plain_decode(method="beam", rerank="neighbours", neighbours=1))
    # Each toy photo's nearest "training photo" is itself, described with the wording of its second most
    # probable beam: the rerank must pick that beam, where plain beam search picks the first.
    beams, scores = without_index.final_beams(features, 4, 10, 0.0, 0)
    offered = [[captioner.vocab.decode(ids) for ids in image_beams[np.argsort(-image_scores, kind="stable")]]
               for image_beams, image_scores in zip(beams, scores, strict=True)]
    reranking = Captioner(model, captioner.vocab, statistics, NeighbourIndex(features, [[o[1]] for o in offered]))
    chosen = [reranking.vocab.decode(ids) for ids in reranking.choose_beams(features, beams, scores, "neighbours", 1)]
    assert chosen == [o[1] for o in offered]
    assert [reranking.vocab.decode(ids) for ids in reranking.choose_beams(features, beams, scores, "none")] == \
        [o[0] for o in offered]
    assert reranking.captions(features, **plain_decode(method="beam", beam_size=4, max_length=10, rerank="neighbours",
                                                       neighbours=1)) == chosen
    with pytest.raises(ValueError, match="decode.neighbours"):  # how many to ask has no silent default
        reranking.choose_beams(features, beams, scores, "neighbours")
