"""Import TensorFlow quietly and deterministically, in one place.

Imported only by the modules that need TensorFlow, so parsing and splitting never pay its 4-9 s
start-up. Op determinism makes CPU runs with the same seed give the same numbers.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide C++ start-up INFO/WARNING noise
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import absl.logging  # noqa: E402

absl.logging.set_verbosity(absl.logging.ERROR)

import tensorflow as tf  # noqa: E402,F401
import keras  # noqa: E402,F401

tf.get_logger().setLevel("ERROR")
tf.config.experimental.enable_op_determinism()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow/Keras from one param."""
    keras.utils.set_random_seed(int(seed))
