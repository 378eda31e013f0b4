"""Detectors and segmenters: the explained scalars by hand on tiny nets, parity with pytorch-grad-cam on torchvision's
own models (seeded random weights), the synthetic task's trained detector and segmenter, and the service's answers."""

from __future__ import annotations

import base64
import copy
import io
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from torchvision.models import get_model_builder

from camserve.cam import DETECTION_METHOD, CamEngine, CamRequest, Classes, normalize_map
from camserve.cam.detection import DetectionRequest, box_score, explain_detections, matched_score
from camserve.pipeline import ExplanationService
from camserve.tasks import task_named
from camtools.models import BuildError, _seeded, prepare_model
from camtools.synthetic import SIZE, dense_scenes
from tests.conftest import encode
from tests.helpers import assert_matches_reference, oriented

# --- The explained scalars, by hand ---


class TinyDetector(nn.Module):
    """torchvision's detection convention in a few lines: one fixed box per image, scored σ(z) with
    z = Σ_k w_k · mean_ij A_k,ij, where A = ``backbone``(x) is a 1x1 convolution of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 2, 1)
        self.w = nn.Parameter(torch.tensor([0.7, -0.3]), requires_grad=False)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for activation in self.backbone(torch.stack(images)):
            z = (self.w[:, None, None] * activation).mean(dim=(1, 2)).sum()
            box = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
            outputs.append({"boxes": box, "labels": torch.tensor([1]), "scores": torch.sigmoid(z)[None]})
        return outputs


def test_a_detection_is_explained_by_its_box_score_by_hand():
    torch.manual_seed(0)
    model = TinyDetector().eval().requires_grad_(False)
    image = torch.rand(3, 6, 8)
    request = DetectionRequest("backbone", "gradcam", score_threshold=0.0)
    out = explain_detections(model, [image], [request], {"backbone": "nchw"})
    activation = model.backbone(image[None])[0]
    z = (model.w[:, None, None] * activation).mean(dim=(1, 2)).sum()
    # s = IoU + σ(z) with a constant box: ∂s/∂A_k,ij = σ'(z)·w_k/(h·w), so α_k = σ'(z)·w_k/(h·w).
    alpha = torch.sigmoid(z) * (1 - torch.sigmoid(z)) * model.w / (6 * 8)
    expected = torch.relu((alpha[:, None, None] * activation).sum(dim=0))
    torch.testing.assert_close(out.maps[0][0], expected, rtol=1e-5, atol=1e-7)
    assert out.explained == [[0]] and out.detections[0][0].score == pytest.approx(float(torch.sigmoid(z)), abs=1e-6)
    # The scalar itself: IoU 1 with its own box, plus the score; another class or a far box scores 0.
    found = model([image])[0]
    assert float(box_score(found, found["boxes"][0], 1)) == pytest.approx(1 + float(torch.sigmoid(z)), abs=1e-6)
    assert float(box_score(found, found["boxes"][0], 2)) == 0
    assert matched_score(found, torch.tensor([1.0, 1.0, 5.0, 6.0]), 1) == pytest.approx(float(torch.sigmoid(z)))
    assert matched_score(found, torch.tensor([10.0, 10.0, 14.0, 14.0]), 1) == 0


class TinySegmenter(nn.Module):
    """A = ``backbone``(x), a 1x1 convolution to 2 channels; logits y = ``classifier``(A), 3 classes per pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, 2, 1)
        self.classifier = nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def test_a_segment_is_explained_by_the_sum_of_its_logits_by_hand():
    torch.manual_seed(3)
    model = TinySegmenter().eval().requires_grad_(False)
    image = torch.randn(1, 3, 6, 6)
    engine = CamEngine(model, input_size=6, default_layer="backbone", head=task_named("segmentation").head)
    activation = model.backbone(image)[0]
    predicted = model(image)[0].argmax(dim=0)
    for c in range(3):
        out = engine(image, [CamRequest(Classes([c]), "backbone")])
        # y = Σ_{ij: argmax = c} (W_c · A_ij + b_c): ∂y/∂A_k,ij = W_ck where the pixel is predicted c, else 0.
        weight = model.classifier.weight[c, :, 0, 0]
        alpha = weight * (predicted == c).float().mean()
        expected = torch.relu((alpha[:, None, None] * activation).sum(dim=0))
        torch.testing.assert_close(out.maps[0][0], expected, rtol=1e-5, atol=1e-7)
    shares = task_named("segmentation").head.scores(model(image))
    torch.testing.assert_close(shares[0], torch.bincount(predicted.flatten(), minlength=3).float() / 36)


