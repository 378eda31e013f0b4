"""Tasks and model sources: what each task explains (hand-computed and against pytorch-grad-cam's targets), timm and
Hugging Face models against pytorch-grad-cam, models trained on the synthetic task that really localise, the
service's answers per task, and the build's refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from camserve.cam import CamEngine, CamRequest, Classes, TopPredicted, normalize_map
from camserve.pipeline import ExplanationService
from camserve.tasks import TASKS, task_named
from camtools.models import BuildError, prepare_model, read_checkpoint
from tests.conftest import encode
from tests.helpers import assert_matches_reference, save_hf_models, service_for

X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)


class TinyHead(nn.Module):
    """features: A^1 = x, A^2 = −x (a 1x1 conv). head: global average pooling, then outputs = W · pooled."""

    def __init__(self, weights: list[list[float]]) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        self.head = nn.Linear(2, len(weights), bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.head.weight.copy_(torch.tensor(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def explain(model: nn.Module, task: str, targets, images: torch.Tensor = X):
    engine = CamEngine(model, input_size=2, default_layer="features", head=task_named(task).head)
    return engine(images, [CamRequest(targets)] * len(images))


# --- Hand-computed ---


def test_binary_explains_z_for_the_positive_class_and_minus_z_for_the_negative():
    # One logit z = mean(A^1)·1 + mean(A^2)·(−2): ∂z/∂A^1 = 1/4, ∂z/∂A^2 = −2/4.
    # Positive: ReLU(1/4·x + (−1/2)(−x)) = 3/4·x.  Negative (−z): ReLU(−1/4·x + 1/2·(−x)) = 0.
    model = TinyHead([[1.0, -2.0]])
    out = explain(model, "binary", Classes([1, 0]))
    torch.testing.assert_close(out.maps[0][0], 0.75 * X[0, 0])
    torch.testing.assert_close(out.maps[0][1], torch.zeros(2, 2))
    assert float(out.logits[0, 0]) == pytest.approx(7.5)  # z = mean(x)·1 + mean(−x)·(−2) = 2.5 + 5
    assert explain(model, "binary", TopPredicted(1)).targets == [[1]]  # σ(7.5) > ½: the positive class first
    scores = task_named("binary").scores(out.logits)
    torch.testing.assert_close(
        scores, torch.tensor([[1 - torch.sigmoid(torch.tensor(7.5)), torch.sigmoid(torch.tensor(7.5))]])
    )


def test_multilabel_explains_the_positive_classes_or_the_top_one():
    model = TinyHead([[1.0, 0.0], [-1.0, 2.0], [0.1, 0.0]])  # logits 2.5, −7.5, 0.25: σ = 0.92, 0.0006, 0.56
    out = explain(model, "multilabel", TopPredicted(3, at_least=0.5))
    assert out.targets == [[0, 2]]  # the two positives, in order of probability; class 1 dropped
    torch.testing.assert_close(out.maps[0][0], X[0, 0] / 4)  # ∂y_0/∂A^1 = 1/4, ∂y_0/∂A^2 = 0
    strict = explain(model, "multilabel", TopPredicted(3, at_least=0.99))
    assert strict.targets == [[0]] and strict.maps[0].shape[0] == 1  # none reaches 0.99: the top one
    engine = CamEngine(model, input_size=2, default_layer="features", head=task_named("multilabel").head)
    for method, aug_smooth in (("gradcam", True), ("fullgrad", False), ("scorecam", False)):  # every path of the plan
        out = engine(X, [CamRequest(TopPredicted(3, at_least=0.5), method=method, aug_smooth=aug_smooth)])
        assert out.targets == [[0, 2]] and out.maps[0].shape[0] == 2, method


def test_regression_explains_the_output_itself():
    # Outputs y_0 = 2·mean(A^1) = 5, y_1 = −mean(A^2) = 2.5: Grad-CAM of y_0 is ReLU(2/4·x) = x/2, and of y_1
    # (∂y_1/∂A^2 = −1/4 on A^2 = −x) ReLU(x/4).
    model = TinyHead([[2.0, 0.0], [0.0, -1.0]])
    out = explain(model, "regression", Classes([0, 1]))
    torch.testing.assert_close(out.maps[0][0], X[0, 0] / 2)
    torch.testing.assert_close(out.maps[0][1], X[0, 0] / 4)
    torch.testing.assert_close(out.logits, torch.tensor([[5.0, 2.5]]))
    torch.testing.assert_close(task_named("regression").scores(out.logits), out.logits)


def test_scorecam_scores_with_the_explained_scalar():
    """ScoreCAM's channel scores are the task's scalar, as pytorch-grad-cam's targets give them: for the negative
    class of a binary model, −z of each masked input."""
    model = TinyHead([[1.0, -2.0]])
    engine = CamEngine(model, input_size=2, default_layer="features", head=task_named("binary").head)
    x = X[0, 0]
    masks = [(x - 1) / 3, (4 - x) / 3]  # norm(A^1) and norm(A^2)
    with torch.no_grad():
        z = [float(model(X * m)) for m in masks]
    weights = torch.softmax(torch.tensor([-v for v in z]), dim=0)
    out = engine(X, [CamRequest(Classes([0]), method="scorecam")])
    torch.testing.assert_close(out.maps[0][0], torch.relu(weights[0] * x - weights[1] * x))


# --- pytorch-grad-cam's targets, on seeded random weights at the default layer ---


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(11)
    return torch.randn(2, 3, 224, 224)


def reference(model: nn.Module, layer: str, images: torch.Tensor, targets, **kwargs) -> np.ndarray:
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM

    peer = copy.deepcopy(model).requires_grad_(True)
    return ReferenceGradCAM(model=peer, target_layers=[peer.get_submodule(layer)], **kwargs)(
        input_tensor=images, targets=targets
    )


def ours(prepared, images: torch.Tensor, targets: list[list[int]]) -> np.ndarray:
    spec = prepared.spec
    engine = CamEngine(prepared.model, input_size=spec.input_size, default_layer=spec.default_layer)
    engine.head = task_named(spec.task).head
    out = engine(images, [CamRequest(Classes(t)) for t in targets])
    return np.stack([normalize_map(m, tuple(images.shape[-2:]))[0].numpy() for m in out.maps])


def test_multilabel_matches_classifier_output_target(images):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    prepared = prepare_model(arch="resnet18", weights="random", task="multilabel", progress=False)
    for classes in ([281, 5], [5, 281]):
        expected = reference(prepared.model, "layer4", images, [ClassifierOutputTarget(c) for c in classes])
        assert_matches_reference(ours(prepared, images, [[c] for c in classes]), expected, f"multilabel {classes}")


def test_binary_matches_binary_classifier_output_target_for_both_classes(images):
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    prepared = prepare_model(arch="resnet18", weights="random", task="binary", progress=False)
    assert prepared.spec.labels == ("negative", "positive")
    for category in (1, 0):
        expected = reference(prepared.model, "layer4", images, [BinaryClassifierOutputTarget(category)] * 2)
        assert_matches_reference(ours(prepared, images, [[category]] * 2), expected, f"binary class {category}")


def test_regression_matches_raw_scores_output_target(images, tmp_path):
    from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

    labels = tmp_path / "labels.txt"
    labels.write_text("age\n")
    prepared = prepare_model(arch="resnet18", weights="random", task="regression", labels=labels, progress=False)
    assert prepared.spec.labels == ("age",)
    expected = reference(prepared.model, "layer4", images, [RawScoresOutputTarget()] * 2)
    assert_matches_reference(ours(prepared, images, [[0]] * 2), expected, "regression output 0")


def test_a_timm_cnn_and_a_timm_vit_match_pytorch_grad_cam(images):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

    cnn = prepare_model(arch="timm:convnext_atto", weights="random", progress=False)
    assert cnn.spec.default_layer == "stages.3" and cnn.spec.input_size == 224
    targets = [ClassifierOutputTarget(c) for c in (281, 5)]
    assert_matches_reference(
        ours(cnn, images, [[281], [5]]), reference(cnn.model, "stages.3", images, targets), "timm convnext_atto"
    )
    vit = prepare_model(arch="timm:vit_tiny_patch16_224", weights="random", progress=False)
    layer = vit.spec.default_layer
    assert layer == "blocks.11.norm1" and vit.spec.layers[layer] == "cls_tokens"
    expected = reference(vit.model, layer, images, targets, reshape_transform=vit_reshape_transform)
    assert_matches_reference(ours(vit, images, [[281], [5]]), expected, "timm vit_tiny_patch16_224")


def test_timm_register_tokens_become_a_grid():
    prepared = prepare_model(arch="timm:vit_little_patch16_reg4_gap_256", weights="random", progress=False)
    layer = prepared.spec.default_layer
    assert prepared.model.num_prefix_tokens == 4 and prepared.spec.layers[layer] == "prefix_tokens:4"
    out = ours(prepared, torch.randn(1, 3, 256, 256), [[3]])
    assert out.shape == (1, 256, 256) and np.ptp(out) > 0.5


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return save_hf_models(tmp_path_factory.mktemp("hf"))


def test_an_hf_build_reads_everything_from_the_directory(hf_dirs):
    vit_dir, resnet_dir = hf_dirs
    vit = prepare_model(hf=vit_dir)
    spec = vit.spec
    assert spec.arch == "hf:ViTForImageClassification" and spec.name == "vit"
    assert spec.labels == ("cat", "dog", "bird") and spec.task == "multilabel"
    assert (spec.input_size, spec.mean, spec.std) == (64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert spec.output == "logits" and spec.default_layer == "vit.layers.1.layernorm_before"
    assert vit.hf_config == vit_dir / "config.json" and spec.hf_config == "hf"
    resnet = prepare_model(hf=resnet_dir)
    assert resnet.spec.task == "multiclass" and resnet.spec.labels == tuple(f"LABEL_{i}" for i in range(4))
    assert resnet.spec.default_layer == "resnet.encoder.stages.1" and resnet.spec.input_size == 224


def test_hf_resnet_and_vit_match_pytorch_grad_cam_on_their_logits(hf_dirs):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class Logits(nn.Module):  # pytorch-grad-cam's tutorial wrapper for a Hugging Face model
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).logits

    vit_dir, resnet_dir = hf_dirs
    for directory, side in ((resnet_dir, 224), (vit_dir, 64)):
        prepared = prepare_model(hf=directory)
        layer = prepared.spec.default_layer
        torch.manual_seed(12)
        batch = torch.randn(2, 3, side, side)
        peer = Logits(copy.deepcopy(prepared.model))
        peer.model._forward_hooks.clear()  # the peer takes the raw ModelOutput and picks .logits itself
        kwargs = {}
        if prepared.spec.layers[layer] == "cls_tokens":
            from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

            kwargs["reshape_transform"] = lambda t: vit_reshape_transform(t, height=8, width=8)
        expected = reference(peer, "model." + layer, batch, [ClassifierOutputTarget(c) for c in (1, 2)], **kwargs)
        assert_matches_reference(ours(prepared, batch, [[1], [2]]), expected, f"hf {prepared.spec.arch}")


# --- Models trained on the synthetic task: each explanation points at its own object ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from camtools.synthetic import trained_task_model

    folder = tmp_path_factory.mktemp("tasks")
    return {task: trained_task_model(task, folder / task) for task in ("multilabel", "binary", "regression")}


def pointing(prepared, task: str, scenes, class_of) -> tuple[int, int]:
    """How many explanations' maxima land in (or within 4 px of) the box of the object they explain."""
    from camtools.synthetic import to_batch

    engine = CamEngine(prepared.model, input_size=64, default_layer=prepared.spec.default_layer)
    engine.head = task_named(task).head
    hits = total = 0
    for scene in scenes:
        for colour, (x0, y0, x1, y1) in scene.boxes.items():
            target = class_of(colour)
            if target is None:
                continue
            out = engine(to_batch([scene.image]), [CamRequest(Classes([target]))])
            heat = normalize_map(out.maps[0], (64, 64))[0].numpy()
            y, x = np.unravel_index(heat.argmax(), heat.shape)
            hits += x0 - 4 <= x < x1 + 4 and y0 - 4 <= y < y1 + 4
            total += 1
    return hits, total


