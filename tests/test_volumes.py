"""Volumes and 3D networks: Grad-CAM's weights averaged over three axes (hand-computed), MONAI's GradCAM and
GradCAMpp at the layer's grid, the NIfTI reading under a voxel limit, trilinear resizing against torch's, the
answer (a NIfTI map with the input's affine, the montage, the peak), a 3D network trained here whose peak voxel
lies in the ball, the refusals and fuzzed NIfTI headers."""

from __future__ import annotations

import base64
import gzip
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from camserve.cam import CamEngine, CamRequest, Classes
from camserve.cam.layers import volume_map
from camserve.volumes import open_nifti, resize_volume, scale_intensity
from camtools.models import BuildError, prepare_model
from tests.helpers import assert_matches_reference, refusal, service_for

NET3D = '''
import torch
from torch import nn


class Net3D(nn.Module):
    """Two strided 3D convolutions, a third, a ReLU, global average pooling, a linear head of three classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv3d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3, 4)))
'''
AFFINE = np.array([[1.5, 0, 0, -30.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])


def nifti(volume: np.ndarray, affine: np.ndarray = AFFINE, compressed: bool = True) -> bytes:
    import nibabel

    data = nibabel.Nifti1Image(np.asarray(volume), affine).to_bytes()
    return gzip.compress(data) if compressed else data


@pytest.fixture(scope="module")
def net3d(tmp_path_factory):
    folder = tmp_path_factory.mktemp("net3d")
    (folder / "net3d.py").write_text(NET3D)
    return prepare_model(
        model_file=folder / "net3d.py", weights="random", channels=1, spatial_dims=3, input_size=(24, 20, 16)
    )


def engine_of(prepared) -> CamEngine:
    engine = CamEngine(prepared.model, input_size=prepared.spec.input_size, default_layer=prepared.spec.default_layer)
    engine.input_channels, engine.input_spatial = prepared.spec.channels, prepared.spec.volume
    return engine


# --- Hand-computed ---


class TinyHead3D(nn.Module):
    """features: A^1 = x, A^2 = −x (a 1x1x1 convolution); head: the mean over the three axes, then W · pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 2, kernel_size=1, bias=False)
        self.head = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1))
            self.head.weight.copy_(torch.tensor([[1.0, -2.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def test_grad_cams_weights_average_over_all_three_axes():
    # y = mean(A^1) − 2·mean(A^2) over 8 voxels: ∂y/∂A^1 = 1/8, ∂y/∂A^2 = −2/8 everywhere, so α = (1/8, −1/4) and
    # the map is ReLU(x/8 + (−1/4)(−x)) = 3x/8, voxel by voxel.
    x = torch.arange(1.0, 9.0).view(1, 1, 2, 2, 2)
    engine = CamEngine(TinyHead3D(), input_size=2, default_layer="features")
    engine.input_channels, engine.input_spatial = 1, (2, 2, 2)
    assert engine.layers()["features"].layout == "ncdhw"
    out = engine(x, [CamRequest(Classes([0]))])
    torch.testing.assert_close(volume_map(out.maps[0][0], (1, 2, 2, 2, 2)), 3 * x[0, 0] / 8)
    eigen = engine(x, [CamRequest(Classes([0]), method="eigencam")])  # the first principal component of A
    assert eigen.maps[0].shape == (1, 2, 4) and torch.isfinite(eigen.maps[0]).all()


# --- MONAI's GradCAM and GradCAMpp, at the layer's grid ---


def monai_map(model: nn.Module, method, layer: str, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    import copy

    peer = copy.deepcopy(model).requires_grad_(True)
    cam = method(nn_module=peer, target_layers=layer)
    maps = []
    for image, target in zip(images, classes, strict=True):
        raw = cam.compute_map(image[None], class_idx=target)[0, 0]  # ReLU'd, at the layer's grid
        low, high = raw.min(), raw.max()
        maps.append(((raw - low) / (high - low)).detach().numpy())
    return np.stack(maps).reshape(len(images), raw.shape[0], -1)


def our_grid_maps(prepared, images: torch.Tensor, classes: list[int], layer: str, method: str) -> np.ndarray:
    out = engine_of(prepared)(images, [CamRequest(Classes([c]), layer, method) for c in classes])
    maps = []
    for cam in out.maps:
        low, high = cam.min(), cam.max()
        maps.append(((cam[0] - low) / (high - low)).numpy())
    return np.stack(maps)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_3d_network_matches_monais_cams_at_the_grid(net3d, method):
    from monai.visualize import GradCAM, GradCAMpp

    spec = net3d.spec
    assert spec.volume == (24, 20, 16) and spec.layers[spec.default_layer] == "ncdhw"
    prepared = with_larger_head(net3d, "head")
    torch.manual_seed(0)
    images = torch.randn(2, 1, 24, 20, 16)
    reference = {"gradcam": GradCAM, "gradcam++": GradCAMpp}[method]
    expected = monai_map(prepared.model, reference, "features.5", images, [2, 0])
    ours = our_grid_maps(prepared, images, [2, 0], "features.5", method)
    assert_matches_reference(ours, expected, f"MONAI {method} on Net3D")


def with_larger_head(prepared, head: str, scale: float = 100.0):
    """A copy whose linear head's weights are ``scale`` times larger. Grad-CAM++'s α = g² / (2g² + Σ A·g³ + ε):
    pytorch-grad-cam's ε is 10⁻⁶ (ours, inside the denominator), MONAI's 10⁻⁷; with a random head's gradients of
    about 10⁻³, g² is of ε's order and the two references part. With gradients of a trained size they agree."""
    import copy

    twin = copy.deepcopy(prepared)
    with torch.no_grad():
        twin.model.get_submodule(head).weight.mul_(scale)
    return twin


@pytest.mark.slow
def test_monais_densenet121_builds_and_matches_monais_gradcam():
    from monai.visualize import GradCAM, GradCAMpp

    prepared = prepare_model(arch="monai:DenseNet121", weights="random", channels=1, spatial_dims=3,
                             input_size=(64, 64, 64))  # fmt: skip
    assert prepared.spec.arch_kwargs == {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}
    assert prepared.spec.layers["class_layers.relu"] == "ncdhw"  # MONAI's own target layer, a 2x2x2 grid here
    prepared = with_larger_head(prepared, "class_layers.out")
    torch.manual_seed(1)
    images = torch.randn(1, 1, 64, 64, 64)
    for method, reference in (("gradcam", GradCAM), ("gradcam++", GradCAMpp)):
        expected = monai_map(prepared.model, reference, "class_layers.relu", images, [1])
        ours = our_grid_maps(prepared, images, [1], "class_layers.relu", method)
        assert_matches_reference(ours, expected, f"MONAI {method} on DenseNet121")


# --- NIfTI, intensity, resizing ---


def test_a_nifti_is_read_with_its_shape_and_affine_gzipped_or_not():
    volume = np.random.default_rng(0).normal(size=(20, 18, 12)).astype(np.float32)
    for compressed in (True, False):
        opened = open_nifti(nifti(volume, compressed=compressed), max_voxels=10_000, max_bytes=10**7)
        assert opened.shape == (20, 18, 12)
        np.testing.assert_allclose(opened.affine, AFFINE)
        np.testing.assert_allclose(opened.voxels(), volume)
    np.testing.assert_allclose(scale_intensity(volume, "window:-1,1"), np.clip((volume + 1) / 2, 0, 1), atol=1e-6)
    scaled = scale_intensity(volume, "minmax")
    assert scaled.min() == 0 and scaled.max() == 1


@pytest.mark.parametrize("shape", [(24, 20, 16), (9, 31, 7), (20, 18, 12)])
def test_trilinear_resizing_equals_torchs(shape):
    volume = np.random.default_rng(1).random((20, 18, 12)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(volume)[None, None], size=shape, mode="trilinear", align_corners=False)
    np.testing.assert_allclose(resize_volume(volume, shape), expected[0, 0].numpy(), atol=1e-5)


# --- The answer ---


def test_the_answer_is_a_nifti_map_with_the_inputs_affine_a_montage_and_the_peak(net3d):
    import nibabel

    volume = np.random.default_rng(2).normal(100, 20, (30, 26, 20)).astype(np.float32)
    (answer,) = service_for(net3d).answer([{"data": bytearray(nifti(volume)), "target": b"0,2"}])
    assert answer.status == 200, answer.body
    body = answer.body
    assert body["image"] == {"width": 30, "height": 26, "depth": 20} and len(body["predictions"]) == 3
    for explanation, index in zip(body["explanations"], (0, 2), strict=True):
        assert explanation["index"] == index
        image = nibabel.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(explanation["heatmap"])))
        heat = np.asarray(image.dataobj)
        assert heat.shape == (30, 26, 20) and heat.dtype == np.float32 and heat.min() >= 0 and heat.max() <= 1
        np.testing.assert_allclose(image.affine, AFFINE)
        peak = explanation["peak"]
        assert peak["voxel"] == list(np.unravel_index(int(heat.argmax()), heat.shape))
        np.testing.assert_allclose(peak["world"], (AFFINE @ np.array([*peak["voxel"], 1.0]))[:3], atol=1e-3)
        montage = np.frombuffer(base64.b64decode(explanation["overlay"]), np.uint8)
        assert montage[:2].tobytes() == b"\xff\xd8" and explanation["height"] == 256 and explanation["width"] > 600