# --- Parity with pytorch-grad-cam 1.5.7 on torchvision's models, seeded random weights ---


def seeded(arch: str, **kwargs) -> nn.Module:
    """torchvision's ``arch`` as the build seeds random weights: its batch-norm statistics measured on noise, so that
    its scores are not saturated (a saturated softmax leaves gradients of rounding noise)."""
    build = lambda: get_model_builder(arch)(weights=None, weights_backbone=None, **kwargs)  # noqa: E731
    return _seeded(build, 0, 224).requires_grad_(False)


@pytest.fixture(scope="module")
def detection_image() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.rand(3, 224, 224)  # a multiple of 32 at the transform's size: no padding, the grid covers it


def reference_detection(model, method, layer: str, image, detections, reshape_transform=None) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    peer = copy.deepcopy(model).requires_grad_(True)
    cam = method(peer, [peer.get_submodule(layer)], reshape_transform=reshape_transform)
    with torch.no_grad():
        found = model([image])[0]  # the boxes unrounded, highest score first, as the engine explains them
    maps = []
    for index, detection in enumerate(detections):
        assert int(found["labels"][index]) == detection.label
        target = FasterRCNNBoxScoreTarget([detection.label], [found["boxes"][index].numpy()])
        maps.append(cam(image[None], targets=[target])[0])
    return np.stack(maps)


@pytest.fixture
def replays(monkeypatch) -> list[bool]:
    """Each call of a two-stage detector's replayed box head: True where it found every explained detection's
    proposal (the short way back), False where the full path ran."""
    import camserve.cam.detection as detection

    calls, original = [], detection._roi_scores

    def counted(*args, **kwargs):
        scores = original(*args, **kwargs)
        calls.append(scores is not None)
        return scores

    monkeypatch.setattr(detection, "_roi_scores", counted)
    return calls


def ours_detection(model, method: str, layer: str, layout: str, image, explain: int = 2):
    request = DetectionRequest(layer, method, score_threshold=0.0, explain=explain)
    out = explain_detections(model, [image], [request], {layer: layout})
    return normalize_map(out.maps[0], tuple(image.shape[-2:])).numpy(), out.detections[0][:explain]


def test_faster_rcnn_matches_the_box_score_target(detection_image, monkeypatch, replays):
    from pytorch_grad_cam import EigenCAM, GradCAM
    from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform

    model = seeded("fasterrcnn_resnet50_fpn", num_classes=5, min_size=224, max_size=224, box_score_thresh=0.0)
    ours, detections = ours_detection(model, "gradcam", "backbone.body.layer4", "nchw", detection_image)
    assert len(detections) == 2
    expected = reference_detection(model, GradCAM, "backbone.body.layer4", detection_image, detections)
    assert_matches_reference(ours, expected, "Faster R-CNN Grad-CAM, FasterRCNNBoxScoreTarget")
    assert replays == [True]  # through the box head replayed on the two detections' proposals
    # The pyramid, as pytorch-grad-cam's fasterrcnn_reshape_transform brings it to one grid; EigenCAM with our sign.
    oriented_eigencam(monkeypatch)
    ours, detections = ours_detection(model, "eigencam", "backbone", "fpn", detection_image, explain=1)
    expected = reference_detection(
        model, EigenCAM, "backbone", detection_image, detections, reshape_transform=fasterrcnn_reshape_transform
    )
    assert_matches_reference(ours, expected, "Faster R-CNN EigenCAM, FPN")


