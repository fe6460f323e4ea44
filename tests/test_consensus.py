"""The consensus rerank's utility is pycocoevalcap's CIDEr-D, with corpus document frequencies."""
import numpy as np
from pycocoevalcap.cider.cider import Cider

from captioning.consensus import NgramStatistics, consensus_index

REFERENCES = {
    "a.jpg": ["a red circle .", "a picture of a red circle .", "there is a red circle on a white background ."],
    "b.jpg": ["two blue squares .", "a pair of blue square shapes .", "two blue squares on a black background ."],
    "c.jpg": ["three green triangles .", "a photo of three green triangles .",
              "three green triangles on a white background ."],
}
CANDIDATES = {"a.jpg": "a red circle on a white background", "b.jpg": "two blue squares",
              "c.jpg": "a picture of three green triangles"}


def _statistics() -> NgramStatistics:
    return NgramStatistics.from_captions(REFERENCES[k] for k in sorted(REFERENCES))


def test_cider_equals_pycocoevalcap_when_the_corpus_is_the_references():
    # pycocoevalcap takes document frequencies from the references it scores; give ours the same corpus.
    _, expected = Cider().compute_score({k: [c.rstrip(" .") for c in v] for k, v in REFERENCES.items()},
                                        {k: [v] for k, v in CANDIDATES.items()})
    statistics = _statistics()
    ours = [statistics.cider(CANDIDATES[k], REFERENCES[k]) for k in sorted(REFERENCES)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert len(set(np.round(ours, 6))) == 3  # three different scores, so the check has teeth


def test_statistics_survive_a_save_and_load(tmp_path):
    statistics = _statistics()
    statistics.save(tmp_path / "df.json")
    loaded = NgramStatistics.load(tmp_path / "df.json")
    assert loaded.document_frequency == statistics.document_frequency and loaded.n_documents == 3
    # n-grams of one image score like unseen ones, so they are not stored (the parity test above
    # shows the scores are unchanged); n-grams of several images are.
    assert ("photo",) not in loaded.document_frequency and loaded.document_frequency[("background",)] == 3
    assert loaded.cider("a red circle", REFERENCES["a.jpg"]) == statistics.cider("a red circle", REFERENCES["a.jpg"])


def test_consensus_picks_the_caption_the_others_agree_with():
    statistics = _statistics()
    captions = ["there is a red circle on a white background",  # most probable, but long and rare
                "a red circle",                                  # the core every other caption contains
                "a picture of a red circle",
                "a red circle on a white background"]
    log_probs = np.log([0.3, 0.25, 0.25, 0.2])
    chosen = consensus_index(captions, log_probs, statistics)
    assert captions[chosen] != captions[0]
    probabilities = np.exp(log_probs)
    gains = [sum(p * statistics.cider(c, [o]) for p, o in zip(probabilities, captions, strict=True)) for c in captions]
    assert chosen == int(np.argmax(gains))  # the definition: highest probability-weighted CIDEr-D
    # Identical captions tie: the more probable one wins, as in plain beam search.
    assert consensus_index(["a red circle", "a red circle"], np.log([0.4, 0.6]), statistics) == 1
