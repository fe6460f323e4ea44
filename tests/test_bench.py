"""What `bench/run.py` builds for itself must be what the product accepts. The benchmarks are too slow
for CI, so their set-up is checked here: a model folder the product would refuse stops the bench."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from captioning.bundle import decode_settings
from captioning.inference import LoadedCaptioner
from captioning.tiny_project import PROJECT

sys.path.insert(0, str(PROJECT / "bench"))  # the benchmarks import their siblings as top-level modules


@pytest.mark.slow
def test_serve_bench_model_decodes_with_the_pipelines_settings(tmp_path):
    import bench_serve

    model_dir = bench_serve.write_bundle(tmp_path, n_images=12)
    settings = decode_settings(model_dir, tmp_path / "decode.json")
    assert settings == dict(bench_serve.PARAMS["decode"])  # params.yaml's, its rerank included
    loaded = LoadedCaptioner(model_dir, settings, max_batch=2)
    loaded.warm_up()  # the server's start-up: it stops here when the folder lacks a file the settings need


def bench_runner():
    """bench/run.py as a module (its name `run` is too generic to import from sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_run_script", PROJECT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_goal_belongs_to_one_benchmark_of_every_mode():
    runner = bench_runner()
    owned = [key for keys in runner.KEYS.values() for key in keys]
    assert sorted(owned) == sorted(runner.GOALS)  # each key once: a failure names exactly its keys
    assert all(list(sizes) == list(runner.KEYS) for sizes in runner.SIZES.values())


def test_a_failing_benchmark_is_reported_and_the_others_are_kept(tmp_path, monkeypatch, capsys):
    """A crash in one benchmark (the last of a 15-20 min run, say) must not lose the figures already
    measured: each of its keys records the error, the JSON is written, and the exit status is 1."""
    runner = bench_runner()
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "bench_fine.py").write_text(
        "def run(workdir, n):\n    return {'noop_repro_s': {'value': 0.5 * n}}\n")
    (modules / "bench_broken.py").write_text(
        "def run(workdir, n):\n    raise RuntimeError('the server never printed its address')\n")
    (modules / "bench_partial.py").write_text(
        "def run(workdir, n):\n    return {'beam_speedup': {'value': 20.0}}\n")
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.setattr(runner, "ROOT", tmp_path)  # its scratch folder, bench/run.tmp, goes here
    monkeypatch.setattr(runner, "SIZES", {"full": {"fine": {"n": 2}, "broken": {"n": 1}, "partial": {"n": 1}}})
    monkeypatch.setattr(runner, "KEYS", {"fine": ("noop_repro_s",), "broken": ("serve_errors", "serve_rss_growth"),
                                         "partial": ("beam_speedup", "train_speedup")}, raising=False)
    monkeypatch.setattr(runner, "GOALS", {key: runner.GOALS[key] for key in
                                          ("noop_repro_s", "serve_errors", "serve_rss_growth", "beam_speedup",
                                           "train_speedup")})
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", ["run.py", "--out", str(out)])

    with pytest.raises(SystemExit) as stopped:
        runner.main()
    assert stopped.value.code == 1
    report = json.loads(out.read_text())
    assert report["noop_repro_s"]["value"] == 1.0 and report["noop_repro_s"]["meets_goal"] is True
    assert report["beam_speedup"]["meets_goal"] is True
    for key in ("serve_errors", "serve_rss_growth"):
        assert report[key]["meets_goal"] is False
        assert "bench_broken" in report[key]["error"] and "never printed its address" in report[key]["error"]
    assert report["train_speedup"]["meets_goal"] is False and "bench_partial" in report["train_speedup"]["error"]
    printed = capsys.readouterr()
    assert "FAILED" in printed.out and "broken" in printed.err and "partial" in printed.err


def test_serve_bench_counts_requests_without_an_answer_as_errors():
    """serve_errors counts every failed request: one that gets no answer (refused, reset, timed out) too,
    rather than ending the benchmark with a traceback and no figure at all."""
    import socket

    import bench_serve

    with socket.socket() as probe:  # a port nothing listens on once this is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    load = bench_serve.Load(f"http://127.0.0.1:{port}", [b"not served"])
    load.one(0)
    load.concurrent(5)
    assert (load.sent, load.errors) == (6, 6)


def test_serve_bench_says_when_the_server_did_not_start(tmp_path):
    import bench_serve

    with pytest.raises(RuntimeError, match="the server did not start"):
        bench_serve.start_server(tmp_path / "no-model", tmp_path / "decode.json")


def test_pipeline_bench_names_the_file_that_holds_its_project_params():
    import bench_pipeline

    from captioning import tiny_project

    path, name = bench_pipeline.PROJECT_NOTE.split()[:2]
    assert name == "TINY_PARAMS" and "TINY_PARAMS = {" in (PROJECT / path).read_text(encoding="utf-8")
    assert f"{tiny_project.TINY_PARAMS['train']['units']} units" in bench_pipeline.PROJECT_NOTE
