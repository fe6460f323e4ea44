"""Caption metrics through pycocoevalcap, the COCO caption evaluation code: BLEU-1..4, METEOR,
ROUGE-L and CIDEr. Nothing here re-implements a metric.

Both candidates and references go through `clean_caption` (the same cleaning as training and
decoding) instead of the PTB tokenizer, which needs Java. METEOR needs Java too: without it the
score is None and one line says why. SPICE downloads models at run time and is not offered.
"""
from __future__ import annotations

import shutil
import sys

import pandas as pd
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from tqdm import tqdm

from captioning.text import clean_caption

METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


class _MeteorProcess:
    """METEOR's Java scorer, started once and reused. Starting it (loading its paraphrase tables) takes
    about 6 s on 2 cores and a scoring of hundreds of captions well under one; each scoring is independent
    of the ones before it. Started at construction, so Java loads while the caller does other work
    (evaluate loads TensorFlow and the model meanwhile)."""

    def __init__(self):
        self.meteor, self.why = None, None
        if shutil.which("java") is None:
            self.why = "java not found (install openjdk-17-jre-headless)"
            return
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            self.meteor = Meteor()
        except Exception as err:  # the Java process can fail in many ways; scoring must go on
            self.why = f"METEOR's Java scorer failed to start ({type(err).__name__}: {err})"

    def score(self, gts: dict, res: dict) -> tuple[float | None, list | None, str | None]:
        """METEOR, or (None, None, reason) when Java cannot run it."""
        if self.meteor is None:
            return None, None, self.why
        try:
            score, per_image = self.meteor.compute_score(gts, res)
            return float(score), [float(s) for s in per_image], None
        except Exception as err:  # a half-read answer leaves the process unusable: later calls say why
            java_said = self.close()
            # A broken pipe alone does not say why; Java's own last words do ("Could not reserve ... heap").
            self.why = f"METEOR's Java scorer failed ({type(err).__name__}: {err})" + (
                f"; java said: {java_said}" if java_said else "")
            return None, None, self.why

    def close(self) -> str:
        """Stop the Java process; return the last line it wrote on stderr, if any. Not through pycocoevalcap's
        `Meteor.__del__` alone: a `compute_score` that raised (Java died, or never started: `java` found but
        unable to run) leaves the wrapper's lock held, and `__del__` waits on that lock forever, so the caller
        hung instead of getting METEOR null."""
        meteor, self.meteor = self.meteor, None
        lock, process = getattr(meteor, "lock", None), getattr(meteor, "meteor_p", None)
        if lock is not None and lock.locked():  # only this scorer's own calls take it, and none is running now
            lock.release()
        last_words = ""
        if process is not None:
            process.kill()
            process.wait()
            try:  # the process is gone, so this reads what is in the pipe and stops
                lines = process.stderr.read().decode(errors="replace").strip().splitlines()
                last_words = lines[-1].strip() if lines else ""
            except (OSError, ValueError):
                pass
            for stream in (process.stdin, process.stdout, process.stderr):
                try:
                    stream.close()
                except OSError:  # a broken pipe's unwritten bytes: the process is gone anyway
                    pass
        return last_words


class CaptionScorer:
    """Scores several candidate sets against references (evaluate's model and baselines) with one
    METEOR process; `score_captions` is the one-off form. Use as a context manager."""

    def __init__(self, meteor: bool = True):
        self._meteor = _MeteorProcess() if meteor else None
        self._reasons_told: set[str] = set()  # why METEOR is missing, said once, not once per scoring

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        if self._meteor is not None:
            self._meteor.close()

    def wait_until_ready(self) -> None:
        """Block until METEOR's Java has loaded (by scoring one word), so that timings taken next leave it out."""
        if self._meteor is not None:
            self._meteor.score({"probe": ["ready"]}, {"probe": ["ready"]})

    def score(self, candidates: dict[str, str], references: dict[str, list[str]],
              progress: str | None = None) -> tuple[dict, pd.DataFrame]:
        """Corpus scores under METRIC_KEYS and a per-image table (image, bleu4, meteor, rouge_l, cider).

        With `progress` (a label), a bar advances per metric: pycocoevalcap scores a whole corpus per call.
        """
        keys = sorted(candidates)
        if set(keys) != set(references):
            raise ValueError("candidates and references must cover the same images")
        if not keys:
            raise ValueError("nothing to score")
        res = {k: [clean_caption(candidates[k])] for k in keys}
        gts = {k: [clean_caption(r) for r in references[k]] for k in keys}

        scorers = {"BLEU": lambda: Bleu(4).compute_score(gts, res, verbose=0),
                   "ROUGE-L": lambda: Rouge().compute_score(gts, res),
                   "CIDEr": lambda: Cider().compute_score(gts, res)}
        if self._meteor is not None:
            scorers["METEOR"] = lambda: self._meteor.score(gts, res)
        scores = {}
        with tqdm(scorers, desc=progress, unit="metric", disable=progress is None) as bar:
            for name in bar:
                bar.set_postfix_str(name)
                scores[name] = scorers[name]()
        (bleu, bleu_per_image), (rouge, rouge_per_image), (cider, cider_per_image) = (
            scores["BLEU"], scores["ROUGE-L"], scores["CIDEr"])
        meteor_score, meteor_per_image, why = scores.get("METEOR", (None, None, "not requested"))
        if self._meteor is not None and why and why not in self._reasons_told:
            self._reasons_told.add(why)
            print(f"METEOR not computed: {why}", file=sys.stderr)

        corpus = {f"bleu{n + 1}": float(bleu[n]) for n in range(4)}
        corpus.update(meteor=meteor_score, rouge_l=float(rouge), cider=float(cider))
        per_image = pd.DataFrame({
            "image": keys,
            "bleu4": [float(s) for s in bleu_per_image[3]],
            "meteor": meteor_per_image if meteor_per_image else [None] * len(keys),
            "rouge_l": [float(s) for s in rouge_per_image],
            "cider": [float(s) for s in cider_per_image],
        })
        return corpus, per_image


def score_captions(candidates: dict[str, str], references: dict[str, list[str]],
                   meteor: bool = True, progress: str | None = None) -> tuple[dict, pd.DataFrame]:
    """One scoring: `CaptionScorer.score` with a METEOR process of its own."""
    with CaptionScorer(meteor) as scorer:
        return scorer.score(candidates, references, progress)
