"""Medical images: DICOM radiographs decoded as the standard says (against pydicom's own LUT functions), their maps
equal to those of the PNG that their window shows, grayscale models, the refusals, and fuzzed DICOM headers."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camserve.cam import CamEngine, CamRequest, Classes, normalize_map
from camserve.imaging import open_image
from camserve.medical import window_linear
from camserve.pixels import load_gray
from camtools.models import BuildError, prepare_model
from tests.conftest import ROOT, encode
from tests.helpers import assert_matches_reference, refusal, service_for

GREY_NET = ROOT / "tests" / "models" / "grey_net.py"
TINY_NET = ROOT / "tests" / "models" / "tiny_net.py"


def radiograph(rows: int = 96, columns: int = 80, bits: int = 12, seed: int = 0) -> np.ndarray:
    """Stored values of a synthetic radiograph: a bright disc (bone) and a darker band on a noisy background."""
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    image = rng.normal(0.3 * top, 0.05 * top, (rows, columns))
    cv2.circle(image, (columns // 3, rows // 2), rows // 6, 0.85 * top, -1)
    cv2.rectangle(image, (columns // 2, rows // 5), (columns - 8, rows // 3), 0.55 * top, -1)
    return np.clip(np.round(image), 0, top).astype(np.uint16)


def dicom_bytes(
    stored: np.ndarray,
    bits: int = 12,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    pixels: bool = True,
    syntax=None,
    **tags,
) -> bytes:
    """A DICOM Part 10 file written with pydicom: a secondary-capture radiograph with these pixels and tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "PID-31415", "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels and meta.TransferSyntaxUID.is_compressed:  # a fragment of the codestream's start: never decoded here
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    elif pixels:
        ds.PixelData = stored.astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png16(grey: np.ndarray) -> bytes:
    """A [0, 1] grayscale as a 16-bit PNG."""
    return encode_png16(np.round(np.clip(grey, 0, 1) * 65535).astype(np.uint16))


