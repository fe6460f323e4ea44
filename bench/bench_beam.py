"""Beam search: our batched, compiled Captioner against a per-image Python loop (the tutorial way).

Both decode the same features with the same trained decoder (trained briefly on the demo captions
so that captions end the way real ones do) and the same rules from decode.py: width, length
penalty and max length from params.yaml, <pad>/<start>/<unk> never emitted, no <end> first.
The loop captions one image at a time and calls the Keras step model once per live beam per step,
as tutorials do; it calls the model directly rather than through model.predict (which would only
make it slower), and it stops as soon as no partial caption can beat the finished ones. The loop is
timed on the first `loop_images` of the images (it runs ~1 caption/s), in chunks whose rates are the
repeats. Our side
is traced once before timing. The captions of the two sides are compared as a correctness check.
Both pick the most probable final beam (decode.rerank none); each rerank (consensus, neighbours with
decode.neighbours) is timed on our side too and reported beside it. The neighbours index holds every
bench image, as a training set would: the features are random, so only the timing means anything.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_train import OPTIONS, decoder_data, new_decoder, new_optimizer
from common import PARAMS, median

from captioning.consensus import NgramStatistics
from captioning.decode import Captioner
from captioning.model import compile_decoder
from captioning.neighbours import NeighbourIndex
from captioning.params import RERANKS
from captioning.tf_setup import tf
from captioning.timing import Stopwatch
from captioning.train import training_batches
from captioning.vocab import END_ID, START_ID

SETTINGS = {key: PARAMS["decode"][key] for key in ("beam_size", "max_length", "length_penalty", "batch_size")}
RERANK_SETTINGS = {"neighbours": PARAMS["decode"]["neighbours"]}
# The loop knows neither n-gram blocking nor reranking: the batched side decodes without them too (each
# rerank's timing replaces only `rerank`). Captioner.caption_ids has no defaults, so this says so.
PLAIN = {"rerank": "none", "no_repeat_ngram": 0}
TIMED_RERANKS = [rerank for rerank in RERANKS if rerank != "none"]


def loop_beam(captioner: Captioner, step, features: np.ndarray, beam_size: int, max_length: int,
              length_penalty: float, **_) -> list[int]:
    """Word ids of the best caption of one image, by decode.py's rules: partial beams are (score, words,
    states); a caption whose <end> ranks among the beam_size best next steps joins the pool of the
    beam_size best finished ones, and the image is done once that pool is full and no partial caption can
    beat its worst. `step` is the Keras step model (the tutorial way) or a compiled version of it."""
    banned, no_end = captioner.banned.numpy(), captioner.no_end.numpy()

    def normalised(score: float, words: list) -> float:
        return score / max(len(words), 1) ** length_penalty

    beams = [(0.0, [], captioner.encoder(features[None], training=False))]
    finished: list[tuple[float, list]] = []
    for t in range(max_length):
        candidates = []
        for score, words, states in beams:
            token = tf.constant([[words[-1] if words else START_ID]], tf.int32)
            logits, *new_states = step([token, *states])
            logits = logits.numpy()[0] + banned + (no_end if t == 0 else 0.0)
            log_probs = logits - np.logaddexp.reduce(logits)
            for word in np.argsort(-log_probs, kind="stable")[:beam_size + 1]:  # beam_size words besides <end>
                candidates.append((score + log_probs[word], words + [int(word)], new_states))
        candidates.sort(key=lambda beam: -beam[0])
        finished += [(score, words) for score, words, _ in candidates[:beam_size] if words[-1] == END_ID]
        finished = sorted(finished, key=lambda caption: -normalised(*caption))[:beam_size]
        beams = [beam for beam in candidates if beam[1][-1] != END_ID][:beam_size]
        if len(finished) == beam_size and normalised(*finished[-1]) >= beams[0][0] / (t + 1) ** length_penalty:
            break
    return max(finished or [beam[:2] for beam in beams], key=lambda caption: normalised(*caption))[1]


def loop_rates(captioner: Captioner, step, features: np.ndarray, chunks: int) -> tuple[list, list]:
    rates, ids = [], []
    for chunk in np.array_split(np.arange(len(features)), chunks):
        with Stopwatch() as watch:
            ids += [loop_beam(captioner, step, features[i], **SETTINGS) for i in chunk]
        rates.append(len(chunk) / watch.seconds)
    return rates, ids


def run(workdir: Path, n_images: int, loop_images: int, train_epochs: int, repeats: int, loop_chunks: int) -> dict:
    table, store, vocab, data = decoder_data(workdir, n_images)
    model = new_decoder(vocab, store, data)
    compile_decoder(model, new_optimizer())
    batch_size = OPTIONS["batch_size"]
    model.fit(training_batches(data, store.matrix, batch_size, OPTIONS["seed"], 0), epochs=train_epochs,
              steps_per_epoch=-(-len(data) // batch_size), verbose=0)
    captioner = Captioner(model, vocab, NgramStatistics.from_table(table),  # what train_lstm saves
                          NeighbourIndex.from_table(table, store))
    features = np.asarray(store.matrix, np.float32)
    captioner.caption_ids(features[:SETTINGS["batch_size"]], method="beam", **SETTINGS, **PLAIN)  # trace once

    batched_rates, reranked_rates = [], {rerank: [] for rerank in TIMED_RERANKS}
    for _ in range(repeats):
        with Stopwatch() as watch:
            batched = captioner.caption_ids(features, method="beam", **SETTINGS, **PLAIN)
        batched_rates.append(len(features) / watch.seconds)
        for rerank, rates in reranked_rates.items():
            with Stopwatch() as watch:
                captioner.caption_ids(features, method="beam", **SETTINGS, **{**PLAIN, "rerank": rerank},
                                      **RERANK_SETTINGS)
            rates.append(len(features) / watch.seconds)
    looped = features[:loop_images]
    loop, loop_ids = loop_rates(captioner, lambda inputs: captioner.step(inputs, training=False), looped, loop_chunks)
    # Not the tutorial way, for scale: the same loop with the step compiled once by tf.function.
    compiled = tf.function(lambda inputs: captioner.step(inputs, training=False), reduce_retracing=True)
    loop_beam(captioner, compiled, looped[0], **SETTINGS)  # trace
    loop_compiled, _ = loop_rates(captioner, compiled, looped, loop_chunks)
    # The loop captions only the first images: compare those.
    same = np.mean([vocab.decode(a) == vocab.decode(b)
                    for a, b in zip(batched[:len(looped)], loop_ids, strict=True)])
    return {"beam_speedup": {
        "value": median(batched_rates) / median(loop),
        "captions_per_second": {"batched": median(batched_rates), "loop": median(loop)},
        "raw": {"note": f"batched: all {len(features)} images; loop: the first {len(looped)} of them",
                "images_batched": len(features), "images_loop": len(looped),
                "batched_per_repeat": batched_rates, "loop_per_chunk": loop, "rerank": "none",
                **{f"batched_with_rerank_{rerank}_per_repeat": rates for rerank, rates in reranked_rates.items()},
                "loop_with_compiled_step_per_chunk": loop_compiled,
                "speedup_over_loop_with_compiled_step": median(batched_rates) / median(loop_compiled),
                "identical_captions_fraction": float(same), "decoder_train_epochs": train_epochs,
                "mean_caption_words": float(np.mean([len(vocab.decode(ids).split()) for ids in batched])),
                **SETTINGS},
    }}
