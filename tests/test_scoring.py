"""Scoring goes through pycocoevalcap unchanged: the project's numbers equal a direct call's."""
from __future__ import annotations

import os
import shutil
import threading

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from captioning.scoring import METRIC_KEYS, CaptionScorer, score_captions
from captioning.text import clean_caption

IMAGES = 1500  # of the 8091 real images: enough for CIDEr's document frequencies, quick for METEOR
SECOND_SET = 400  # of those, scored again another way


@pytest.fixture(scope="module")
def real_references(flickr8k):
    """Each image's caption #0 as the candidate, its other four as references (cleaned once)."""
    grouped: dict[str, dict[int, str]] = {}
    for line in (flickr8k / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t", 1)
        image, number = key.rsplit("#", 1)
        grouped.setdefault(image, {})[int(number)] = caption
    images = sorted(grouped)[:IMAGES]
    candidates = {image: grouped[image][0] for image in images}
    references = {image: [grouped[image][k] for k in sorted(grouped[image]) if k != 0] for image in images}
    return candidates, references


@pytest.mark.slow  # about 20 s on 2 cores
def test_same_numbers_as_pycocoevalcap_on_real_references(real_references, monkeypatch):
    """Two sets scored by one scorer, as evaluate scores the model and its baselines: one Java start,
    and each set's numbers equal direct pycocoevalcap calls, METEOR's from a fresh Java process."""
    candidates, references = real_references
    # The second set, smaller: caption #1 as the candidate, #0 and the other three as references.
    some = sorted(candidates)[:SECOND_SET]
    swapped = {image: references[image][0] for image in some}
    swapped_references = {image: [candidates[image], *references[image][1:]] for image in some}
    java = shutil.which("java") is not None
    # Without Java the METEOR half of this comparison is left out; CI installs Java, so there that is a failure.
    assert java or os.environ.get("CI", "").lower() != "true", (
        "java is not installed, so METEOR cannot be compared: `bash scripts/setup.sh` installs it as root")
    starts = []
    start = Meteor.__init__
    monkeypatch.setattr(Meteor, "__init__", lambda self: starts.append(1) or start(self))
    with CaptionScorer(meteor=java) as scorer:
        scored = [scorer.score(candidates, references), scorer.score(swapped, swapped_references)]
    assert len(starts) == int(java)
    monkeypatch.undo()
    assert scored[0][0] != scored[1][0]
    sets = [(candidates, references), (swapped, swapped_references)]
    for (corpus, per_image), (candidate_set, reference_set) in zip(scored, sets, strict=True):
        res = {k: [clean_caption(v)] for k, v in candidate_set.items()}
        gts = {k: [clean_caption(r) for r in v] for k, v in reference_set.items()}
        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, rouge_each = Rouge().compute_score(gts, res)
        cider, cider_each = Cider().compute_score(gts, res)
        for n in range(4):
            assert corpus[f"bleu{n + 1}"] == bleu[n]
        assert corpus["rouge_l"] == rouge and corpus["cider"] == cider
        assert list(per_image["image"]) == sorted(candidate_set)
        assert list(per_image["bleu4"]) == list(bleu_each[3])
        assert list(per_image["cider"]) == list(cider_each)
        assert list(per_image["rouge_l"]) == list(rouge_each)
        if java:
            meteor, meteor_each = Meteor().compute_score(gts, res)
            assert corpus["meteor"] == pytest.approx(meteor, abs=1e-12)
            assert list(per_image["meteor"]) == pytest.approx(meteor_each, abs=1e-12)
        # Human captions against each other: a sanity range, far from a degenerate 0 or 1.
        assert 0.1 < corpus["bleu4"] < 0.5 and 0.3 < corpus["cider"] < 1.5


def test_a_meteor_failure_is_reported_and_scoring_goes_on(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(Meteor, "__init__", lambda self: None)  # no Java started
    monkeypatch.setattr(Meteor, "__del__", lambda self: None)

    asked = []

    def broken(self, gts, res):
        asked.append(1)
        raise BrokenPipeError("the Java process died")

    monkeypatch.setattr(Meteor, "compute_score", broken)
    with CaptionScorer() as scorer:
        scorer.wait_until_ready()  # as evaluate does before decoding: the process fails here
        for _ in range(2):
            corpus, per_image = scorer.score({"a": "a dog runs"}, {"a": ["a dog runs"]})
            assert corpus["meteor"] is None and per_image["meteor"].isna().all()
            assert corpus["bleu1"] == pytest.approx(1.0)
    assert len(asked) == 1  # the broken process is not asked again; its failure is still given as the reason
    errors = capsys.readouterr().err.splitlines()
    # said once, though both scorings lack METEOR (evaluate scores the model and two baselines)
    assert errors == ["METEOR not computed: METEOR's Java scorer failed (BrokenPipeError: the Java process died)"]


def test_meteor_is_null_with_a_reason_without_java(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    corpus, per_image = score_captions({"a": "a dog runs"}, {"a": ["a dog runs fast", "the dog runs"]})
    assert corpus["meteor"] is None and per_image["meteor"].isna().all()
    assert "METEOR not computed: java not found" in capsys.readouterr().err
    assert set(METRIC_KEYS) == set(corpus)


def test_scoring_uses_the_shared_cleaning():
    corpus, _ = score_captions({"a": "A Dog, running!"}, {"a": ["a dog running"]}, meteor=False)
    assert corpus["bleu1"] == pytest.approx(1.0)


def test_a_java_that_cannot_run_gives_null_meteor_instead_of_a_hang(tmp_path, monkeypatch, capsys):
    """`java` is found but exits at once (as when it cannot reserve its 2 GB heap): pycocoevalcap's wrapper
    raises with its lock held, and its `__del__` waited on that lock forever, so evaluate never ended."""
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: Could not reserve enough space for object heap' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result = []
    # A daemon thread, so that a hang fails this test instead of blocking the test run's exit.
    worker = threading.Thread(target=lambda: result.append(score_captions({"a": "a dog runs"},
                                                                          {"a": ["a dog runs fast"]})),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "scoring hung after METEOR's Java process failed"
    corpus, per_image = result[0]
    assert corpus["meteor"] is None and per_image["meteor"].isna().all()
    assert corpus["bleu1"] > 0.5  # the other metrics are still computed
    error = capsys.readouterr().err
    assert "METEOR not computed: METEOR's Java scorer failed" in error
    assert "java said: Error: Could not reserve enough space for object heap" in error  # why, not just a broken pipe
