"""Expected problems end with exit status 2 and one `error: ...` line naming the problem and the fix,
never a traceback: run as the user runs them, `python -m stages.<name>` and `python -m captioning caption`.

Most cases run a stage in a bare folder holding only a params.yaml: the checks come before TensorFlow
is imported, so each takes about a second. The caption cases reuse the session's tiny `dvc repro`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import CONSOLE_SCRIPT, stages_env
from PIL import Image

from captioning.tiny_project import PROJECT


def run_cli(args: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = stages_env(KERAS_HOME=str(tmp_path / "keras_home"))  # no cached ImageNet weights: offline for real
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_clear_failure(result: subprocess.CompletedProcess, *words: str, only_line: bool = True) -> str:
    """Exit 2, no traceback, exactly one `error:` line containing every word; return that line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    if only_line:  # nothing else on stderr: no warnings, no progress bars, no TensorFlow start-up noise
        assert result.stderr.strip() == errors[0], result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def write_params(folder: Path, edit=None) -> None:
    """The project's params.yaml, changed by `edit(params)`."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    if edit:
        edit(params)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def setter(section: str, key: str, value):
    return lambda params: params[section].__setitem__(key, value)


# ------------------------------------------------------------------------------------ params problems

def test_params_file_missing(tmp_path):
    result = run_cli(["stages.train_lstm"], tmp_path, tmp_path)
    assert_clear_failure(result, "params.yaml not found", "run from the project folder")


def test_params_key_missing(tmp_path):
    write_params(tmp_path, lambda params: params["train"].pop("epochs"))
    result = run_cli(["stages.train_lstm"], tmp_path, tmp_path)
    assert_clear_failure(result, "missing train.epochs", "add it")


def test_params_section_missing(tmp_path):
    write_params(tmp_path, lambda params: params.pop("decode"))
    result = run_cli(["stages.evaluate"], tmp_path, tmp_path)
    assert_clear_failure(result, "no `decode:` section")


@pytest.mark.parametrize("stage, section, key, value, words", [
    ("train_lstm", "train", "optimizer", "foo", ["train.optimizer is 'foo'", "use one of: adam, rmsprop, sgd"]),
    ("train_lstm", "train", "epochs", -3, ["train.epochs is -3", "use a whole number >= 1"]),
    ("train_lstm", "train", "dropout", 1.5, ["train.dropout is 1.5", "< 1"]),
    ("train_lstm", "train", "learning_rate", "fast", ["train.learning_rate is 'fast'", "a number > 0"]),
    ("extract_resnet_features", "features", "precision", "fp8",
     ["features.precision is 'fp8'", "use one of: float32, mixed_bfloat16"]),
    ("extract_resnet_features", "features", "weights", "nonsense",
     ["features.weights is 'nonsense'", "not 'imagenet', 'random' or an existing weights file",
      "features.weights: path/to/that.h5", "features.weights: random"]),
    ("extract_resnet_features", "features", "image_size", 16, ["features.image_size is 16", ">= 32"]),
    ("evaluate", "decode", "method", "sample", ["decode.method is 'sample'", "greedy, beam"]),
    ("split", "split", "train_fraction", 1.2, ["split.train_fraction is 1.2", "< 1"]),
    ("parse_pickle", "data", "allow_pandas_pickle", "false", ["data.allow_pandas_pickle is 'false'",
                                                              "true or false (without quotes)"]),
    ("plot", "plot", "grid_size", 0, ["plot.grid_size is 0", ">= 1"]),
])
def test_bad_value(tmp_path, stage, section, key, value, words):
    write_params(tmp_path, setter(section, key, value))
    result = run_cli([f"stages.{stage}"], tmp_path, tmp_path)
    assert_clear_failure(result, *words)


# ------------------------------------------------------------------------------------- data problems

def test_captions_file_missing(tmp_path):
    (tmp_path / "images").mkdir()
    write_params(tmp_path, lambda p: p["data"].update(captions="nowhere/captions.txt", images="images"))
    result = run_cli(["stages.parse_pickle"], tmp_path, tmp_path)
    assert_clear_failure(result, "captions file not found: nowhere/captions.txt", "Set data.captions")


def test_images_folder_missing(tmp_path):
    (tmp_path / "captions.txt").write_text("a.jpg#0\tA dog runs .\n")
    write_params(tmp_path, lambda p: p["data"].update(captions="captions.txt", images="no_such_folder"))
    result = run_cli(["stages.parse_pickle"], tmp_path, tmp_path)
    assert_clear_failure(result, "images folder not found: no_such_folder", "Set data.images")


def test_stage_run_before_its_inputs_exist(tmp_path):
    write_params(tmp_path)
    result = run_cli(["stages.split"], tmp_path, tmp_path)
    assert_clear_failure(result, "data/captions.parquet not found", "parse_pickle", "dvc repro")


def test_imagenet_weights_offline_explains_local_file(tmp_path):
    """The download fails here (no internet): the message must say how to use a local weights file."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "a.jpg")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images.txt").write_text("a.jpg\n")
    write_params(tmp_path, lambda p: (p["data"].update(images="images"),
                                      p["features"].update(weights="imagenet", image_size=32)))
    result = run_cli(["stages.extract_resnet_features"], tmp_path, tmp_path)
    line = assert_clear_failure(result, "ImageNet", "features.weights: path/to/that.h5", "local weights file",
                                "features.weights: random", only_line=False)
    assert len(line) < 1000
    assert not (tmp_path / "data" / "features" / "features.npy").exists()


