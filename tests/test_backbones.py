"""The two backbones: EfficientNet-Lite0's weight mapping and conversion cache, specs and rebuilding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from captioning import efficientnet_lite, files, torch_checkpoint
from captioning.backbones import build_backbone, make_spec
from captioning.efficientnet_lite import build_classifier, load_state_dict, package_checkpoint
from captioning.errors import UserError
from captioning.feature_files import BackboneSpec


@pytest.fixture(scope="module")
def state():
    return torch_checkpoint.read_state_dict(package_checkpoint())


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(efficientnet_lite.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "weights-cache"))


def test_every_tensor_lands_in_exactly_one_weight(state):
    model = build_classifier(64)
    load_state_dict(model, state, "pkg")
    # Spot checks of the transposes: PyTorch (out, in, kh, kw) -> Keras (kh, kw, in, out), and so on.
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("block3_dw_conv").get_weights()[0][:, :, :, 0],
                                  state["_blocks.3._depthwise_conv.weight"][:, 0].transpose(1, 2, 0))
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], state["_fc.weight"].T)
    gamma, beta, mean, variance = model.get_layer("block15_project_bn").get_weights()
    np.testing.assert_array_equal(variance, state["_blocks.15._bn2.running_var"])
    assert model.get_layer("head_bn").epsilon == pytest.approx(1e-3)


@pytest.mark.parametrize("change, words", [
    (lambda s: s.pop("_blocks.7._bn1.running_mean"), "has no tensor _blocks.7._bn1.running_mean"),
    (lambda s: s.update({"_blocks.16._bn0.weight": np.zeros(3, np.float32)}), "have no place"),
    (lambda s: s.update({"_fc.bias": np.zeros(999, np.float32)}), "has shape"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(state, change, words):
    broken = dict(state)
    change(broken)
    with pytest.raises(UserError, match=words):
        load_state_dict(build_classifier(64), broken, "pkg")


def test_conversion_happens_once_and_a_damaged_cache_is_redone(monkeypatch, tmp_path):
    monkeypatch.setenv(efficientnet_lite.CACHE_ENV, str(tmp_path))
    checkpoint = package_checkpoint()
    first = efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256)
    record = files.read_json(first.with_suffix(".json"))
    assert record["sha256"] == files.sha256(first) and record["source_sha256"] == efficientnet_lite.PACKAGE_SHA256

    def no_reading(path):
        raise AssertionError("converted again")

    monkeypatch.setattr(torch_checkpoint, "read_state_dict", no_reading)
    assert efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256) == first

    first.write_bytes(first.read_bytes()[:-10])  # damaged: the recorded sha256 no longer matches
    with pytest.raises(AssertionError, match="converted again"):
        efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256)


@pytest.mark.parametrize("upgrade", ["torch_checkpoint.py", "efficientnet_lite.py", "keras"])
def test_a_cache_made_by_another_version_of_the_conversion_is_not_reused(monkeypatch, tmp_path, upgrade):
    """The cache was keyed by the checkpoint's sha256 alone: after an upgrade that fixes how tensors are
    read or mapped (a transpose, a stride), or another Keras, every machine with a warm cache kept loading
    the old conversion, and its features differed from a fresh machine's for the same code and params."""
    monkeypatch.setenv(efficientnet_lite.CACHE_ENV, str(tmp_path / "cache"))
    checkpoint = package_checkpoint()
    first = efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256)
    conversions = []
    real_read = torch_checkpoint.read_state_dict
    monkeypatch.setattr(torch_checkpoint, "read_state_dict", lambda path: conversions.append(path) or real_read(path))
    assert efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256) == first
    assert not conversions  # unchanged code: the cache is used

    if upgrade == "keras":
        monkeypatch.setattr(efficientnet_lite.keras, "__version__", efficientnet_lite.keras.__version__ + ".post1")
    else:  # the same module with one more line: what a fix in a later version looks like to the cache
        module = torch_checkpoint if upgrade == "torch_checkpoint.py" else efficientnet_lite
        changed = tmp_path / upgrade
        changed.write_text(Path(module.__file__).read_text() + "\n# a fix\n")
        monkeypatch.setattr(module, "__file__", str(changed))
    again = efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256)
    assert conversions == [checkpoint]
    assert again.is_file() and first.is_file() and again != first  # each version keeps its own file
    record = files.read_json(again.with_suffix(".json"))
    assert record["sha256"] == files.sha256(again)
    assert efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256) == again
    assert conversions == [checkpoint]  # and the new version converts only once