def encode_png16(levels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", levels)
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def grey_model():
    return prepare_model(model_file=GREY_NET, weights="random", channels=1, input_size=64, labels=None)


@pytest.fixture(scope="module")
def rgb_model():
    return prepare_model(model_file=TINY_NET, weights="random", input_size=64, seed=1)


# --- The decoding chain, against pydicom's own functions ---


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_the_decoding_chain_is_the_standards(photometric):
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = radiograph()
    data = dicom_bytes(stored, slope=0.5, intercept=-1024, window=(-300, 700), photometric=photometric)
    opened = open_image(data)
    assert (opened.width, opened.height) == (80, 96) and opened.precise
    ours = load_gray(opened)
    ds = dcmread(io.BytesIO(data))
    modality = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(modality, stored * 0.5 - 1024)
    windowed = apply_voi_lut(modality, ds)  # pydicom's LINEAR window, over the rescaled range of the stored bits
    low, high = -1024, (2**12 - 1) * 0.5 - 1024
    expected = (windowed - low) / (high - low)
    if photometric == "MONOCHROME1":
        expected = 1 - expected
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert 0.2 < ours.mean() < 0.8 and ours.dtype == np.float32
    overridden = load_gray(opened, (0.0, 2000.0))  # the request's window replaces the file's
    expected = window_linear(stored * 0.5 - 1024, 0.0, 2000.0)
    np.testing.assert_allclose(overridden, 1 - expected if photometric == "MONOCHROME1" else expected, atol=1e-6)


def test_without_a_window_the_modality_range_is_shown():
    stored = radiograph(bits=16)
    ours = load_gray(open_image(dicom_bytes(stored, bits=16)))
    assert ours.min() == 0 and ours.max() == 1
    np.testing.assert_allclose(ours, (stored - stored.min()) / (stored.max() - stored.min()), atol=1e-6)


def test_an_rle_compressed_file_decodes_to_the_same_pixels():
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    stored = radiograph()
    plain = dicom_bytes(stored, window=(2000, 3000))
    ds = dcmread(io.BytesIO(plain))
    ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    np.testing.assert_array_equal(load_gray(open_image(buffer.getvalue())), load_gray(open_image(plain)))


# --- The service: maps equal to the windowed PNG's, sizes, no tag echoed ---


def heatmap_of(service, row) -> tuple[dict, np.ndarray]:
    (answer,) = service.answer([{**row, "heatmap": b"true", "format": b"png"}])
    assert answer.status == 200, answer.body
    import base64

    data = np.frombuffer(base64.b64decode(answer.body["explanations"][0]["heatmap"]), np.uint8)
    return answer.body, cv2.imdecode(data, cv2.IMREAD_UNCHANGED) / 65535.0


@pytest.mark.parametrize("which", ["grey", "rgb"])
def test_a_dicoms_map_equals_the_map_of_the_png_its_window_shows(grey_model, rgb_model, which):
    prepared = grey_model if which == "grey" else rgb_model
    service = service_for(prepared)
    stored = radiograph()
    data = dicom_bytes(stored, slope=2.0, intercept=-500, window=(3000, 5000), photometric="MONOCHROME1")
    shown = load_gray(open_image(data))
    for window in (None, (2000.0, 3000.0)):
        row = {"data": bytearray(data), "target": b"1"}
        if window is not None:
            row["window"] = bytearray(json.dumps(list(window)).encode())
            shown = load_gray(open_image(data), window)
        body, ours = heatmap_of(service, row)
        _, expected = heatmap_of(service, {"data": bytearray(png16(shown)), "target": b"1"})
        assert body["image"] == {"width": 80, "height": 96} and ours.shape == (96, 80)
        assert np.abs(ours - expected).max() < 2e-3, (which, window, np.abs(ours - expected).max())
        assert np.ptp(ours) > 0.5
        images = ("overlay", "heatmap")  # base64 text, which may spell anything
        text = json.dumps({**body, "explanations": [{k: v for k, v in e.items() if k not in images}
                                                    for e in body["explanations"]]})  # fmt: skip
        assert "Doe" not in text and "Jane" not in text and "PID-31415" not in text  # no DICOM tag is echoed


def test_a_grayscale_model_reads_an_rgb_upload_as_its_luminance(grey_model):
    service = service_for(grey_model)
    rgb = np.asarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3)), np.uint8)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _, from_rgb = heatmap_of(service, {"data": bytearray(encode(rgb, "PNG")), "target": b"0"})
    _, from_grey = heatmap_of(service, {"data": bytearray(png16(grey / 255.0)), "target": b"0"})
    assert np.abs(from_rgb - from_grey).max() < 2e-3


def test_a_grayscale_network_matches_pytorch_grad_cam(grey_model):
    import copy

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = grey_model.spec
    assert spec.channels == 1 and spec.mean == (0.449,) and spec.std == (0.226,) and spec.default_layer == "features.4"
    torch.manual_seed(2)
    images = torch.randn(2, 1, 64, 64)
    peer = copy.deepcopy(grey_model.model).requires_grad_(True)
    expected = GradCAM(peer, [peer.features[4]])(
        input_tensor=images, targets=[ClassifierOutputTarget(c) for c in (1, 0)]
    )
    engine = CamEngine(grey_model.model, input_size=64, default_layer=spec.default_layer)
    out = engine(images, [CamRequest(Classes([1])), CamRequest(Classes([0]))])
    ours = np.stack([normalize_map(m, (64, 64))[0].numpy() for m in out.maps])
    assert_matches_reference(ours, expected, "grayscale GreyNet")


# --- Refusals ---


def test_bad_dicoms_are_refused_naming_what_is_wrong(grey_model):
    from pydicom.uid import HTJ2KLossless

    service = service_for(grey_model)
    stored = radiograph()
    assert "has no pixel data" in refusal(service, dicom_bytes(stored, pixels=False))["message"]
    body = refusal(service, dicom_bytes(stored, syntax=HTJ2KLossless))
    assert "High-Throughput JPEG 2000" in body["message"] and "no decoder" in body["message"], body
    assert "2 frames" in refusal(service, dicom_bytes(stored, NumberOfFrames=2))["message"]
    huge = refusal(service, dicom_bytes(stored[:20, :20], Rows=60000, Columns=60000))
    assert huge["code"] == 413 and "60000x60000" in huge["message"]
    assert (
        "window applies to a DICOM image only" in refusal(service, png16(stored / 4095), window=b"[40, 400]")["message"]
    )
    assert "window must be two numbers" in refusal(service, dicom_bytes(stored), window=b"[40, 0]")["message"]
    truncated = dicom_bytes(stored)[:-500]
    assert "could not be" in refusal(service, truncated)["message"]