@pytest.mark.slow
def test_trained_task_models_really_localise(trained):
    from camtools.synthetic import task_scenes

    scores = {task: score for task, (_, score) in trained.items()}
    assert scores["multilabel"] >= 0.95 and scores["binary"] >= 0.95 and scores["regression"] >= 0.8, scores
    cases = {
        "multilabel": lambda colour: colour,  # each positive colour's own map
        "binary": lambda colour: 1 if colour == 0 else None,  # the red shape, for the positive class
        "regression": lambda colour: 0,  # the one shape whose side is measured
    }
    for task, class_of in cases.items():
        scenes, _ = task_scenes(task, 100, seed=9)
        hits, total = pointing(trained[task][0], task, scenes, class_of)
        print(f"pointing {task}: {hits}/{total}")
        assert total >= 25 and hits >= 0.9 * total, (task, hits, total)
    two = [s for s in task_scenes("multilabel", 60, seed=9)[0] if len(s.boxes) == 2]
    hits, total = pointing(trained["multilabel"][0], "multilabel", two, lambda colour: colour)
    assert total >= 20 and hits == total  # with two objects, each class points at its own one


# --- The service, per task ---


@pytest.mark.slow
def test_the_service_answers_each_task_in_its_own_terms(trained):
    from camtools.synthetic import task_scenes

    two = next(s for s in task_scenes("multilabel", 40, seed=3)[0] if len(s.boxes) == 2)
    picture = bytearray(encode(two.image, "PNG"))

    multilabel = service_for(trained["multilabel"][0])
    (answer,) = multilabel.answer([{"data": picture}])
    body = answer.body
    assert body["model"]["task"] == "multilabel" and len(body["predictions"]) == 3
    positives = sorted(p["index"] for p in body["predictions"] if p["positive"])
    assert positives == sorted(two.boxes)  # the two colours present, and only those
    assert sorted(e["index"] for e in body["explanations"]) == positives  # default: the positive classes
    (lenient,) = multilabel.answer([{"data": picture, "threshold": b"0"}])
    assert [p["positive"] for p in lenient.body["predictions"]] == [True] * 3  # the absent colour too, at 0
    assert sorted(e["index"] for e in lenient.body["explanations"]) == [0, 1, 2]
    (refused,) = multilabel.answer([{"data": picture, "method": b"finercam"}])
    assert refused.status == 400 and "finercam" in refused.body["message"] and "gradcam" in refused.body["message"]

    binary = service_for(trained["binary"][0])
    (answer,) = binary.answer([{"data": picture, "target": b"0,1"}])
    predictions = {p["label"]: p["probability"] for p in answer.body["predictions"]}
    assert set(predictions) == {"no red", "red"} and sum(predictions.values()) == pytest.approx(1, abs=1e-5)
    assert [e["index"] for e in answer.body["explanations"]] == [0, 1]
    (out_of_range,) = binary.answer([{"data": picture, "target": b"2"}])
    assert out_of_range.status == 400 and "from 0 to 1" in out_of_range.body["message"]

    regression = service_for(trained["regression"][0])
    scene = task_scenes("regression", 1, seed=4)[0][0]
    (answer,) = regression.answer([{"data": bytearray(encode(scene.image, "PNG")), "faithfulness": b"true"}])
    body = answer.body
    ((prediction,), (explanation,)) = body["predictions"], body["explanations"]
    assert set(prediction) == {"index", "label", "value"} and prediction["label"] == "side"
    assert prediction["value"] == pytest.approx(next(iter(scene.sides.values())) / 64, abs=0.08)
    assert "probability" not in explanation and explanation["value"] == prediction["value"]
    measured = explanation["faithfulness"]
    assert measured["deletion"] < prediction["value"] and 0 <= measured["drop"]  # deleting the shape shrinks it


