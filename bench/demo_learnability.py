"""Can the default features see what the demo captions say? A linear probe per attribute.

Generates the demo dataset into a temporary folder, extracts average-pooled ResNet-50 features
with RANDOM weights (the pipeline default `features.weights: random`, seed 0, images resized
to 224, Keras' `preprocess_input`), and fits a multinomial logistic regression per caption
attribute (count, colour, shape, background) on a seeded 80% of the images. Held-out accuracy
on the other 20% says whether an LSTM decoder has anything to learn from. The L2 strength is
chosen on a validation slice of the training part only; the test part is used once per split,
and the whole fit is repeated over a few seeded splits to show the spread.

    .venv/bin/python bench/demo_learnability.py            # n=1500, writes bench/demo_learnability.json
    .venv/bin/python bench/demo_learnability.py --n 400    # quicker iteration
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

# The probe's matrix products are skinny (n x 2048 by 2048 x classes): multi-threaded BLAS only
# contends with itself there (3x slower on 2 busy cores). Must be set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from captioning.demo import BACKGROUNDS, COLOURS, COUNTS, SHAPES, generate_demo, plan_scenes  # noqa: E402
from captioning.files import write_json  # noqa: E402
from captioning.timing import Stopwatch  # noqa: E402

BENCH = Path(__file__).resolve().parent

ATTRIBUTES = {"count": COUNTS, "colour": tuple(COLOURS), "shape": SHAPES,
              "background": tuple(BACKGROUNDS)}
FEATURE_SIZE = 224
BATCH_SIZE = 32
BACKBONE_SEED = 0
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def extract_features(paths: list[str]) -> np.ndarray:
    """Random-weight ResNet-50, avg-pooled, float32: the pipeline's `features.weights: random`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(BACKBONE_SEED)
    model = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg",
                                        input_shape=(FEATURE_SIZE, FEATURE_SIZE, 3))

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        image = tf.image.resize(image, (FEATURE_SIZE, FEATURE_SIZE))
        return keras.applications.resnet50.preprocess_input(image)

    dataset = (tf.data.Dataset.from_tensor_slices(paths)
               .map(load, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE))
    return model.predict(dataset, verbose=0).astype(np.float32)


def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, steps: int = 400) -> np.ndarray:
    """Multinomial logistic regression by full-batch Adam; x already standardized, bias column added."""
    w = np.zeros((x.shape[1], n_classes), np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    onehot = np.eye(n_classes)[y]
    lr, b1, b2 = 0.01, 0.9, 0.999
    for t in range(1, steps + 1):
        logits = x @ w
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = x.T @ (p - onehot) / len(x) + l2 * w
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        w -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)
    return w


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    return [np.hstack([(a - mean) / std, np.ones((len(a), 1))]) for a in (train, *others)]


def accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(((x @ w).argmax(axis=1) == y).mean())