# ----------------------------------------------------------------------------------- caption command

def test_caption_before_any_model(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.jpg")
    result = run_cli(["captioning", "caption", "a.jpg"], tmp_path, tmp_path)
    assert_clear_failure(result, "no trained model in data/model", "dvc repro", "--model-dir")




@pytest.mark.parametrize("args, error", [
    (["caption", "a.jpg"], "no trained model in data/model"),
    (["demo", "--params", "absent.yaml"], "absent.yaml"),
    (["--help"], None),
])
def test_console_script_is_python_m_captioning(tmp_path, args, error):
    """`captioning ...` prints and exits exactly like `python -m captioning ...`, one-line errors included."""
    Image.new("RGB", (40, 40)).save(tmp_path / "a.jpg")
    results = [subprocess.run([*command, *args], cwd=tmp_path, env=stages_env(), capture_output=True, text=True,
                              timeout=120) for command in ([str(CONSOLE_SCRIPT)], [sys.executable, "-m", "captioning"])]
    script, module = results
    as_typed = module.stdout.replace("usage: python -m captioning", "usage: captioning", 1)  # the one difference
    assert (script.returncode, script.stdout, script.stderr) == (module.returncode, as_typed, module.stderr)
    if error:
        assert_clear_failure(script, error)
    else:
        assert script.returncode == 0 and "caption" in script.stdout


@pytest.mark.slow
def test_caption_bad_files_are_reported_and_the_others_captioned(demo_run, tmp_path):
    good = sorted((demo_run / "data" / "demo" / "images").glob("*.jpg"))[:2]
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo\n")
    missing = tmp_path / "missing.jpg"
    unwritable = text / "out.png"  # a folder that is a file: the captioned images cannot be written
    args = ["captioning", "caption", str(good[0]), str(missing), str(text), str(good[1]), "--out", str(unwritable)]
    result = run_cli(args, demo_run, tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[:2] == [f"error: {missing}: file not found: check the path",
                          f"error: {text}: not an image file Pillow can read (unknown or corrupt format): "
                          "convert it to JPEG or PNG"]
    # Numbered by place among the arguments (1st and 4th), not by how many images before them could be read.
    assert [line.split(": ")[1] for line in errors[2:]] == [str(text / "out-1.png"), str(text / "out-4.png")]
    assert all("cannot write the captioned image" in line for line in errors[2:])
    captioned = dict(line.split("\t") for line in result.stdout.splitlines() if "\t" in line)
    assert list(captioned) == [str(good[0]), str(good[1])]
    assert all(caption.strip() for caption in captioned.values())


def test_caption_with_an_incomplete_model(tmp_path):
    (tmp_path / "data" / "model").mkdir(parents=True)
    (tmp_path / "data" / "model" / "model.keras").write_bytes(b"")
    Image.new("RGB", (40, 40)).save(tmp_path / "a.jpg")
    result = run_cli(["captioning", "caption", "a.jpg"], tmp_path, tmp_path)
    assert_clear_failure(result, "incomplete", "vocab.json", "backbone.json")


def test_caption_with_a_model_file_cut_short(tmp_path):
    """Every file there but one cut off (a copy interrupted): a JSON traceback once TensorFlow had loaded."""
    from captioning.bundle import save_decode_settings

    model = tmp_path / "data" / "model"
    model.mkdir(parents=True)
    (model / "model.keras").write_bytes(b"a trained model")
    (model / "vocab.json").write_text('{"words": ["a", "dog"]}')
    (model / "backbone.json").write_text('{"weights": "random", "seed": 0, "imag')
    save_decode_settings(tmp_path / "data" / "decode.json", model, {"method": "greedy"})
    Image.new("RGB", (40, 40)).save(tmp_path / "a.jpg")
    result = run_cli(["captioning", "caption", "a.jpg"], tmp_path, tmp_path)
    assert_clear_failure(result, "data/model is damaged: backbone.json cannot be read", "dvc repro")


def test_caption_prints_a_file_name_that_is_not_utf8_and_every_line_after_it(monkeypatch):
    """Under a UTF-8 locale other than C (en_US.UTF-8: stdout's errors are 'strict'), a Latin-1 file name from
    the shell (PEP 383 surrogate escapes) made the result loop raise UnicodeEncodeError: a traceback, exit 1,
    the captions after it and every error line lost. In-process, with the captioning itself stubbed."""
    import io
    import os
    import types

    from captioning import __main__ as cli

    latin1 = os.fsdecode(b"photos/caf\xe9.jpg")
    stub = types.SimpleNamespace(caption_batches=lambda sources, *args, **kwargs: iter([(
        [(source, "a dog runs") for source in sources if source != "gone.jpg"], [("gone.jpg", "file not found")])]))
    monkeypatch.setitem(sys.modules, "captioning.inference", stub)
    monkeypatch.setattr(cli, "check_bundle", lambda model_dir: None)
    monkeypatch.setattr(cli, "decode_settings", lambda model_dir, path: {"method": "greedy", "beam_size": 1})
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", newline="\n")
    monkeypatch.setattr(sys, "stdout", stdout)
    args = cli._parser().parse_args(["caption", "first.jpg", latin1, "last.jpg", "gone.jpg"])
    assert cli.caption_command(args) == 2
    stdout.flush()
    assert stdout.buffer.getvalue().splitlines() == [b"first.jpg\ta dog runs", b"photos/caf\xe9.jpg\ta dog runs",
                                                     b"last.jpg\ta dog runs"]


def test_caption_prints_each_batch_as_it_is_done(monkeypatch):
    """Every caption was printed only once the whole list was done: a Ctrl-C (or a crash) near the end of a long
    list lost them all. In-process, with the captioning stubbed: the second batch is interrupted."""
    import io
    import types

    from captioning import __main__ as cli

    def batches(sources, *args, **kwargs):
        yield [(sources[0], "a dog runs")], [(sources[1], "file not found")]
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "captioning.inference", types.SimpleNamespace(caption_batches=batches))
    monkeypatch.setattr(cli, "check_bundle", lambda model_dir: None)
    monkeypatch.setattr(cli, "decode_settings", lambda model_dir, path: {"method": "greedy", "beam_size": 1})
    stdout, stderr = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n") for _ in range(2))
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(KeyboardInterrupt):
        cli.caption_command(cli._parser().parse_args(["caption", "first.jpg", "gone.jpg", "third.jpg"]))
    # What reached the streams' buffers by the interruption, without a flush of our own.
    assert stdout.buffer.getvalue() == b"first.jpg\ta dog runs\n"
    assert stderr.buffer.getvalue() == b"error: gone.jpg: file not found\n"


def test_serve_checks_its_fetch_flags_before_loading_the_model(monkeypatch):
    """--fetch-timeout 0 was refused only after TensorFlow and the model had loaded (seconds later), though
    every other flag is checked first. In-process, with the server module stubbed to see whether it is reached."""
    import types

    from captioning import __main__ as cli
    from captioning.errors import UserError

    reached = []
    stub = types.SimpleNamespace(serve=lambda *args, **kwargs: reached.append("serve"))
    monkeypatch.setitem(sys.modules, "captioning.serve", stub)
    monkeypatch.setattr(cli, "check_bundle", lambda model_dir: None)
    monkeypatch.setattr(cli, "decode_settings", lambda model_dir, path: {"method": "greedy", "beam_size": 1})
    monkeypatch.setattr("captioning.malloc.limit_arenas", lambda: reached.append("arenas"))
    with pytest.raises(UserError, match="--fetch-timeout must be positive"):
        cli.serve_command(cli._parser().parse_args(["serve", "--fetch-timeout", "0"]))
    assert reached == []


@pytest.mark.parametrize("command", ["caption", "serve"])
def test_a_fetch_size_limit_too_small_for_a_photo_is_refused(monkeypatch, command):
    """--fetch-max-mb 0.00001 was accepted: every URL then failed as too large, in the caption command and in
    the server after its model had loaded. It has --max-body-mb's minimum (one small photo)."""
    from captioning import __main__ as cli
    from captioning.errors import UserError

    monkeypatch.setattr(cli, "check_bundle", lambda model_dir: None)
    monkeypatch.setattr(cli, "decode_settings", lambda model_dir, path: {"method": "greedy", "beam_size": 1})
    run_command = cli.caption_command if command == "caption" else cli.serve_command
    images = ["a.jpg"] if command == "caption" else []
    with pytest.raises(UserError, match=r"^--fetch-max-mb 0.05 would refuse nearly every photo; use at least 0.1"):
        run_command(cli._parser().parse_args([command, *images, "--fetch-max-mb", "0.05"]))


@pytest.mark.parametrize("args,words", [
    (["serve", "--max-wait-ms", "inf"], "argument --max-wait-ms: inf is not a finite number"),
    (["serve", "--max-body-mb", "nan"], "argument --max-body-mb: nan is not a finite number"),
    (["serve", "--port", "70000"], "argument --port: 70000 is not a port"),
    (["caption", "a.jpg", "--fetch-max-mb", "inf"], "argument --fetch-max-mb: inf is not a finite number"),
    (["caption", "a.jpg", "--fetch-timeout", "nan"], "argument --fetch-timeout: nan is not a finite number"),
])
def test_flags_that_are_no_usable_number_are_refused_at_once(tmp_path, args, words):
    """inf passed every `> 0` check: --max-wait-ms inf made every lone request wait forever."""
    result = run_cli(["captioning", *args], tmp_path, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and words in result.stderr, result.stderr


def test_plots_template_to_a_folder_and_demo_over_a_bad_manifest(tmp_path):
    assert_clear_failure(run_cli(["captioning", "plots-template", "--out", str(tmp_path)], tmp_path, tmp_path),
                         "cannot write", "Is a directory")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"demo": {"out_dir": "demo", "n_images": 12,
                                                                   "image_size": 32, "seed": 7}}))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo/demo_manifest.json").write_text("[]")  # not the manifest the demo writes: redone
    result = run_cli(["captioning", "demo"], tmp_path, tmp_path)
    assert result.returncode == 0 and "demo written: 12 images" in result.stdout, result.stderr
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"demo": {"out_dir": "params.yaml", "n_images": 12,
                                                                   "image_size": 32, "seed": 7}}))
    assert_clear_failure(run_cli(["captioning", "demo"], tmp_path, tmp_path), "cannot write the demo into params.yaml")


