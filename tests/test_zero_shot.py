"""Zero-shot image–text models (CLIP, SigLIP, open_clip) with prompts in the request, and embedding models with
references: against pytorch-grad-cam's clip_example wrapper and ``SimilarityToConceptTarget``, CLIP's own softmax
and SigLIP's own sigmoid, the cosine computed in-process, the text-embedding cache, a tiny CLIP trained here that
points at what each prompt names, the refusals and the fuzzed options."""

from __future__ import annotations

import base64
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from camserve.cam import CamEngine, CamRequest, Classes, normalize_map
from camserve.embeddings import PromptEmbeddings
from camserve.model import images_to_batch
from camtools.models import BuildError, prepare_model
from camtools.synthetic import CLASSES, SIZE, clip_scenes, make_scene, save_clip, tiny_clip_config, to_batch
from tests.conftest import ROOT, encode
from tests.helpers import assert_matches_reference, service_for
from tests.test_pipeline import option_names, values

PROMPTS = ["a red shape", "a green shape", "a blue shape"]


def png(image: np.ndarray) -> bytearray:
    return bytearray(encode(image, "PNG"))


def prompts_file(folder, prompts=PROMPTS):
    path = folder / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    """A tiny CLIPModel with seeded random weights, its word-level tokenizer and image processor, built as
    ``--hf DIR`` (zero-shot) with the colours' prompts."""
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(3)
    save_clip(CLIPModel(tiny_clip_config()), folder / "clip")
    return prepare_model(hf=folder / "clip", prompts=prompts_file(folder))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny CLIP trained on the synthetic scenes (camtools.synthetic.trained_clip, about 12 s)."""
    from camtools.synthetic import trained_clip

    folder, accuracy = trained_clip(tmp_path_factory.mktemp("trained_clip") / "clip")
    assert accuracy >= 0.9, accuracy
    return folder


def scene_images(count: int, seed: int, colours=None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, colours or (0, 2)).image for _ in range(count)]


# --- Zero-shot: parity, probabilities, the cache ---


class ClipExample(nn.Module):
    """pytorch-grad-cam's usage_examples/clip_example.py wrapper: the image's logits against the prompts (its
    example applies a softmax on top; the logit is what is explained here, as the service does)."""

    def __init__(self, clip: nn.Module, tokens: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.clip, self.tokens = clip, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=x, **self.tokens).logits_per_image


def clip_reshape(tensor: torch.Tensor, height: int = 8, width: int = 8) -> torch.Tensor:
    """clip_example.py's reshape_transform: drop the class token, patch tokens to the grid, channels first."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def our_maps(prepared, images: torch.Tensor, columns: torch.Tensor, targets, layer: str, method="gradcam"):
    model = prepared.model
    engine = CamEngine(model, input_size=prepared.spec.input_size, default_layer=prepared.spec.default_layer)
    model.columns.vectors = columns
    try:
        out = engine(images, [CamRequest(Classes(t), layer, method) for t in targets])
    finally:
        model.columns.vectors = None
    return out, np.stack([normalize_map(m, tuple(images.shape[-2:]))[0].numpy() for m in out.maps])


def test_zero_shot_matches_pytorch_grad_cams_clip_example_at_two_layers(random_clip):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = random_clip.spec
    assert spec.task == "zero-shot" and spec.arch == "hf:CLIPModel" and spec.labels == tuple(PROMPTS)
    assert spec.default_layer == "vision_model.encoder.layers.2.layer_norm1" and spec.embedding["context"] == 8
    model = random_clip.model
    tokens = model.texts.tokenize(PROMPTS)
    peer = ClipExample(copy.deepcopy(model.source), tokens).requires_grad_(True)
    torch.manual_seed(5)
    images = torch.randn(2, 3, SIZE, SIZE)
    for layer in (spec.default_layer, "vision_model.encoder.layers.0.layer_norm1"):
        assert spec.layers[layer] == "cls_tokens"
        cam = GradCAM(peer, [peer.get_submodule("clip." + layer)], reshape_transform=clip_reshape)
        expected = cam(input_tensor=images, targets=[ClassifierOutputTarget(2), ClassifierOutputTarget(0)])
        _, ours = our_maps(random_clip, images, model.texts(PROMPTS), [[2], [0]], layer)
        assert_matches_reference(ours, expected, f"clip_example at {layer}")