def log_loss(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    logits = x @ w
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def probe(features: np.ndarray, labels: np.ndarray, n_classes: int, train_idx, test_idx) -> dict:
    """Pick L2 on the last 20% of the training part, refit on all of it, score the test part once.

    L2 is picked by validation log-loss, not accuracy: accuracy saturates at 1.0 for the easy
    attributes and its ties would pick an over-regularised, under-fitted model.
    """
    cut = int(0.8 * len(train_idx))
    fit_idx, val_idx = train_idx[:cut], train_idx[cut:]
    xf, xv = standardize(features[fit_idx], features[val_idx])
    val_scores = {}
    for l2 in L2_GRID:
        w = fit_softmax(xf, labels[fit_idx], n_classes, l2)
        val_scores[l2] = (log_loss(w, xv, labels[val_idx]), accuracy(w, xv, labels[val_idx]))
    best = min(L2_GRID, key=lambda l2: val_scores[l2][0])
    xt, xs = standardize(features[train_idx], features[test_idx])
    w = fit_softmax(xt, labels[train_idx], n_classes, best)
    predictions = (xs @ w).argmax(axis=1)
    return {
        "test_accuracy": round(float((predictions == labels[test_idx]).mean()), 4),
        "train_accuracy": round(accuracy(w, xt, labels[train_idx]), 4),
        "chance": round(float(np.bincount(labels[test_idx]).max() / len(test_idx)), 4),  # best constant
        "l2": best,
        "val_log_loss_and_accuracy_by_l2": {str(k): [round(v, 4) for v in s] for k, s in val_scores.items()},
        "predictions": predictions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500, help="number of demo images")
    parser.add_argument("--image-size", type=int, default=128, help="demo image side (params demo.image_size)")
    parser.add_argument("--seed", type=int, default=7, help="demo seed (params demo.seed)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the first 80/20 split")
    parser.add_argument("--repeats", type=int, default=3, help="further seeded splits to average over")
    parser.add_argument("--cache", help="optional .npz to keep features in, for re-running the probe only "
                        "(keyed by n, image size and seed: delete it after changing the generator)")
    parser.add_argument("--out", default=str(BENCH / "demo_learnability.json"))
    args = parser.parse_args()

    scenes = plan_scenes(args.n, args.seed)
    key = np.array([args.n, args.image_size, args.seed])
    cached = np.load(args.cache) if args.cache and Path(args.cache).exists() else None
    if cached is not None and np.array_equal(cached["key"], key):
        features = cached["features"]
        generate_s, extract_s = float(cached["generate_s"]), float(cached["extract_s"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            with Stopwatch() as generating:
                generate_demo(tmp, n_images=args.n, image_size=args.image_size, seed=args.seed)
            paths = [str(Path(tmp) / "images" / s.name) for s in scenes]
            with Stopwatch() as extracting:
                features = extract_features(paths)
            generate_s, extract_s = generating.seconds, extracting.seconds
        if args.cache:
            np.savez(args.cache, key=key, features=features, generate_s=generate_s, extract_s=extract_s)

    splits = []
    for split_seed in range(args.split_seed, args.split_seed + args.repeats):
        order = np.random.default_rng(split_seed).permutation(args.n)
        splits.append((order[: int(0.8 * args.n)], order[int(0.8 * args.n):]))
    results, joint = {}, np.ones(len(splits[0][1]), bool)
    for name, values in ATTRIBUTES.items():
        labels = np.array([values.index(getattr(s, name)) for s in scenes])
        runs = [probe(features, labels, len(values), train, test) for train, test in splits]
        joint &= runs[0]["predictions"] == labels[splits[0][1]]
        result = {k: v for k, v in runs[0].items() if k != "predictions"}
        accs = [run["test_accuracy"] for run in runs]
        result["test_accuracy_mean_over_splits"] = round(float(np.mean(accs)), 4)
        result["test_accuracy_std_over_splits"] = round(float(np.std(accs)), 4)
        results[name] = result
        print(f"{name:>10}: test {result['test_accuracy']:.3f}  mean over {len(runs)} splits "
              f"{np.mean(accs):.3f} +- {np.std(accs):.3f}  (chance {result['chance']:.3f}, "
              f"train {result['train_accuracy']:.3f}, l2 {result['l2']})", flush=True)
    print(f"{'all four':>10}: test {joint.mean():.3f}")

    write_json(args.out, {
        "command": "python bench/demo_learnability.py " + " ".join(sys.argv[1:]),
        "n_images": args.n, "n_train": len(splits[0][0]), "n_test": len(splits[0][1]),
        "split_seeds": list(range(args.split_seed, args.split_seed + args.repeats)),
        "demo": {"image_size": args.image_size, "seed": args.seed},
        "features": {"weights": "random", "seed": BACKBONE_SEED, "image_size": FEATURE_SIZE,
                     "precision": "float32", "pooling": "avg", "batch_size": BATCH_SIZE},
        "probe": "multinomial logistic regression on standardized features, L2 picked on a "
                 "validation slice of the training part",
        "attributes": results,
        "all_attributes_test_accuracy": round(float(joint.mean()), 4),
        "seconds": {"generate": round(generate_s, 2), "extract": round(extract_s, 1),
                    "extract_images_per_s": round(args.n / extract_s, 1)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    })


if __name__ == "__main__":
    main()