def test_retinanet_eigencam_matches(detection_image, monkeypatch):
    from pytorch_grad_cam import EigenCAM

    oriented_eigencam(monkeypatch)  # up to the sign: ours, the long tail positive

    model = seeded("retinanet_resnet50_fpn", num_classes=5, min_size=224, max_size=224, score_thresh=0.0)
    ours, detections = ours_detection(model, "eigencam", "backbone.body.layer4", "nchw", detection_image, explain=1)
    expected = reference_detection(model, EigenCAM, "backbone.body.layer4", detection_image, detections)
    assert_matches_reference(ours, expected, "RetinaNet EigenCAM")


def test_deeplabv3_matches_the_semantic_segmentation_target():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    class Out(nn.Module):  # pytorch-grad-cam's tutorial wraps the model so that it returns the "out" logits
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)["out"]

    model = Out(seeded("deeplabv3_resnet50", num_classes=4))
    torch.manual_seed(7)
    images = torch.randn(2, 3, 96, 96)
    engine = CamEngine(model, input_size=96, default_layer="model.backbone.layer4")
    engine.head = task_named("segmentation").head
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    classes = [int(torch.bincount(p.flatten(), minlength=4).argmax()) for p in predicted]
    out = engine(images, [CamRequest(Classes([c])) for c in classes])
    ours = np.stack([normalize_map(m, (96, 96))[0].numpy() for m in out.maps])
    peer = copy.deepcopy(model).requires_grad_(True)
    targets = [SemanticSegmentationTarget(c, (p == c).float().numpy()) for c, p in zip(classes, predicted, strict=True)]
    expected = GradCAM(peer, [peer.model.backbone.layer4])(input_tensor=images, targets=targets)
    assert_matches_reference(ours, expected, "DeepLabV3 Grad-CAM, SemanticSegmentationTarget")


# --- The build ---