@pytest.mark.slow
def test_a_trained_3d_network_peaks_in_the_ball(tmp_path):
    from camtools.synthetic import make_volume, trained_volume_model

    prepared, accuracy = trained_volume_model(tmp_path)
    assert accuracy >= 0.9, accuracy
    service = service_for(prepared)
    rng = np.random.default_rng(5)
    balls = [v for v in (make_volume(rng) for _ in range(40)) if v.label == 1][:12]
    rows = [{"data": bytearray(nifti(v.voxels, np.eye(4))), "target": b"1"} for v in balls]
    hits = 0
    for ball, answer in zip(balls, service.answer(rows), strict=True):
        assert answer.status == 200, answer.body
        voxel = answer.body["explanations"][0]["peak"]["voxel"]
        hits += all(low - 1 <= v < high + 1 for v, (low, high) in zip(voxel, ball.box, strict=True))
    print(f"pointing, 3D: {hits}/{len(balls)}")
    assert len(balls) >= 10 and hits >= 0.9 * len(balls), (hits, len(balls))


# --- Refusals ---


def test_what_a_3d_model_refuses_and_why(net3d):
    service = service_for(net3d)
    volume = np.zeros((10, 10, 10), np.float32)
    assert "dimensions [10, 10, 10, 3]" in refusal(service, nifti(np.zeros((10, 10, 10, 3), np.float32)))["message"]
    assert "send a NIfTI file" in refusal(service, _png())["message"]
    huge = nifti(np.zeros((2, 2, 2), np.float32))
    import nibabel

    header = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header
    header.set_data_shape((3000, 3000, 3000))
    bomb = gzip.compress(header.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    body = refusal(service, bomb)
    assert body["code"] == 413 and "3000x3000x3000" in body["message"], body
    assert huge  # a small one is answered (below)
    for option, value in (("aug_smooth", b"true"), ("faithfulness", b"true"), ("sanity", b"true")):
        assert "work on 2D images" in refusal(service, nifti(volume + 1), **{option: value})["message"]
    assert (
        "a 3D network's layer is explained by the gradient and activation"
        in refusal(service, nifti(volume + 1), method=b"scorecam")["message"]
    )
    assert "truncated" in refusal(service, nifti(volume + 1, compressed=False)[:-200])["message"]


def test_a_2d_model_refuses_a_volume(tmp_path):
    from tests.conftest import ROOT

    prepared = prepare_model(model_file=ROOT / "tests" / "models" / "tiny_net.py", weights="random", input_size=64)
    body = refusal(service_for(prepared), nifti(np.zeros((10, 10, 10), np.float32)))
    assert "the body is a NIfTI volume; this model explains 2D images" in body["message"]


def test_the_build_refuses_what_is_not_a_3d_network(tmp_path):
    with pytest.raises(BuildError, match="--spatial-dims 3 needs --input-size D H W"):
        prepare_model(arch="monai:DenseNet121", weights="random", spatial_dims=3, channels=1, input_size=64)
    with pytest.raises(BuildError, match="takes --arch monai:NAME"):
        prepare_model(arch="resnet18", weights="random", spatial_dims=3, input_size=(8, 8, 8))
    with pytest.raises(BuildError, match="monai.networks.nets has no DenseNet1210"):
        prepare_model(arch="monai:DenseNet1210", weights="random", spatial_dims=3, input_size=(8, 8, 8))
    with pytest.raises(BuildError, match="--intensity must be minmax or window:LOW,HIGH"):
        prepare_model(arch="monai:DenseNet121", weights="random", spatial_dims=3, input_size=(8, 8, 8), intensity="x")


def _png() -> bytes:
    from tests.conftest import encode

    return encode(np.zeros((32, 32, 3), np.uint8))


DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 1536, 2304, 0, 7, 32767]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    dims=st.lists(st.integers(-5, 70000), min_size=8, max_size=8),
    pixdim=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=8, max_size=8),
    datatype=st.sampled_from(DATATYPES),
    tail=st.integers(0, 4096),
    compressed=st.booleans(),
)
def test_fuzzed_nifti_headers_get_an_answer_or_a_4xx(net3d, dims, pixdim, datatype, tail, compressed):
    import nibabel

    header = nibabel.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).header
    block = bytearray(header.binaryblock)
    block[40:56] = np.asarray(dims, dtype="<i2" if max(abs(d) for d in dims) < 32768 else "<i4")[:8].tobytes()[:16]
    block[70:72] = np.int16(datatype).tobytes()
    block[76:108] = np.asarray(pixdim, dtype="<f4").tobytes()
    data = bytes(block) + b"\x00" * 4 + np.random.default_rng(tail).bytes(tail)
    data = gzip.compress(data) if compressed else data
    good = nifti(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32))
    answers = service_for(net3d).answer([{"data": bytearray(data)}, {"data": bytearray(good)}])
    assert answers[0].status == 200 or 400 <= answers[0].status < 500, answers[0].body
    assert answers[1].status == 200, answers[1].body


