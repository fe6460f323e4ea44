"""What `bench/run.py` builds for itself must be what the product accepts. The benchmarks are too slow
for CI, so their set-up is checked here: a model folder the product would refuse stops the bench."""
from __future__ import annotations

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