def test_detectors_and_segmenters_build_with_their_classes_labels_and_layers(tmp_path):
    detector = prepare_model(arch="fasterrcnn_mobilenet_v3_large_320_fpn", weights="random", progress=False)
    spec = detector.spec
    assert spec.task == "detection" and spec.labels[:3] == ("__background__", "person", "bicycle")
    assert spec.default_layer == "backbone.body.16" and spec.layers["backbone"] == "fpn"
    assert all(layer.startswith("backbone") for layer in spec.layers)  # not the heads' per-proposal maps
    segmenter = prepare_model(arch="lraspp_mobilenet_v3_large", weights="random", progress=False)
    assert segmenter.spec.task == "segmentation" and segmenter.spec.num_classes == 21
    assert segmenter.spec.default_layer == "backbone.16" and segmenter.spec.output == "out"
    # Gradient methods need one tensor: the pyramid takes the activation methods.
    image = bytearray(encode(np.full((96, 128, 3), 100, np.uint8), "PNG"))
    pyramid = service(detector).answer(
        [{"data": image, "layer": "backbone", "method": "gradcam"}, {"data": image, "layer": "backbone"}]
    )
    assert pyramid[0].status == 400 and "feature pyramid" in pyramid[0].body["message"]
    assert "eigencam" in pyramid[0].body["message"] and "gradcam," not in pyramid[0].body["message"]
    assert pyramid[1].status == 200 and pyramid[1].body["explanations"] == []  # random weights: no detection at 0.5

    # A fine-tuned detector's number of classes comes from its weights; its labels from the labels file.
    five = seeded("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=5)
    # As torchvision's pretrained detectors save them: FrozenBatchNorm2d keeps no num_batches_tracked counters.
    frozen = {key: value for key, value in five.state_dict().items() if not key.endswith("num_batches_tracked")}
    assert len(frozen) < len(five.state_dict())
    torch.save(frozen, tmp_path / "five.pt")
    (tmp_path / "labels.txt").write_text("background\ncat\ndog\nbird\nfish\n")
    tuned = prepare_model(
        arch="fasterrcnn_mobilenet_v3_large_320_fpn", weights=tmp_path / "five.pt", labels=tmp_path / "labels.txt"
    )
    assert tuned.spec.labels == ("background", "cat", "dog", "bird", "fish")
    found = service(tuned).answer([{"data": image, "layer": "backbone", "score_threshold": "0"}])[0].body
    assert [(e["method"], e["layer"]) for e in found["explanations"]] == [("eigencam", "backbone")] * 3
    with pytest.raises(BuildError, match="is a detection model, built with --task detection"):
        prepare_model(arch="fasterrcnn_resnet50_fpn", weights="random", task="multiclass")
    with pytest.raises(BuildError, match="not a torchvision segmentation model"):
        prepare_model(arch="resnet18", weights="random", task="segmentation")


# --- The synthetic task's trained detector and segmenter ---


def scene_inputs(count: int = 40, seed: int = 2):
    return [scene for scene in dense_scenes(count, seed) if scene.boxes]


def test_the_trained_detector_finds_the_shapes_and_its_maps_point_inside_each_box(dense_models):
    prepared, score = dense_models["detection"]
    print(f"trained detector: {score:.1%} of held-out shapes found with no false box")
    assert score >= 0.9
    model, spec = prepared.model, prepared.spec
    pointing = {}
    for method in (DETECTION_METHOD, "gradcam"):
        hits = total = 0
        for scene in scene_inputs():
            image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255
            request = DetectionRequest(spec.default_layer, method, explain=2)
            out = explain_detections(model, [image], [request], dict(spec.layers))
            for index, heat in zip(out.explained[0], out.maps[0], strict=True):
                x0, y0, x1, y1 = out.detections[0][index].box
                peak_y, peak_x = np.unravel_index(int(heat.argmax()), heat.shape)
                hits += x0 - 1 <= peak_x <= x1 + 1 and y0 - 1 <= peak_y <= y1 + 1
                total += 1
        pointing[method] = (hits, total)
        print(f"trained detector pointing, {method}: {hits}/{total} maps peak inside their box")
    hits, total = pointing[DETECTION_METHOD]
    assert total >= 40 and hits / total >= 0.9
    # Why the default is not Grad-CAM: its channel weights, averaged over the map, do not stay with the box.
    assert pointing["gradcam"][0] < hits


def test_the_trained_segmenter_maps_each_colour_inside_its_mask(dense_models):
    prepared, score = dense_models["segmentation"]
    print(f"trained segmenter: mean IoU {score:.3f}")
    assert score >= 0.8
    spec = prepared.spec
    engine = CamEngine(prepared.model, input_size=SIZE, default_layer=spec.default_layer)
    engine.head = task_named("segmentation").head
    hits = total = 0
    for scene in scene_inputs():
        batch = (torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
        out = engine(batch, [CamRequest(Classes([colour + 1 for colour in scene.boxes]))])
        for colour, heat in zip(scene.boxes, normalize_map(out.maps[0], (SIZE, SIZE)), strict=True):
            peak = np.unravel_index(int(heat.argmax()), heat.shape)
            inside = cv2.dilate((scene.mask == colour + 1).astype(np.uint8), np.ones((3, 3), np.uint8))
            hits += bool(inside[peak])
            total += 1
    print(f"trained segmenter pointing: {hits}/{total} maps peak inside their colour's mask")
    assert total >= 40 and hits / total >= 0.9


# --- Parity and pointing on trained detectors: a two-stage Faster R-CNN whose transform resizes, and FCOS ---

TRAINED_DETECTORS = {
    # (fixture, layers): the default layer the build picks, and a level of the feature pyramid (one tensor).
    "faster_rcnn": ("backbone.body.stage2", "backbone.fpn.layer_blocks.0"),
    "fcos": ("backbone.7", "backbone.4"),
}


def _on_object(heat: np.ndarray, scene) -> bool:
    """The map's peak lies on one of the scene's shapes (inside its box, one pixel of slack)."""
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    return any(x0 - 1 <= x <= x1 + 1 and y0 - 1 <= y <= y1 + 1 for x0, y0, x1, y1 in scene.boxes.values())


def oriented_eigencam(monkeypatch) -> None:
    """pytorch-grad-cam's EigenCAM with our sign (the projection's long tail positive) in place of the SVD's."""
    import pytorch_grad_cam.eigen_cam as reference_eigencam

    original = reference_eigencam.get_2d_projection
    monkeypatch.setattr(
        reference_eigencam, "get_2d_projection", lambda a: oriented(original(a)).astype(np.float32), raising=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("detector", sorted(TRAINED_DETECTORS))
def test_trained_detectors_match_pytorch_grad_cam_and_point_at_least_as_often(
    detector, faster_rcnn, dense_models, monkeypatch, replays
):
    """On a trained detector, at its default layer and a pyramid level: Grad-CAM and HiResCAM with
    ``FasterRCNNBoxScoreTarget`` of the detection's own output box equal pytorch-grad-cam's to 1e-3, EigenCAM
    equals it up to the sign, and each method's map peaks on a shape at least as often as the reference's own."""
    from pytorch_grad_cam import EigenCAM, GradCAM, HiResCAM

    prepared, score = faster_rcnn if detector == "faster_rcnn" else dense_models["detection"]
    assert score >= 0.9, f"the {detector} did not learn the task: {score:.1%}"
    model, scenes = prepared.model, scene_inputs(24)[:12]
    references = {"gradcam": GradCAM, "hirescam": HiResCAM, "eigencam": EigenCAM}
    for layer in TRAINED_DETECTORS[detector]:
        for method, reference_class in references.items():
            worst, ours_hits, reference_hits, count = 0.0, 0, 0, 0
            for scene in scenes:
                image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255
                explain = 1 if method == "eigencam" else len(scene.boxes)  # EigenCAM: one map per image
                ours, detections = ours_detection(model, method, layer, "nchw", image, explain=explain)
                assert len(detections) == explain
                own = reference_detection(model, reference_class, layer, image, detections)
                if method == "eigencam":
                    with monkeypatch.context() as patched:
                        oriented_eigencam(patched)
                        expected = reference_detection(model, reference_class, layer, image, detections)
                else:
                    expected = own
                worst = max(worst, float(np.abs(ours - expected).max()))
                ours_hits += sum(_on_object(heat, scene) for heat in ours)
                reference_hits += sum(_on_object(heat, scene) for heat in own)
                count += len(ours)
            print(
                f"{detector} {method} at {layer}: parity {worst:.1e}"
                + (" (up to the sign)" if method == "eigencam" else "")
                + f"; pointing ours {ours_hits}/{count}, pytorch-grad-cam's own {reference_hits}/{count}"
            )
            assert worst < 1e-3, (detector, method, layer, worst)
            assert ours_hits >= reference_hits, (ours_hits, reference_hits, count)
    assert all(replays) and len(replays) == (48 if detector == "faster_rcnn" else 0)  # 2 layers, 2 methods, 12


def test_a_two_stage_detector_replays_its_box_head_on_the_explained_proposals_alone(monkeypatch, replays):
    """The short way back (one box head of T rows) gives the full path's maps, on a padded batch of two images with
    three and two detections; it pools only the explained proposals; a layer inside the box head takes the full
    path."""
    import camserve.cam.detection as detection

    model = seeded("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=5, box_score_thresh=0.0)
    torch.manual_seed(2)
    images = [torch.rand(3, 180, 240), torch.rand(3, 150, 150)]
    pooled = []
    pool = model.roi_heads.box_roi_pool
    monkeypatch.setattr(pool, "forward", lambda f, boxes, shapes, _o=pool.forward: pooled.append(
        [len(b) for b in boxes]) or _o(f, boxes, shapes))  # fmt: skip
    layer = "backbone.body.16"
    for method in ("hirescam", "gradcam"):
        requests = [DetectionRequest(layer, method, score_threshold=0.0, explain=count) for count in (3, 2)]
        short = explain_detections(model, images, requests, {layer: "nchw"})
        assert pooled[-1] == [3, 2] and pooled[-2][0] > 50  # the replay: the explained proposals alone
        with monkeypatch.context() as full_path:
            full_path.setattr(detection, "_roi_heads", lambda *args: None)
            full = explain_detections(model, images, requests, {layer: "nchw"})
        assert short.explained == full.explained == [[0, 1, 2], [0, 1]]
        for ours, expected in zip(short.maps, full.maps, strict=True):
            assert float(expected.amax()) > 0
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert replays == [True, True]
    assert detection._roi_heads(model, [model.roi_heads.box_head.fc6]) is None
    assert detection._roi_heads(model, [model.backbone.body]) is model.roi_heads


def test_a_padded_batch_maps_each_image_from_its_own_share_of_the_grid_in_one_resize():
    """Image n covers inner/padded of the transform's grid. A ramp over the grid, g(j) = j, is exact under bilinear
    interpolation, so the map at image pixel u must be the grid coordinate it samples:
    (u + ½)·(w·inner/padded)/W − ½, clamped to the grid, as one resize of that share gives it."""
    from camserve.cam.detection import _on_image

    grid_h, grid_w, padded, inner, size = 6, 8, (96, 128), (96, 120), (64, 80)
    ramp = torch.arange(grid_w, dtype=torch.float32).expand(1, grid_h, grid_w)
    batch = {"sizes": [inner], "padded": padded}
    heat = _on_image(ramp, batch, [torch.zeros(3, *size)], 0)
    assert heat.shape == (1, *size)
    u = torch.arange(size[1], dtype=torch.float32)
    expected = ((u + 0.5) * (grid_w * inner[1] / padded[1]) / size[1] - 0.5).clamp(0, grid_w - 1)
    torch.testing.assert_close(heat[0, 0], expected)
    # Unpadded, the share is the whole grid: the plain resize (pytorch-grad-cam's).
    whole = _on_image(ramp, {"sizes": [padded], "padded": padded}, [torch.zeros(3, *size)], 0)
    torch.testing.assert_close(whole, F.interpolate(ramp[None], size=size, mode="bilinear", align_corners=False)[0])


# --- The service's answers ---


def service(prepared) -> ExplanationService:
    spec = prepared.spec
    engine = CamEngine(prepared.model, input_size=spec.input_size, default_layer=spec.default_layer)
    return ExplanationService(engine, spec, torch.device("cpu"))


def decode_png(text: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(text))))


def big_scene(scale: int = 4):
    """A synthetic scene with two shapes, upscaled ``scale`` times: boxes must come back in its own pixels."""
    scene = next(s for s in dense_scenes(30, seed=4) if len(s.boxes) == 2)
    image = cv2.resize(scene.image, (SIZE * scale, SIZE * scale), interpolation=cv2.INTER_NEAREST)
    return scene, image


def test_the_detector_service_answers_boxes_in_the_images_pixels_and_explains_them(dense_models):
    svc = service(dense_models["detection"][0])
    scene, image = big_scene()
    rows = [
        {"body": bytearray(encode(image, "PNG"))},
        {"data": bytearray(encode(image, "PNG")), "detection": "1", "faithfulness": "true", "faithfulness_steps": "4"},
        {"data": bytearray(encode(image, "PNG")), "score_threshold": "0.99", "max_detections": "1"},
        {"data": bytearray(encode(np.full((64, 64, 3), 128, np.uint8), "PNG"))},
        {"data": bytearray(encode(image, "PNG")), "detection": "5"},
        {"data": bytearray(encode(image, "PNG")), "topk": "3"},
        {"data": bytearray(encode(image, "PNG")), "method": "scorecam"},
        {"data": bytearray(encode(image, "PNG")), "layer": "backbone", "method": "eigencam"},
    ]
    answers = svc.answer(rows)
    first = answers[0].body
    assert answers[0].status == 200 and first["model"]["task"] == "detection"
    detections = first["detections"]
    assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
    assert len(detections) == 2 and all(d["score"] >= 0.5 for d in detections)
    for colour, box in scene.boxes.items():
        match = next(d for d in detections if d["class"] == colour + 1)
        assert match["label"] == ("red", "green", "blue")[colour]
        np.testing.assert_allclose(match["box"], [4 * v for v in box], atol=4 * 3)  # in the 256-pixel image
    assert [e["detection"] for e in first["explanations"]] == [0, 1]  # the top `explain` (3) of those kept
    assert first["explanations"][0]["box"] == detections[0]["box"]
    assert first["explanations"][0]["score"] == detections[0]["score"]
    chosen = answers[1].body["explanations"]
    assert [e["detection"] for e in chosen] == [1] and set(chosen[0]["faithfulness"]) >= {"deletion", "insertion"}
    assert 0 <= chosen[0]["faithfulness"]["deletion"] <= chosen[0]["faithfulness"]["insertion"] + 1
    assert len(answers[2].body["detections"]) <= 1
    assert answers[3].status == 200 and answers[3].body["detections"] == [] and answers[3].body["explanations"] == []
    assert answers[4].status == 400 and "detection 5 does not exist" in answers[4].body["message"]
    assert answers[5].status == 400 and "topk fits only classification" in answers[5].body["message"]
    assert answers[6].status == 400 and "eigencam" in answers[6].body["message"]
    assert answers[7].status == 200 and answers[7].body["explanations"][0]["layer"] == "backbone"
    (refused,) = svc.answer([{"data": bytearray(encode(image, "PNG")), "sanity": "true"}])
    assert refused.status == 400 and "sanity fits only classification models" in refused.body["message"]


DENSE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 120), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-1, 30), max_size=4),
    st.sampled_from(["hirescam", "gradcam", "eigencam", "scorecam", "cam", "legrad", "guided-gradcam", "backbone",
                     "backbone.body.layer4", "0,1", "[0, 2]", "0.0", "1", "true", "png"]),
)  # fmt: skip
DENSE_OPTIONS = st.sampled_from(
    ["detection", "score_threshold", "max_detections", "explain", "target", "method", "layer", "faithfulness",
     "faithfulness_steps", "sanity", "topk", "aug_smooth", "eigen_smooth", "max_side", "threshold"]
)  # fmt: skip


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_fuzzed_options_on_a_detector_and_a_segmenter_are_answered_or_refused_never_hurting_a_neighbour(
    dense_models, task
):
    """Drawn values for every option, the detector's own among them, against the trained detector's and segmenter's
    services: each row is answered or refused with a 4xx that says why, and a plain neighbour is always answered."""
    svc = service(dense_models[task][0])
    scene = next(iter(dense_scenes(4, seed=9)))
    picture = bytearray(encode(scene.image, "PNG"))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.dictionaries(DENSE_OPTIONS, DENSE_VALUES, max_size=4), min_size=1, max_size=3))
    def fuzz(option_sets):
        rows = [
            {"data": picture, **{k: bytearray(json.dumps(v).strip('"').encode()) for k, v in options.items()}}
            for options in option_sets
        ]
        results = svc.answer([*rows, {"data": picture}])
        for result in results[:-1]:
            assert result.status == 200 or 400 <= result.status < 500, result.body
            if result.status != 200:
                assert result.body["message"] and len(result.body["message"]) < 1000
        assert results[-1].status == 200

    fuzz()