def test_the_montage_reads_well(net3d, tmp_path):
    """The picture's three slices go through the peak (a voxel of the map's maximum is on each tile)."""
    volume = np.zeros((24, 20, 16), np.float32)
    volume[6:10, 12:16, 4:8] = 1
    (answer,) = service_for(net3d).answer([{"data": bytearray(nifti(volume)), "colormap": b"jet", "alpha": b"1"}])
    data = np.frombuffer(base64.b64decode(answer.body["explanations"][0]["overlay"]), np.uint8)
    from PIL import Image

    picture = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
    third = picture.shape[1] // 3
    for tile in range(3):  # jet's hottest is red: each tile has some
        part = picture[:, tile * third : (tile + 1) * third].astype(int)
        assert ((part[..., 0] > 150) & (part[..., 2] < 100)).any(), tile


# --- Live: a 3D archive and a grayscale archive beside a classifier, on one torchserve; the 3D one on KServe ---


def medical_builds(folder) -> list[list[str]]:
    """scripts/build_mar.py's arguments for the 3D network (seeded random weights, --spatial-dims 3) and a grayscale
    network (tests/models/grey_net.py, --channels 1), their files written into ``folder``."""
    from tests.conftest import ROOT

    (folder / "net3d.py").write_text(NET3D)
    return [
        ["--model-file", str(folder / "net3d.py"), "--weights", "random", "--spatial-dims", "3", "--input-size", "24",
         "20", "16", "--channels", "1", "--intensity", "window:-1,2", "--model-name", "volumes"],
        ["--model-file", str(ROOT / "tests" / "models" / "grey_net.py"), "--weights", "random", "--channels", "1",
         "--input-size", "64", "--model-name", "radiographs"],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def medical_server(new_kinds_server):
    """The 3D archive and the grayscale archive, served beside a classifier (tests/conftest.py), and the folder
    whose ``store`` holds their archives."""
    return new_kinds_server


@pytest.mark.integration
def test_torchserve_serves_a_3d_and_a_grayscale_archive_beside_a_classifier(medical_server):
    import requests

    from tests.test_medical import dicom_bytes, radiograph

    server, _ = medical_server

    def post(model: str, data: bytes, **fields):
        url = f"{server.inference}/predictions/{model}"
        return requests.post(url, files={"data": ("upload", data)}, data=fields, headers=server.headers(), timeout=120)

    volume = np.random.default_rng(3).normal(size=(30, 26, 20)).astype(np.float32)
    answer = post("volumes", nifti(volume), target="0,1").json()
    assert answer["image"] == {"width": 30, "height": 26, "depth": 20} and len(answer["explanations"]) == 2
    assert answer["explanations"][0]["peak"]["voxel"] and answer["explanations"][0]["heatmap"]
    assert post("volumes", _png()).status_code == 400
    dicom = dicom_bytes(radiograph(), window=(2000, 3000), photometric="MONOCHROME1")
    radiographs = post("radiographs", dicom, window="[1500, 2500]").json()
    assert radiographs["image"] == {"width": 80, "height": 96} and radiographs["model"]["classes"] == 2
    assert post("radiographs", _png()).status_code == 200  # an RGB upload: its luminance
    assert post("classifier", dicom).status_code == 200  # a DICOM to an RGB model: its grey in all three channels
    refused = post("classifier", nifti(volume))
    assert refused.status_code == 400 and "this model explains 2D images" in refused.json()["message"]


@pytest.mark.integration
def test_the_same_3d_archive_answers_through_kserves_server(medical_server, tmp_path):
    import asyncio

    from camserve.kserve import CamModel, unpacked_archive

    _, folder = medical_server
    model = CamModel(unpacked_archive(folder / "store" / "volumes.mar", tmp_path), torch.device("cpu"))
    assert model.load()  # its warm-up explains a sample volume
    volume = np.random.default_rng(4).normal(size=(16, 16, 16)).astype(np.float32)
    instance = {"data": base64.b64encode(nifti(volume)).decode(), "target": [1]}
    (answer,) = asyncio.run(model.predict({"instances": [instance]}))["predictions"]
    assert answer["image"]["depth"] == 16 and answer["explanations"][0]["index"] == 1