def test_the_predictions_are_clips_own_softmax_over_the_requests_prompts(random_clip):
    model = random_clip.model.source
    service = service_for(random_clip)
    images = scene_images(2, seed=1)
    asked = ["a blue shape", "a green shape", "a photo of a red shape"]
    rows = [{"data": png(images[0])}, {"data": png(images[1]), "prompts": bytearray(json.dumps(asked).encode())}]
    answers = service.answer(rows)
    for answer, image, prompts in zip(answers, images, (PROMPTS, asked), strict=True):
        assert answer.status == 200, answer.body
        tokens = random_clip.model.texts.tokenize(prompts)
        with torch.no_grad():
            logits = model(pixel_values=images_to_batch([image], random_clip.spec), **tokens).logits_per_image[0]
        expected = logits.softmax(dim=0)
        predictions = answer.body["predictions"]
        assert sorted(p["label"] for p in predictions) == sorted(prompts)
        for prediction in predictions:
            assert prediction["label"] == prompts[prediction["index"]]
            assert prediction["probability"] == pytest.approx(float(expected[prediction["index"]]), abs=1e-5)
        (explanation,) = answer.body["explanations"]  # the top prompt, by default
        assert explanation["index"] == int(expected.argmax()) and explanation["label"] == prompts[explanation["index"]]
    assert answers[0].body["model"]["task"] == "zero-shot"


def test_a_repeated_prompt_list_costs_no_text_pass_and_the_cache_is_bounded(random_clip):
    texts = PromptEmbeddings(random_clip.model, random_clip.model.texts.tokenize, size=4)
    calls = []
    tower = random_clip.model.source.text_model
    handle = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = texts(PROMPTS)
        assert len(calls) == 1 and texts.text_passes == 1
        again = texts(list(reversed(PROMPTS)))
        assert len(calls) == 1, "a repeated prompt ran the text tower again"
        torch.testing.assert_close(again, first.flip(0))
        texts(["a red shape", "a photo of a blue shape", "a photo of a green shape"])  # two new: one pass for both
        assert len(calls) == 2 and len(texts._cache) == 4  # bounded: the least recently used is out
        assert "a blue shape" not in texts._cache and "a red shape" in texts._cache  # blue was used longest ago
    finally:
        handle.remove()
    torch.testing.assert_close(first.norm(dim=1), torch.ones(3))


def test_a_batch_with_the_archives_prompts_shares_one_forward_pass(random_clip):
    service = service_for(random_clip)
    passes = []
    handle = random_clip.model.source.vision_model.register_forward_hook(lambda *_: passes.append(1))
    try:
        answers = service.answer([{"data": png(image)} for image in scene_images(4, seed=2)])
    finally:
        handle.remove()
    assert [a.status for a in answers] == [200] * 4 and len(passes) == 1