def test_the_detector_overlay_draws_the_explained_box():
    from camserve.overlays import draw_detection

    image = np.full((100, 120, 3), 90, np.uint8)
    drawn = draw_detection(image.copy(), (20, 30, 80, 90), "red 0.99")
    assert (drawn[60, 20] > 200).all() and (drawn[60, 50] == 90).all()  # the box's edge, not its inside


def test_the_segmenter_service_answers_segments_a_mask_and_outlined_explanations(dense_models):
    svc = service(dense_models["segmentation"][0])
    scene, image = big_scene()
    rows = [
        {"body": bytearray(encode(image, "PNG"))},
        {"data": bytearray(encode(image, "PNG")), "target": "[1, 2, 3]", "faithfulness": "true"},
        {"data": bytearray(encode(np.full((64, 64, 3), 128, np.uint8), "PNG"))},
        {"data": bytearray(encode(image, "PNG")), "detection": "0"},
    ]
    answers = svc.answer(rows)
    body = answers[0].body
    assert answers[0].status == 200 and body["model"]["task"] == "segmentation"
    shares = {s["class"]: s["share"] for s in body["segments"]}
    assert sum(shares.values()) == pytest.approx(1, abs=1e-5)
    assert list(shares) == sorted(shares, key=lambda c: -shares[c])
    mask = decode_png(body["mask"])
    assert mask.shape == image.shape[:2]
    truth = cv2.resize(scene.mask, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    assert (mask == truth).mean() > 0.95  # the PNG's values are the class indices
    largest = max((c for c in shares if c != 0), key=shares.get)
    (explanation,) = body["explanations"]
    assert explanation["index"] == largest and explanation["share"] == pytest.approx(shares[largest], abs=1e-6)
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(explanation["overlay"]), np.uint8), cv2.IMREAD_COLOR)
    edge = cv2.morphologyEx((mask == largest).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8)) > 0
    white = (overlay > 200).all(axis=2)
    print(f"outline: {white[edge].mean():.2f} of the segment's edge is white, {white[~edge].mean():.3f} elsewhere")
    assert white[edge].mean() > 0.15 and white[~edge].mean() < 0.005  # the white outline follows the segment
    explained = answers[1].body["explanations"]
    assert [e["index"] for e in explained] == [1, 2, 3]
    present = [e for e in explained if e["share"] > 0]
    assert all(0 <= e["faithfulness"]["drop"] <= 1 for e in present)
    assert answers[2].status == 200 and answers[2].body["explanations"] == []  # only background: nothing to explain
    assert answers[3].status == 400 and "detection fits only detection" in answers[3].body["message"]


