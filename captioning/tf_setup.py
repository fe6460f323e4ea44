"""Import TensorFlow quietly and deterministically, in one place.

Imported only by the modules that need TensorFlow, so parsing and splitting never pay its 4-9 s
start-up. Op determinism makes CPU runs with the same seed give the same numbers.
"""
from __future__ import annotations

import contextlib
import os

# Hide C++ log lines: TensorFlow logs harmless notices at ERROR level too ("oneDNN supports DT_INT32
# only on platforms with AVX-512"). Python exceptions still surface; TF_CPP_MIN_LOG_LEVEL=0 shows all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 while TensorFlow loads: its start-up lines (oneDNN, CPU features)
    are written by C++ before any log level applies. TF_CPP_MIN_LOG_LEVEL=0 keeps them."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") < "2":
        yield
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_stderr():
    import absl.logging
    import keras  # noqa: F401
    import tensorflow as tf  # noqa: F401

absl.logging.set_verbosity(absl.logging.ERROR)

tf.get_logger().setLevel("ERROR")
tf.config.experimental.enable_op_determinism()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow/Keras from one param."""
    keras.utils.set_random_seed(int(seed))