@pytest.mark.slow
def test_decode_settings_that_are_not_json_are_one_line(demo_run, tmp_path):
    broken = tmp_path / "decode.json"
    broken.write_text('{"model_sha256": ')
    image = next((demo_run / "data/demo/images").glob("*.jpg"))
    result = run_cli(["captioning", "caption", str(image), "--decode-settings", str(broken)], demo_run, tmp_path)
    assert_clear_failure(result, "is not readable decode settings")


def test_the_server_names_every_unusable_upload_of_a_request():
    """Of several uploaded files, the server named only the first unusable one: a client learnt of the others
    one retry at a time, where the caption command names each. Now the error names them all, with the first
    one's status."""
    import asyncio
    import io

    import httpx

    from captioning.serve import create_app

    class NoModel:  # the files are refused before any model is needed
        image_size, settings = 16, {"method": "greedy", "beam_size": 1}

        def caption_many(self, pixels, settings):
            raise AssertionError("a request with unusable files was captioned")

    good = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, format="PNG")
    files = [("image", ("notes.jpg", b"holiday notes", "image/jpeg")),
             ("image", ("good.png", good.getvalue(), "image/png")), ("image", ("empty.jpg", b"", "image/jpeg"))]

    async def post():
        transport = httpx.ASGITransport(app=create_app(NoModel()))
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await client.post("/caption", files=files)

    answer = asyncio.run(post())
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert "notes.jpg: not an image" in error and "empty.jpg: empty file" in error and "good.png" not in error