def test_mask_and_keypoint_rcnn_return_their_masks_and_keypoints(tmp_path):
    (tmp_path / "labels.txt").write_text("background\nperson\ncat\n")
    image = bytearray(encode(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8), "PNG"))
    row = {"data": image, "score_threshold": "0", "max_detections": "3", "explain": "1", "method": "eigencam"}
    masked = prepare_model(arch="maskrcnn_resnet50_fpn", weights="random", labels=tmp_path / "labels.txt")
    body = service(masked).answer([row])[0].body
    assert len(body["detections"]) == 3 and len(body["explanations"]) == 1
    for detection in body["detections"]:
        mask = decode_png(detection["mask"])
        assert mask.shape == (120, 160) and set(np.unique(mask)) <= {0, 255}
    (tmp_path / "people.txt").write_text("background\nperson\n")
    pointed = prepare_model(arch="keypointrcnn_resnet50_fpn", weights="random", labels=tmp_path / "people.txt")
    body = service(pointed).answer([row])[0].body
    assert len(body["detections"]) == 3
    assert all(len(d["keypoints"]) == 17 and all(len(k) == 3 for k in d["keypoints"]) for d in body["detections"])


class FailingDetector(TinyDetector):
    """TinyDetector that fails on any image brighter than 0.9 on average, as a model can fail on one input."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if any(float(image.mean()) > 0.9 for image in images):
            raise RuntimeError("this input breaks the model")
        return super().forward(images)


def test_a_detector_failing_on_one_image_fails_only_that_request():
    from camserve.spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(
        name="tiny", arch="FailingDetector", labels=("background", "thing"), input_size=64, mean=(0, 0, 0),
        std=(1, 1, 1), default_layer="backbone", layers={"backbone": "nchw"}, weights="random", task="detection",
    )  # fmt: skip
    svc = ExplanationService(CamEngine(FailingDetector().eval(), input_size=64), spec, torch.device("cpu"))
    dark, bright = (bytearray(encode(np.full((40, 50, 3), v, np.uint8), "PNG")) for v in (60, 250))
    answers = svc.answer([{"data": dark, "score_threshold": "0"}, {"data": bright}, {"data": dark}])
    assert [a.status for a in answers] == [200, 500, 200]
    assert len(answers[0].body["detections"]) == 1 and answers[0].body["explanations"][0]["method"] == "hirescam"