@pytest.mark.parametrize("damage", [
    lambda text: text[:len(text) // 2],      # cut off: not JSON any more
    lambda text: "[1, 2]",                   # JSON, but not the record's object
    lambda text: "\udcff",                   # not UTF-8 (written with surrogateescape below)
], ids=["cut-off", "not-an-object", "not-utf8"])
def test_a_damaged_cache_record_is_converted_again_not_a_traceback(monkeypatch, tmp_path, damage):
    """The record beside the cached weights stopped every later extraction, caption command and server
    start with a JSONDecodeError / AttributeError / UnicodeDecodeError traceback, where the README promises
    that a damaged cache file is converted again."""
    monkeypatch.setenv(efficientnet_lite.CACHE_ENV, str(tmp_path))
    checkpoint = package_checkpoint()
    weights = efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256)
    good = weights.read_bytes()
    record_path = weights.with_suffix(".json")
    record_path.write_text(damage(record_path.read_text()), errors="surrogateescape")
    assert efficientnet_lite.converted_weights(checkpoint, efficientnet_lite.PACKAGE_SHA256) == weights
    assert weights.read_bytes() == good
    record = files.read_json(record_path)  # repaired, so the next call skips the conversion again
    assert record["sha256"] == files.sha256(weights) and record["source_sha256"] == efficientnet_lite.PACKAGE_SHA256


def test_a_cache_folder_that_cannot_be_written_is_one_line(monkeypatch, tmp_path):
    """The caption command or the server run by a user without a writable home (a service account, a
    read-only container) stopped with a NotADirectoryError/PermissionError traceback from mkdir."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(efficientnet_lite.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(UserError, match=f"cannot keep the converted .* in {tmp_path / 'a-file' / 'cache'} "
                                        f".*set {efficientnet_lite.CACHE_ENV} to a folder you can write"):
        efficientnet_lite.converted_weights(package_checkpoint(), efficientnet_lite.PACKAGE_SHA256)


def test_a_cache_folder_under_an_unexpanded_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
    """CAPTIONING_CACHE="~/weights" set where no shell expands it (a quoted export, a systemd or Docker ENV
    line) put the converted weights in a folder literally named "~" inside the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(efficientnet_lite.CACHE_ENV, "~/weights")
    monkeypatch.chdir(tmp_path)
    weights = efficientnet_lite.converted_weights(package_checkpoint(), efficientnet_lite.PACKAGE_SHA256)
    assert weights.parent == tmp_path / "home" / "weights"
    assert not (tmp_path / "~").exists()


def test_efficientnet_spec_records_the_package_weights_and_gives_1280_features():
    spec = make_spec("imagenet", 0, 64, "float32", backbone="efficientnet_lite0")
    assert spec.backbone == "efficientnet_lite0" and spec.weights_sha256 == efficientnet_lite.PACKAGE_SHA256
    backbone = build_backbone(spec)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    features = backbone(pixels).numpy()
    assert features.shape == (2, 1280) and features.dtype == np.float32
    assert (features >= 0).all() and features.std() > 0  # pooled ReLU6 outputs of real weights
    np.testing.assert_array_equal(build_backbone(spec)(pixels).numpy(), features)  # rebuilt: same numbers


def test_random_efficientnet_is_seeded_and_differs_from_imagenet():
    pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    first, again, other = (build_backbone(make_spec("random", seed, 64, "float32", backbone="efficientnet_lite0"))(
        pixels).numpy() for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_spec_naming_other_package_weights_is_refused():
    spec = BackboneSpec("imagenet", 0, 64, "float32", weights_sha256="0" * 64, backbone="efficientnet_lite0")
    with pytest.raises(UserError, match="re-extract"):
        build_backbone(spec)


def test_a_weights_file_changed_after_extraction_is_refused(tmp_path):
    weights = tmp_path / "mine.weights.h5"
    build_classifier(64).save_weights(weights)
    spec = make_spec(str(weights), 0, 64, "float32", backbone="efficientnet_lite0")
    assert spec.weights_sha256 == files.sha256(weights)
    build_backbone(spec)  # loads
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(UserError, match="changed since the features were extracted"):
        build_backbone(spec)


def test_older_backbone_files_mean_resnet50():
    assert BackboneSpec(weights="random", seed=0, image_size=64, precision="float32").backbone == "resnet50"
