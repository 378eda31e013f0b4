"""The network before the default layer compiled (``compile: true``, camserve/cam/compiled.py): where the model can
be cut, the same answers as the eager model on a trained network, and the eager model wherever a pass hooks
anything else."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
import torchvision

from camserve.cam.compiled import CompileRefused, split_at
from tests.conftest import encode
from tests.test_integration import heatmap_of


def test_the_cut_takes_a_stage_and_refuses_a_module_inside_a_residual_block_or_at_the_input():
    model = torchvision.models.resnet18().eval()
    split = split_at(model, "layer4")
    assert split.suffix.layer4 is model.layer4  # the layer itself, so the engine's hooks on it fire
    with pytest.raises(CompileRefused, match=r"2 values cross from before layer layer4.1.conv2 to after it"):
        split_at(model, "layer4.1.conv2")  # the block's input crosses too, for its residual
    with pytest.raises(CompileRefused, match="reads the model's input"):
        split_at(model, "conv1")


@pytest.fixture(scope="module")
def services(shapes, tmp_path_factory):
    """The trained ShapesNet's archive built with compile on, served compiled and eager from the same files."""
    from camserve.pipeline import ExplanationService
    from camserve.spec import archive_manifest, handler_settings, model_config
    from camtools.archive import ServingConfig, build_archive

    prepared, _ = shapes
    folder = tmp_path_factory.mktemp("compiled")
    archive = build_archive(prepared, folder / "store", ServingConfig(compile=True))
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(folder / "model")
    model_dir = folder / "model"
    manifest = archive_manifest(model_dir)
    settings = handler_settings(model_dir, manifest)
    assert settings["compile"] is True
    assert model_config(model_dir, manifest)["startupTimeout"] == 600  # the compile runs inside the worker's load
    weights, cpu = manifest["model"]["serializedFile"], torch.device("cpu")
    compiled = ExplanationService.from_archive(model_dir, weights, settings, cpu, threads=1)
    eager = ExplanationService.from_archive(model_dir, weights, {**settings, "compile": False}, cpu, threads=1)
    return compiled, eager


def _rows(count: int, **options: str) -> list[dict[str, bytes]]:
    from camtools.synthetic import make_samples

    return [
        {"data": encode(sample.image), "heatmap": b"true", **{k: v.encode() for k, v in options.items()}}
        for sample in make_samples(count, seed=5)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gradcam", "hirescam", "eigencam"])
def test_a_compiled_prefix_answers_as_the_eager_model_on_a_trained_network(services, method):
    compiled, eager = services
    layer = compiled.spec.default_layer
    assert set(compiled.engine.compiled) == {layer} and not eager.engine.compiled
    assert compiled.channels_last_from == 0  # a new input stride would compile it again
    passes = []
    hook = compiled.engine.compiled[layer].register_forward_hook(lambda *_: passes.append(1))
    try:
        rows = _rows(3, method=method, topk="2")
        fast, slow = compiled.answer(rows), eager.answer(rows)
    finally:
        hook.remove()
    assert passes == [1]  # the batch's one pass ran the compiled model
    for a, b in zip(fast, slow, strict=True):
        assert a.status == b.status == 200, a.body
        assert [p["index"] for p in a.body["predictions"]] == [p["index"] for p in b.body["predictions"]]
        probabilities = [[p["probability"] for p in r.body["predictions"]] for r in (a, b)]
        np.testing.assert_allclose(*probabilities, atol=1e-4)
        for x, y in zip(a.body["explanations"], b.body["explanations"], strict=True):
            assert x["index"] == y["index"]
            np.testing.assert_allclose(heatmap_of(x), heatmap_of(y), atol=1e-3)


@pytest.mark.slow
def test_a_layer_inside_the_compiled_part_and_the_sanity_check_run_the_eager_model(services):
    compiled, eager = services
    passes = []
    hook = compiled.engine.compiled[compiled.spec.default_layer].register_forward_hook(lambda *_: passes.append(1))
    try:
        inside = _rows(2, layer="features.4")  # a ReLU before the cut: its hook would be skipped inside a compile
        checked = _rows(1, sanity="true")
        fast, slow = compiled.answer(inside + checked), eager.answer(inside + checked)
    finally:
        hook.remove()
    assert passes == []
    for a, b in zip(fast, slow, strict=True):
        assert a.status == b.status == 200, a.body
        for x, y in zip(a.body["explanations"], b.body["explanations"], strict=True):
            assert x["layer"] == y["layer"]
            np.testing.assert_allclose(heatmap_of(x), heatmap_of(y), atol=1e-6)
            assert x.get("sanity") == y.get("sanity")


def test_a_compile_that_fails_at_load_leaves_the_eager_model_serving(unpacked_mar, monkeypatch, caplog):
    import camserve.pipeline
    from camserve.pipeline import ExplanationService
    from camserve.spec import archive_manifest, handler_settings

    def no_compiler(model, layer):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(camserve.pipeline, "split_at", no_compiler)
    manifest = archive_manifest(unpacked_mar)
    settings = {**handler_settings(unpacked_mar, manifest), "compile": True, "channels_last": 4}
    service = ExplanationService.from_archive(
        unpacked_mar, manifest["model"]["serializedFile"], settings, torch.device("cpu"), threads=1
    )
    assert not service.engine.compiled and service.channels_last_from == 4
    assert "compiling the network before layer4 failed; the eager model serves" in caplog.text
    assert service.warm_up().status == 200