# --- The build's refusals and the weights it reads ---


def test_bad_builds_say_what_to_fix(tmp_path, hf_dirs):
    with pytest.raises(BuildError, match="a binary model has exactly 1 output.*has 2"):
        torch.save(torchvision_resnet18(2).state_dict(), tmp_path / "two.pt")
        prepare_model(arch="resnet18", weights=tmp_path / "two.pt", task="binary")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(BuildError, match="3 labels for 2 classes.*negative, positive"):
        prepare_model(arch="resnet18", weights="random", task="binary", labels=labels)
    (tmp_path / "one.txt").write_text("only\n")
    with pytest.raises(BuildError, match="at least 2 classes"):
        prepare_model(arch="resnet18", weights="random", task="multilabel", labels=tmp_path / "one.txt")
    empty = tmp_path / "hf_without_weights"
    empty.mkdir()
    (empty / "config.json").write_text((hf_dirs[0] / "config.json").read_text())
    with pytest.raises(BuildError, match="has no weights \\(model.safetensors or pytorch_model.bin\\)"):
        prepare_model(hf=empty)
    with pytest.raises(BuildError, match="not a timm model: did you mean timm:convnext_tiny"):
        prepare_model(arch="timm:convnext_tinny", weights="random")


def torchvision_resnet18(classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=classes)