def test_siglip_reads_each_prompt_through_its_own_sigmoid(tmp_path):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from camtools.synthetic import save_clip_tokenizer

    torch.manual_seed(4)
    text = dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                  patch_size=8)  # fmt: skip
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    siglip.save_pretrained(tmp_path / "siglip")
    save_clip_tokenizer(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(tmp_path / "siglip")
    prepared = prepare_model(hf=tmp_path / "siglip", labels=prompts_file(tmp_path, CLASSES), template="a {} shape")
    assert prepared.spec.labels == tuple(PROMPTS) and prepared.spec.layers[prepared.spec.default_layer] == "tokens"
    service = service_for(prepared)
    image = scene_images(1, seed=3)[0]
    (answer,) = service.answer([{"data": png(image), "threshold": b"0.3"}])
    assert answer.status == 200, answer.body
    tokens = prepared.model.texts.tokenize(PROMPTS)
    with torch.no_grad():
        logits = siglip.eval()(pixel_values=images_to_batch([image], prepared.spec), **tokens).logits_per_image[0]
    for prediction in answer.body["predictions"]:
        probability = float(logits[prediction["index"]].sigmoid())
        assert prediction["probability"] == pytest.approx(probability, abs=1e-5)
        assert prediction["positive"] == (probability >= 0.3)
    assert "threshold" not in service_for(
        prepare_model(hf=tmp_path / "siglip", labels=prompts_file(tmp_path, CLASSES), template="a {} shape")
    ).task.options - {"threshold"}


def test_open_clip_builds_offline_and_scores_as_open_clip_does(tmp_path):
    import open_clip

    prepared = prepare_model(arch="open_clip:ViT-S-32", weights="random", prompts=prompts_file(tmp_path))
    spec = prepared.spec
    assert spec.embedding == {"encoder": "open_clip", "size": 384, "scores": "logits", "context": 77,
                              "open_clip": "ViT-S-32"}  # fmt: skip
    assert spec.default_layer == "visual.transformer.resblocks.11.ln_1" and spec.input_size == 224
    service = service_for(prepared, threads=1)
    image = np.asarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3)), np.uint8)
    (answer,) = service.answer([{"data": png(image), "target": b"1"}])
    assert answer.status == 200, answer.body
    source = prepared.model.source
    with torch.no_grad():
        features = F.normalize(source.encode_image(images_to_batch([image], spec)), dim=-1)
        texts = F.normalize(source.encode_text(open_clip.get_tokenizer("ViT-S-32")(PROMPTS)), dim=-1)
        expected = (source.logit_scale.exp() * features @ texts.T)[0].softmax(dim=0)
    for prediction in answer.body["predictions"]:
        assert prediction["probability"] == pytest.approx(float(expected[prediction["index"]]), abs=1e-5)
    long = "a photo of " + "a very " * 40 + "red shape"
    (refused,) = service.answer([{"data": png(image), "prompts": bytearray(json.dumps([long]).encode())}])
    assert refused.status == 400 and "this model reads at most 77 tokens" in refused.body["message"]


# --- Similarity to references ---


EMBEDDER = '''
import torch
from torch import nn


class TinyEmbedder(nn.Module):
    """Two strided convolutions (a 16x16 grid at 64 pixels), global average pooling, a 16-number embedding."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        )
        self.project = nn.Linear(16, 16)

    def forward(self, x):
        return self.project(self.features(x).mean(dim=(2, 3)))
'''


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedder")
    (folder / "tiny_embedder.py").write_text(EMBEDDER)
    return prepare_model(model_file=folder / "tiny_embedder.py", weights="random", task="embedding", input_size=SIZE)