def test_the_build_refuses_a_grayscale_model_that_is_not_ones_own():
    with pytest.raises(BuildError, match="--channels 1 takes a --model-file network"):
        prepare_model(arch="resnet18", weights="random", channels=1)
    with pytest.raises(BuildError, match="--mean takes one value per input channel"):
        prepare_model(model_file=GREY_NET, weights="random", channels=1, mean=(0.5, 0.5, 0.5))


TAGS = ["Rows", "Columns", "BitsStored", "BitsAllocated", "HighBit", "PixelRepresentation", "RescaleSlope",
        "RescaleIntercept", "WindowCenter", "WindowWidth", "PhotometricInterpretation", "SamplesPerPixel",
        "NumberOfFrames", "VOILUTFunction"]  # fmt: skip
WRONG = st.one_of(
    st.integers(-(2**31), 2**31), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.floats(-1e6, 1e6), max_size=3), st.just(""), st.binary(max_size=8),
)  # fmt: skip


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(TAGS), WRONG, min_size=1, max_size=4))
def test_fuzzed_dicom_headers_get_an_answer_or_a_4xx(grey_model, tags):
    from pydicom.dataset import Dataset

    stored = radiograph(32, 32)
    try:
        data = dicom_bytes(stored, window=(2000, 3000), **tags)
    except Exception:  # pydicom refuses to write some values at all: a raw element with the wrong VR instead
        ds_bytes = dicom_bytes(stored, window=(2000, 3000))
        data = ds_bytes.replace(b"DX", b"CT")
        assert isinstance(Dataset(), Dataset)
    good = encode(np.zeros((32, 32, 3), np.uint8))
    answers = service_for(grey_model).answer([{"data": bytearray(data)}, {"data": bytearray(good)}])
    assert answers[0].status == 200 or 400 <= answers[0].status < 500, answers[0].body
    assert answers[1].status == 200


def test_a_jpeg_compressed_dicom_decodes_through_a_pinned_decoder():
    from PIL import Image
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    grey = (radiograph(bits=8) & 0xFF).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "JPEG", quality=95)
    ds = dcmread(io.BytesIO(dicom_bytes(grey.astype(np.uint16), bits=8)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()])
    out = io.BytesIO()
    ds.save_as(out)
    decoded = load_gray(open_image(out.getvalue()))
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float64)
    np.testing.assert_allclose(decoded, (expected - expected.min()) / (expected.max() - expected.min()), atol=2 / 255)


def test_a_16_bit_png_keeps_its_16_bits():
    levels = np.arange(0, 65536, 17, dtype=np.uint16)[: 64 * 60].reshape(64, 60)
    grey = load_gray(open_image(encode_png16(levels)))
    np.testing.assert_array_equal(grey, levels.astype(np.float32) / 65535)
    assert len(np.unique(grey)) == levels.size  # 3840 distinct values: more than 8 bits could hold


def test_the_budget_counts_a_volumes_voxels(tmp_path):
    from camserve.api import WorkBudget
    from tests.test_volumes import NET3D, nifti

    (tmp_path / "net3d.py").write_text(NET3D)
    prepared = prepare_model(model_file=tmp_path / "net3d.py", weights="random", channels=1, spatial_dims=3,
                             input_size=(16, 16, 16))  # fmt: skip
    service = service_for(prepared)
    service.budget = WorkBudget(max_output_voxels=20_000)
    volume = np.zeros((30, 30, 20), np.float32)
    body = refusal(service, nifti(volume), target=b"0,1")
    assert body["type"] == "OverBudget" and "2 explanation(s) of a 18000-voxel volume" in body["message"]
    assert "ask for at most 1" in body["message"]
    (fits,) = service.answer([{"data": bytearray(nifti(volume)), "target": bytearray(b"0")}])
    assert fits.status == 200