def test_checkpoints_in_every_common_layout_load(tmp_path):
    from safetensors.torch import save_file

    state = torchvision_resnet18(3).state_dict()
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}, "epoch": 3}, tmp_path / "tutorial.pt")
    lightning = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "pytorch-lightning_version": "2.5"}
    torch.save(lightning, tmp_path / "lightning.ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "weights.safetensors")
    for name in ("tutorial.pt", "lightning.ckpt", "weights.safetensors"):
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), name
        assert prepare_model(arch="resnet18", weights=tmp_path / name).spec.num_classes == 3
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "empty.pt")
    with pytest.raises(BuildError, match="holds no state_dict.*it has: 'epoch', 'optimizer'"):
        read_checkpoint(tmp_path / "empty.pt")


def test_a_model_that_returns_a_tuple_or_a_dict_is_explained_from_its_logits(tmp_path):
    source = """
import torch
from torch import nn


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        logits = self.head(self.features(x).mean(dim=(2, 3)))
        return KIND
"""
    for kind, found in (("(logits, logits * 0)", "0"), ('{"logits": logits, "aux": logits}', "logits")):
        path = tmp_path / f"two_heads_{found}.py"
        path.write_text(source.replace("KIND", kind))
        prepared = prepare_model(model_file=path, weights="random", input_size=32)
        assert prepared.spec.output == found
        assert isinstance(prepared.model(torch.zeros(1, 3, 32, 32)), torch.Tensor)  # the logits alone
    path = tmp_path / "two_heads_aux.py"
    path.write_text(source.replace("KIND", '{"main": logits, "aux": logits}'))
    with pytest.raises(BuildError, match="--output"):
        prepare_model(model_file=path, weights="random", input_size=32)
    assert prepare_model(model_file=path, weights="random", input_size=32, output="main").spec.output == "main"