class SimilarityToConceptTarget:
    """pytorch-grad-cam's embeddings tutorial's target: the cosine similarity of the model's output to a concept's
    embedding."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def test_similarity_matches_similarity_to_concept_target(embedder):
    from pytorch_grad_cam import GradCAM

    spec = embedder.spec
    assert spec.task == "embedding" and spec.labels == () and spec.embedding["size"] == 16
    assert spec.default_layer == "features.2" and spec.embedding["scores"] == "cosine"
    torch.manual_seed(6)
    images, concepts = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 16)
    peer = copy.deepcopy(embedder.model.source).requires_grad_(True)
    cam = GradCAM(peer, [peer.features[2]])
    expected = cam(input_tensor=images, targets=[SimilarityToConceptTarget(c) for c in concepts])
    out, ours = our_maps(embedder, images, F.normalize(concepts, dim=-1), [[0], [1]], "features.2")
    assert_matches_reference(ours, expected, "SimilarityToConceptTarget")
    with torch.no_grad():
        cosines = F.cosine_similarity(embedder.model.source(images)[:, None], concepts[None], dim=-1)
    torch.testing.assert_close(out.logits, cosines)


def test_the_similarities_are_the_cosines_and_each_reference_is_explained(embedder):
    service = service_for(embedder)
    query, first, second = scene_images(3, seed=7)
    given = [float(v) for v in np.random.default_rng(1).normal(size=16)]
    rows = [
        {"data": png(query), "reference": [png(first), png(second)], "return_embedding": b"true"},
        {"body": {"image": base64.b64encode(encode(query, "PNG")).decode(), "reference_embedding": given}},
        {"data": png(query), "return_embedding": b"true"},
    ]
    answers = service.answer(rows)
    assert [a.status for a in answers] == [200, 200, 200], [a.body for a in answers]
    batch = images_to_batch([query, first, second], embedder.spec)
    with torch.no_grad():
        vectors = embedder.model.source(batch)
    expected = F.cosine_similarity(vectors[:1], vectors[1:], dim=-1).tolist()
    body = answers[0].body
    assert [s["similarity"] for s in body["similarities"]] == pytest.approx(expected, abs=1e-5)
    assert [s["label"] for s in body["similarities"]] == ["reference 0", "reference 1"]
    assert body["embedding"] == pytest.approx(vectors[0].tolist(), abs=1e-5)
    assert [(e["index"], e["similarity"]) for e in body["explanations"]] == [
        (s["index"], s["similarity"]) for s in body["similarities"]
    ]
    assert "predictions" not in body
    (only,) = answers[1].body["similarities"]
    assert only["similarity"] == pytest.approx(float(F.cosine_similarity(vectors[0], torch.tensor(given), dim=0)), 1e-5)
    assert answers[2].body["explanations"] == [] and answers[2].body["embedding"] == pytest.approx(vectors[0].tolist())


def test_the_maps_of_two_references_are_their_own(embedder):
    """Each explanation differentiates its own reference's similarity: a request's maps are those of a request
    that gives that reference alone."""
    service = service_for(embedder)
    query, first, second = scene_images(3, seed=8)
    both = service.answer([{"data": png(query), "reference": [png(first), png(second)], "heatmap": b"true"}])[0]
    alone = service.answer([{"data": png(query), "reference": png(second), "heatmap": b"true"}])[0]
    first_map, second_map = (heatmap(e) for e in both.body["explanations"])
    assert np.abs(second_map - heatmap(alone.body["explanations"][0])).max() < 1e-3
    assert np.abs(first_map - second_map).max() > 0.1


def heatmap(explanation: dict) -> np.ndarray:
    import cv2

    data = np.frombuffer(base64.b64decode(explanation["heatmap"]), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED) / 65535.0


# --- Trained: each prompt's map points at its own object ---


def pointing(prepared, columns_of, cases) -> tuple[int, int]:
    hits = total = 0
    for scene, colour in cases:
        _, heat = our_maps(prepared, to_batch([scene.image]), columns_of(colour), [[0]], prepared.spec.default_layer)
        y, x = np.unravel_index(heat[0].argmax(), heat[0].shape)
        x0, y0, x1, y1 = scene.boxes[colour]
        hits += x0 - 4 <= x < x1 + 4 and y0 - 4 <= y < y1 + 4
        total += 1
    return hits, total


@pytest.mark.slow
def test_a_trained_clip_points_at_the_object_each_prompt_names(trained, tmp_path):
    prepared = prepare_model(hf=trained, prompts=prompts_file(tmp_path))
    texts = prepared.model.texts
    scenes = [s for s in clip_scenes(80, seed=9)[0] if len(s.boxes) == 2][:30]
    hits, total = pointing(prepared, lambda colour: texts([PROMPTS[colour]]), [(s, c) for s in scenes for c in s.boxes])
    print(f"pointing, prompts: {hits}/{total}")
    assert total >= 40 and hits >= 0.75 * total, (hits, total)
    service = service_for(prepared)
    scene = scenes[0]
    named = [PROMPTS[c] for c in scene.boxes]
    (answer,) = service.answer([{"data": png(scene.image), "prompts": bytearray(json.dumps(named).encode()),
                                 "target": b"0,1"}])  # fmt: skip
    assert answer.status == 200 and [e["label"] for e in answer.body["explanations"]] == named


@pytest.mark.slow
def test_similarity_to_a_one_object_reference_points_at_that_object(trained):
    prepared = prepare_model(hf=trained, task="embedding")
    assert prepared.spec.embedding["scores"] == "cosine" and prepared.spec.labels == ()
    rng = np.random.default_rng(11)
    references = {colour: make_scene(rng, (colour,)).image for colour in range(3)}
    with torch.no_grad():
        units = {c: F.normalize(prepared.model.embed(to_batch([image])), dim=-1) for c, image in references.items()}
    scenes = [s for s in clip_scenes(80, seed=12)[0] if len(s.boxes) == 2][:30]
    hits, total = pointing(prepared, lambda colour: units[colour], [(s, c) for s in scenes for c in s.boxes])
    print(f"pointing, similarity: {hits}/{total}")
    assert total >= 40 and hits >= 0.7 * total, (hits, total)


# --- Refusals and fuzzing ---


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"prompts": b"[]"}, "prompts must be a list of 1 to 64 sentences"),
        ({"prompts": json.dumps(["a"] * 65).encode()}, "prompts must be a list of 1 to 64 sentences"),
        ({"prompts": json.dumps(["x" * 301]).encode()}, "at most 300 characters"),
        ({"prompts": json.dumps(["a red shape", " "]).encode()}, "prompts must be a list"),
        ({"prompts": json.dumps(["a red shape " * 3]).encode()}, "this model reads at most 8 tokens"),
        ({"target": b"3"}, "target must be a prompt index from 0 to 2"),
        ({"reference_embedding": b"[1, 2]"}, "option reference_embedding fits only embedding models"),
    ],
)
def test_bad_prompts_are_refused_naming_what_is_accepted(random_clip, fields, fragment):
    service = service_for(random_clip)
    (answer,) = service.answer([{"data": png(scene_images(1, 0)[0]), **{k: bytearray(v) for k, v in fields.items()}}])
    assert answer.status == 400 and fragment in answer.body["message"], answer.body


def test_prompts_to_a_classifier_are_refusal():
    from camtools.synthetic import SHAPES_NET

    prepared = prepare_model(model_file=SHAPES_NET, weights="random", input_size=SIZE)
    (answer,) = service_for(prepared).answer([{"data": png(scene_images(1, 0)[0]), "prompts": bytearray(b'["a"]')}])
    assert answer.status == 400 and "option prompts fits only zero-shot models" in answer.body["message"]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({}, "give reference (an image"),
        ({"reference": b"not an image"}, "reference 0: "),
        ({"reference_embedding": b"[1, 2, 3]"}, "reference_embedding 0 has 3 numbers; this model's embeddings have 16"),
        ({"reference_embedding": json.dumps([1.0] * 15 + ["NaN"]).encode()}, "reference_embedding must be a list"),
        ({"reference_embedding": b"[" + b"1, " * 15 + b"NaN]"}, "reference_embedding must be a list of finite"),
        ({"prompts": b'["a"]'}, "option prompts fits only zero-shot models"),
        ({"target": b"0"}, "option target fits only"),
    ],
)
def test_bad_references_are_refused_naming_what_is_accepted(embedder, fields, fragment):
    service = service_for(embedder)
    (answer,) = service.answer([{"data": png(scene_images(1, 0)[0]), **{k: bytearray(v) for k, v in fields.items()}}])
    assert answer.status == 400 and fragment in answer.body["message"], answer.body


def test_a_json_nan_in_a_reference_embedding_is_refusal(embedder):
    body = b'{"image": "%s", "reference_embedding": [' % base64.b64encode(encode(scene_images(1, 0)[0])) + (
        b"0.5, " * 15 + b"NaN]}"
    )
    (answer,) = service_for(embedder).answer([{"body": bytearray(body)}])
    assert answer.status == 400 and "finite numbers" in answer.body["message"]


def test_the_build_refuses_what_cannot_be_a_zero_shot_model(tmp_path, random_clip):
    from camtools.synthetic import SHAPES_NET

    with pytest.raises(BuildError, match="--task zero-shot needs an image–text model"):
        prepare_model(model_file=SHAPES_NET, weights="random", task="zero-shot", input_size=SIZE)
    with pytest.raises(BuildError, match="needs its default prompts"):
        prepare_model(arch="open_clip:ViT-S-32", weights="random")
    with pytest.raises(BuildError, match="is not an open_clip model: did you mean open_clip:ViT-B-32"):
        prepare_model(arch="open_clip:ViT-B-23", weights="random", prompts=prompts_file(tmp_path))
    with pytest.raises(BuildError, match="takes --weights PATH"):
        prepare_model(arch="open_clip:ViT-S-32", prompts=prompts_file(tmp_path))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.one_of(option_names, st.sampled_from(["prompts", "reference", "reference_embedding"])),
                       values, max_size=4))  # fmt: skip
def test_fuzzed_options_to_both_tasks_are_answered_or_refused_with_a_4xx(random_clip, embedder, options):
    image = png(scene_images(1, 0)[0])
    for prepared in (random_clip, embedder):
        good = {"data": image, "reference": image} if prepared is embedder else {"data": image}
        fuzzed = {"body": {"image": base64.b64encode(bytes(image)).decode(), **options}}
        results = service_for(prepared, threads=1).answer([fuzzed, good])
        assert results[0].status == 200 or 400 <= results[0].status < 500, results[0].body
        assert results[1].status == 200, results[1].body


def test_the_tiny_clip_is_a_real_clip_model():
    from transformers import CLIPModel

    assert type(CLIPModel(tiny_clip_config())).__name__ == "CLIPModel"
    assert (ROOT / "camtools" / "synthetic.py").is_file()


# --- Live: a zero-shot archive and an embedding archive beside a classifier and the 3D ones, on one torchserve ---


def zero_shot_builds(folder) -> list[list[str]]:
    """scripts/build_mar.py's arguments for a tiny CLIP (--hf, seeded random weights, its tokenizer) with default
    prompts and the tiny embedder (--model-file --task embedding), their files written into ``folder``."""
    from transformers import CLIPModel

    torch.manual_seed(3)
    save_clip(CLIPModel(tiny_clip_config()), folder / "clip")
    (folder / "tiny_embedder.py").write_text(EMBEDDER)
    return [
        ["--hf", str(folder / "clip"), "--prompts", str(prompts_file(folder)), "--model-name", "clip"],
        ["--model-file", str(folder / "tiny_embedder.py"), "--weights", "random", "--task", "embedding",
         "--input-size", str(SIZE), "--model-name", "embedder"],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def live(new_kinds_server):
    """The zero-shot archive and the embedding archive, served beside a classifier (tests/conftest.py)."""
    return new_kinds_server[0]


@pytest.mark.integration
def test_torchserve_serves_a_zero_shot_and_an_embedding_archive_beside_a_classifier(live):
    import requests

    image = bytes(png(scene_images(1, seed=4)[0]))

    def post(model: str, **fields):
        files = {"data": ("scene.png", image)}
        if "reference" in fields:
            files["reference"] = ("reference.png", fields.pop("reference"))
        url = f"{live.inference}/predictions/{model}"
        return requests.post(url, files=files, data=fields, headers=live.headers(), timeout=120)

    default = post("clip").json()
    assert default["model"]["task"] == "zero-shot"
    assert sorted(p["label"] for p in default["predictions"]) == sorted(PROMPTS)
    asked = post("clip", prompts=json.dumps(["a blue shape", "a red shape"]), target="0,1").json()
    assert [e["label"] for e in asked["explanations"]] == ["a blue shape", "a red shape"]
    assert sum(p["probability"] for p in asked["predictions"]) == pytest.approx(1, abs=1e-5)
    refused = post("clip", prompts="[]")
    assert refused.status_code == 400 and "prompts must be a list of 1 to 64" in refused.json()["message"]
    similar = post("embedder", reference=image, return_embedding="true").json()
    assert similar["similarities"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)  # the image against itself
    assert len(similar["embedding"]) == 16 and len(similar["explanations"]) == 1
    missing = post("embedder")
    assert missing.status_code == 400 and "give reference" in missing.json()["message"]
    classifier = post("classifier", prompts='["a cat"]')
    assert classifier.status_code == 400 and "fits only zero-shot models" in classifier.json()["message"]
    assert post("classifier").status_code == 200


def test_the_cli_explains_prompts_and_references(random_clip, tmp_path, capsys):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("explain_cli", ROOT / "scripts" / "explain.py")
    cli = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(cli)
    clip_dir = random_clip.hf_config.parent
    query, reference = tmp_path / "query.png", tmp_path / "reference.png"
    query.write_bytes(bytes(png(scene_images(1, seed=5)[0])))
    reference.write_bytes(bytes(png(scene_images(1, seed=6)[0])))
    prompts = prompts_file(tmp_path)
    assert cli.main([str(query), "--hf", str(clip_dir), "--prompts", str(prompts), "--target", "0,2",
                     "--out", str(tmp_path / "zs")]) == 0  # fmt: skip
    written = sorted(path.name for path in (tmp_path / "zs").iterdir())
    assert written == ["query_0_a_red_shape.png", "query_2_a_blue_shape.png", "query_sheet.png"]
    assert cli.main([str(query), "--hf", str(clip_dir), "--task", "embedding", "--reference", str(reference),
                     "--out", str(tmp_path / "em")]) == 0  # fmt: skip
    assert "reference 0 similarity=" in capsys.readouterr().out
    assert (tmp_path / "em" / "query_0_reference_0.png").is_file()


@pytest.mark.integration
def test_the_page_sends_prompts_and_a_reference(live, tmp_path):
    from camtools.local_server import free_port
    from tests.test_integration import CHROMIUM, serving_page

    if CHROMIUM is None:
        pytest.skip("Chromium is missing: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    scene = png(scene_images(1, seed=4)[0])
    upload = [{"name": "scene.png", "mimeType": "image/png", "buffer": bytes(scene)}]
    with serving_page(live.inference, free_port()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.fill("#token", live.keys["inference"])
            page.set_input_files("#image", files=upload)
            for model, fill in (("clip", "#prompts"), ("embedder", "#reference")):
                page.fill("#model", model)
                if fill == "#prompts":
                    page.fill("#prompts", "a blue shape\na red shape")
                else:
                    page.fill("#prompts", "")
                    page.set_input_files("#reference", files=upload)
                page.evaluate("document.body.dataset.state = ''")
                page.click("button[type=submit]")
                page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=90_000)
                assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")
                bars = page.locator("#bars .bar").all_inner_texts()
                if model == "clip":  # the request's two prompts, not the archive's three
                    assert len(bars) == 2 and {b.split(" (")[0] for b in bars} == {"a blue shape", "a red shape"}
                else:
                    assert len(bars) == 1 and bars[0].startswith("reference 0") and "1.000" in bars[0]
                    assert "cosine similarity 1.000" in page.inner_text("#overlay-caption")
        finally:
            browser.close()


# --- Every method, and KServe's door ---


def test_every_method_answers_or_is_refused_with_its_reason_for_both_tasks(random_clip, embedder):
    """A zero-shot and an embedding request for each of the 24 methods, faithfulness and sanity: a 200 with one
    finite map per prompt or reference, or a 400 that says why the method does not apply; never a 5xx."""
    from camserve.cam import METHODS

    image = png(scene_images(1, seed=2)[0])
    refused = {}
    for prepared, extra in ((random_clip, {"target": b"0,2"}), (embedder, {"reference": [image, image]})):
        service = service_for(prepared, threads=1)
        for method in METHODS:
            row = {"data": image, "method": bytearray(method.encode()), "faithfulness_steps": b"4", **extra}
            if method in ("gradcam", "scorecam"):  # a perturbation method scores the same scalar as faithfulness
                row |= {"faithfulness": b"true", "sanity": b"true" if method == "gradcam" else b"false"}
            (answer,) = service.answer([row])
            assert answer.status in (200, 400), (prepared.spec.task, method, answer.body)
            if answer.status == 400:
                refused[(prepared.spec.task, method)] = answer.body["message"]
                reasons = ("does not apply", "contrasts", "at most 100 are run per request")  # SS-CAM: 2241 passes
                assert any(reason in answer.body["message"] for reason in reasons), answer.body
                continue
            explanations = answer.body["explanations"]
            assert len(explanations) == 2, (method, answer.body)
            if "faithfulness" in row:
                figures = explanations[0]["faithfulness"]
                assert np.isfinite([figures["deletion"], figures["insertion"]]).all()
                assert method != "gradcam" or explanations[0]["sanity"]["randomised"]
    assert len(refused) < len(METHODS), refused  # most methods apply to both
    print(f"refused: {refused}")


def test_kserve_v1_and_v2_carry_prompts_and_references(random_clip, embedder, tmp_path):
    import asyncio

    from kserve import InferInput, InferRequest

    from camserve.kserve import CamModel, unpacked_archive
    from camtools.archive import build_archive

    image = base64.b64encode(encode(scene_images(1, seed=3)[0], "PNG")).decode()
    models = {}
    for name, prepared in (("clip", random_clip), ("embedder", embedder)):
        mar = build_archive(prepared, tmp_path / "store")
        models[name] = CamModel(unpacked_archive(mar, tmp_path / name), torch.device("cpu"))
        assert models[name].load()
    v1 = {"instances": [{"data": image, "prompts": ["a blue shape", "a red shape"], "target": [1]}]}
    (answer,) = asyncio.run(models["clip"].predict(v1))["predictions"]
    assert [e["label"] for e in answer["explanations"]] == ["a red shape"]
    v2 = InferRequest(
        model_name="clip",
        infer_inputs=[InferInput("image", [1], "BYTES", [image], parameters={"prompts": '["a green shape"]'})],
    )
    response = asyncio.run(models["clip"].predict(v2))
    (text,) = response.outputs[0].data
    assert [p["label"] for p in json.loads(text)["predictions"]] == ["a green shape"]
    v1 = {"instances": [{"data": image, "reference": [image], "return_embedding": True}]}
    (answer,) = asyncio.run(models["embedder"].predict(v1))["predictions"]
    assert answer["similarities"][0]["similarity"] == pytest.approx(1.0, abs=1e-4) and len(answer["embedding"]) == 16


def test_timm_and_hugging_face_vision_models_build_as_embedding_models(tmp_path):
    from tests.helpers import save_hf_models

    timm_model = prepare_model(arch="timm:resnet18", weights="random", task="embedding", progress=False)
    assert timm_model.spec.embedding == {"encoder": "vector", "size": 512, "scores": "cosine"}
    assert timm_model.spec.default_layer == "layer4" and timm_model.spec.arch_kwargs["num_classes"] == 0
    vit_dir, _ = save_hf_models(tmp_path)
    hf = prepare_model(hf=vit_dir, task="embedding")
    assert hf.spec.output == "pooler_output" and hf.spec.embedding["size"] == 32
    assert hf.spec.layers[hf.spec.default_layer] == "cls_tokens"
    for prepared in (timm_model, hf):
        side = prepared.spec.input_size
        image = np.asarray(np.random.default_rng(2).integers(0, 256, (side, side, 3)), np.uint8)
        (answer,) = service_for(prepared).answer([{"data": png(image), "reference": png(image[::-1])}])
        assert answer.status == 200 and -1 <= answer.body["similarities"][0]["similarity"] <= 1, answer.body


def test_the_similarity_target_by_hand():
    """A1 = x, A2 = 10 − x (a 1x1 convolution with a bias), e = the mean of A over the 2x2 positions = (2.5, 7.5),
    against the column c = (1, 0): cos = e·c/|e| = 2.5/√62.5 = 0.31623, and ∂cos/∂e = (c − cos·ê)/|e| =
    (0.9, −0.3)/7.9057. Each position's gradient is a quarter of it: α = (0.0284605, −0.0094868). The map is
    ReLU(α1·x + α2·(10 − x)) = ReLU(0.0379473·x − 0.094868): 0, 0, 0.018974, 0.056921."""
    from camserve.embeddings import ColumnScores

    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(1, 2, 1)
            with torch.no_grad():
                self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
                self.features.bias.copy_(torch.tensor([0.0, 10.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.features(x).mean(dim=(2, 3))

    model = ColumnScores(Embedder().eval(), "vector", scaled=False)
    model.columns.vectors = torch.tensor([[1.0, 0.0]])
    engine = CamEngine(model, input_size=2, default_layer="features")
    engine.input_channels = 1
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out = engine(x, [CamRequest(Classes([0]))])
    assert float(out.logits[0, 0]) == pytest.approx(2.5 / 62.5**0.5, abs=1e-6)
    torch.testing.assert_close(out.maps[0][0], torch.tensor([[0.0, 0.0], [0.018974, 0.056921]]), atol=1e-5, rtol=0)