def test_the_worker_installs_timm_or_transformers_only_when_the_model_needs_them(tmp_path, hf_dirs):
    from camtools.archive import model_needs, worker_requirements

    resnet = prepare_model(arch="resnet18", weights="random")
    timm_model = prepare_model(arch="timm:convnext_atto", weights="random")
    hf_model = prepare_model(hf=hf_dirs[1])
    assert model_needs(resnet) == set() and model_needs(timm_model) == {"timm"}
    assert model_needs(hf_model) == {"transformers"}
    plain, with_timm = worker_requirements(set()), worker_requirements({"timm"})
    assert "timm" not in plain and "transformers" not in plain and "timm==1.0.31" in with_timm
    path = tmp_path / "needs_sklearn.py"
    path.write_text("import sklearn\nfrom torch import nn\n\n\nclass Net(nn.Linear):\n    pass\n")
    prepared = copy.copy(resnet)
    object.__setattr__(prepared, "model_file", path)
    with pytest.raises(BuildError, match="imports sklearn, which an archive's worker does not install"):
        model_needs(prepared)


def test_every_task_is_described_in_the_docs():
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for name in TASKS:
        assert f"`{name}`" in readme
    assert list(TASKS) == ["multiclass", "multilabel", "binary", "regression", "segmentation", "detection", "zero-shot",
                          "embedding"]  # fmt: skip


def test_timm_imagenet_weights_offline_fail_with_the_other_choices(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    command = [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch", "timm:resnet18", "--weights"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # as with no network, without the Hub client's retries
    completed = subprocess.run(
        [*command, "imagenet", "--export-path", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert completed.returncode == 2 and not list(tmp_path.iterdir())
    assert "could not download the pretrained weights of timm's resnet18" in completed.stderr
    assert "--weights PATH" in completed.stderr and "--weights random" in completed.stderr


def test_a_regression_model_speaks_of_outputs_and_refuses_a_threshold(tmp_path):
    """Its indices count outputs, not classes; ``threshold`` (a multi-label model's) does not apply and is refused
    as other options are where they do not fit."""
    labels = tmp_path / "labels.txt"
    labels.write_text("width\nheight\n")
    prepared = prepare_model(arch="resnet18", weights="random", task="regression", labels=labels, progress=False)
    spec = prepared.spec
    service = ExplanationService(CamEngine(prepared.model, input_size=spec.input_size), spec, torch.device("cpu"))
    picture = bytearray(encode(np.full((64, 64, 3), 90, np.uint8), "PNG"))
    (wrong,) = service.answer([{"data": picture, "target": b"5"}])
    assert wrong.status == 400 and "an output index from 0 to 1 (this model has 2 outputs)" in wrong.body["message"]
    (refused,) = service.answer([{"data": picture, "threshold": b"0.3"}])
    assert refused.status == 400, refused.body
    assert "option threshold fits only multilabel models; this model is a regression model" in refused.body["message"]
    assert service.answer([{"data": picture}])[0].status == 200


def test_a_filtering_target_keeps_what_its_scores_reach():
    """``at_least`` keeps scores from it on, else the top one (or none without ``or_top``); ``above`` keeps only
    scores greater than it (a segmenter's segments that have pixels) and never falls back to the top one."""
    scores = [0.9, 0.5, 0.2]
    assert TopPredicted(3, at_least=0.5).kept(scores) == [0, 1]
    assert TopPredicted(3, at_least=0.95).kept(scores) == [0]
    assert TopPredicted(3, at_least=0.95, or_top=False).kept(scores) == []
    assert TopPredicted(3, above=0.2).kept(scores) == [0, 1]
    assert TopPredicted(3, above=0.0).kept([0.4, 0.0, 0.0]) == [0]
    assert TopPredicted(2).kept(scores[:2]) == [0, 1] and not TopPredicted(2).filters
