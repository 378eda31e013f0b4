"""Imaging: decoding every kind of upload under limits, overlays and encodings, with round trips."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from camserve.errors import ClientError
from camserve.imaging import (
    DecodeLimits,
    decode_image,
    encode_heatmap_png16,
    encode_image,
    load_rgb,
    open_image,
    snap_to_decode_scale,
)
from camserve.overlays import COLORMAPS, clip_map, levels_at, map_at, render_overlay
from tests.conftest import encode
from tests.corpus import BAD_BODIES, IMAGE_KINDS, exif_rotated_jpeg, gradient_image, phone_heic, png_declaring


def test_png_round_trip_is_exact():
    image = gradient_image()
    np.testing.assert_array_equal(decode_image(encode(image, "PNG")), image)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats_decode_to_rgb(fmt):
    decoded = decode_image(encode(gradient_image(), fmt))
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8


def test_grayscale_palette_cmyk_become_rgb():
    image = gradient_image()
    gray = decode_image(encode(Image.fromarray(image).convert("L"), "PNG"))
    np.testing.assert_array_equal(gray[:, :, 0], gray[:, :, 2])
    palette = decode_image(encode(Image.fromarray(image).convert("P"), "PNG"))
    cmyk = decode_image(encode(Image.fromarray(image).convert("CMYK"), "JPEG", quality=95))
    for decoded in (gray, palette, cmyk):
        assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    assert np.abs(cmyk.astype(int) - image).mean() < 12


def test_transparency_is_composited_over_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)  # opaque red left half, fully transparent right half
    decoded = decode_image(encode(rgba, "PNG"))
    np.testing.assert_array_equal(decoded[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(decoded[0, 31], (255, 255, 255))


def test_sixteen_bit_png_is_scaled_not_clipped():
    levels = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)
    ok, png16 = cv2.imencode(".png", levels)
    decoded = decode_image(png16.tobytes())
    np.testing.assert_array_equal(decoded[:, :, 0], np.round(levels / 257.0).astype(np.uint8))


def test_exif_orientation_is_applied():
    decoded = decode_image(exif_rotated_jpeg(64, 32))
    assert decoded.shape == (64, 32, 3)
    expected = np.rot90(gradient_image(64, 32), k=-1)
    assert np.abs(decoded.astype(int) - expected).mean() < 6


def test_a_phone_heic_decodes_upright_and_is_checked_before_decoding(monkeypatch):
    decoded = decode_image(phone_heic(64, 32))
    assert decoded.shape == (64, 32, 3)
    expected = np.rot90(gradient_image(64, 32), k=-1)  # EXIF orientation 6: rotated 90° clockwise to display
    assert np.abs(decoded.astype(int) - expected).mean() < 8
    assert np.abs(decoded.astype(int) - np.rot90(gradient_image(64, 32), k=1)).mean() > 30  # not the other way
    data = phone_heic(64, 32)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded before the limits were checked"))
    with pytest.raises(ClientError) as refused:
        open_image(data, DecodeLimits(max_pixels=1000))
    assert refused.value.kind == "ImageTooLarge" and refused.value.status == 413


@pytest.mark.parametrize(
    ("size", "asked", "rendered"),
    [
        ((1000, 800), (512, 410), (500, 400)),
        ((1001, 801), (512, 410), (501, 401)),
        ((1000, 800), (480, 384), (480, 384)),
        ((1000, 800), (900, 720), (900, 720)),
    ],
)
def test_a_jpeg_is_rendered_at_the_reduced_decode_scale_that_fits_the_size_asked(size, asked, rendered):
    """Half scale (500x400) is within 10% under 512x410: the JPEG decodes from its DCT coefficients at that scale,
    and no resize follows. At 480x384 half scale would be larger than asked, at 900x720 no scale is near it: the
    size asked stays."""
    width, height = size
    data = encode(cv2.resize(gradient_image(), size), "JPEG", quality=95)
    opened = open_image(data)
    assert snap_to_decode_scale(opened, asked) == rendered
    decoded = load_rgb(open_image(data), at_least=rendered)
    # The smallest scale 1/s whose size still covers what is rendered: libjpeg's own reduced decode at 1/s.
    scale = max(s for s in (8, 4, 2, 1) if -(-width // s) >= rendered[0] and -(-height // s) >= rendered[1])
    reference = Image.open(io.BytesIO(data))
    reference.draft("RGB", (width // scale, height // scale))
    assert np.array_equal(decoded, np.asarray(reference.convert("RGB")))
    if rendered != asked:  # snapped: decoded at exactly the rendered size, so no resize follows
        assert decoded.shape[:2] == (rendered[1], rendered[0]) and scale == 2
    png = open_image(encode(cv2.resize(gradient_image(), size), "PNG"))
    assert snap_to_decode_scale(png, asked) == asked  # other formats decode in full, at the size asked


def test_animated_gif_gives_its_first_frame():
    frames = [Image.fromarray(np.full((20, 20, 3), value, np.uint8)) for value in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue())
    assert abs(int(decoded[0, 0, 0]) - 10) < 4


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_bodies_are_refused_with_their_error_type(case):
    data, kind = BAD_BODIES[case]
    with pytest.raises(ClientError) as error:
        decode_image(data)
    assert error.value.kind == kind and 400 <= error.value.status < 500


@pytest.mark.parametrize("case", sorted(IMAGE_KINDS))
def test_every_image_kind_decodes_upright_to_rgb(case):
    data, (width, height) = IMAGE_KINDS[case]
    decoded = decode_image(data)
    assert decoded.shape == (height, width, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(fmt):
    data = encode(gradient_image(256, 256), fmt)
    with pytest.raises(ClientError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_tiny_images_are_refused():
    with pytest.raises(ClientError, match="at least 16 pixels") as error:
        decode_image(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    assert error.value.kind == "ImageTooSmall"


def test_byte_limit_is_checked_first():
    with pytest.raises(ClientError, match="at most 100 bytes") as error:
        decode_image(encode(gradient_image(), "PNG"), DecodeLimits(max_bytes=100))
    assert error.value.status == 413


@pytest.mark.parametrize("side", [20_000, 50_000])
def test_dimension_bombs_are_refused_from_the_header(side):
    bomb = png_declaring(side, side)
    assert len(bomb) < 2000
    with pytest.raises(ClientError) as error:
        decode_image(bomb)
    assert error.value.kind == "ImageTooLarge" and error.value.status == 413


def test_the_model_reads_the_whole_image_squashed_by_pils_antialiased_bilinear_filter():
    import skimage.data

    from camserve.model import model_square

    photo = skimage.data.chelsea()  # 451x300: squashed, a different scale on each axis
    square = model_square(photo, 224)
    assert square.shape == (3, 224, 224) and square.dtype == torch.uint8
    pil = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BILINEAR)).astype(int)
    assert np.abs(square.permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1  # PIL's filter, to its rounding
    grey = photo[:, :, 1].astype(np.float32) / 255.0
    pil_float = np.asarray(Image.fromarray(grey, mode="F").resize((224, 224), Image.BILINEAR))
    np.testing.assert_allclose(model_square(grey[:, :, None], 224)[0].numpy(), pil_float, atol=1e-5)
    grown = model_square(photo[:100, :100], 224)  # growing: plain bilinear, as PIL's
    pil_grown = np.asarray(Image.fromarray(photo[:100, :100]).resize((224, 224), Image.BILINEAR)).astype(int)
    assert np.abs(grown.permute(1, 2, 0).numpy().astype(int) - pil_grown).max() <= 1
    same = gradient_image(224, 224)
    assert np.shares_memory(model_square(same, 224).numpy(), same)  # the model's size already: as is


def test_a_batch_normalises_each_image_by_its_kind_and_fills_the_models_channels():
    from camserve.model import images_to_batch
    from camserve.spec import ModelSpec

    spec = ModelSpec(
        name="m", arch="resnet18", labels=("a", "b"), input_size=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0),
        default_layer="layer4", layers={"layer4": "nchw"}, weights="random",
    )  # fmt: skip
    rgb = np.full((64, 48, 3), (255, 0, 51), np.uint8)
    grey = np.full((20, 30, 1), 0.75, np.float32)  # a DICOM's window or a 16-bit grey: one float channel in [0, 1]
    batch = images_to_batch([rgb, grey], spec, channels_last=True)
    assert batch.shape == (2, 3, 32, 32) and batch.is_contiguous(memory_format=torch.channels_last)
    expected = torch.tensor([[1.0, -1.0, 0.2], [0.5, 2.0, 0.75]])  # (value - mean) / std, per channel
    torch.testing.assert_close(batch.mean(dim=(2, 3)), expected)
    torch.testing.assert_close(batch.amax(dim=(2, 3)), batch.amin(dim=(2, 3)))  # flat images stay flat


def test_overlay_is_the_alpha_blend_of_the_colormap():
    image = gradient_image()
    heat = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    coloured = cv2.cvtColor(
        cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
    )
    expected = 0.7 * image + 0.3 * coloured
    overlay = render_overlay(image, heat, alpha=0.3, colormap="jet")
    assert np.abs(overlay.astype(float) - expected).max() <= 1.0
    np.testing.assert_array_equal(render_overlay(image, heat, alpha=0.0, colormap="jet"), image)
    turbo = cv2.cvtColor(
        cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB
    )
    np.testing.assert_array_equal(render_overlay(image, heat, alpha=1.0, colormap="turbo"), turbo)  # the map alone


def test_colormaps_include_the_common_ones():
    assert {"jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot"} <= set(COLORMAPS)


@pytest.mark.parametrize(("fmt", "tolerance"), [("png", 0), ("jpeg", 8), ("webp", 8)])
def test_encode_round_trip(fmt, tolerance):
    image = gradient_image()
    decoded = decode_image(encode_image(image, fmt))
    assert np.abs(decoded.astype(int) - image).mean() <= tolerance


def test_heatmap_png16_round_trip():
    heat = np.random.default_rng(1).random((30, 40)).astype(np.float32)
    levels = cv2.imdecode(np.frombuffer(encode_heatmap_png16(heat), np.uint8), cv2.IMREAD_UNCHANGED)
    assert levels.dtype == np.uint16 and levels.shape == (30, 40)
    np.testing.assert_array_equal(levels, np.round(heat * 65535).astype(np.uint16))


# --- The overlays people ask for, checked on pixels ---


def ramp_map(height: int = 40, width: int = 60) -> np.ndarray:
    """A map that rises from 0 on the left to 1 on the right."""
    return np.tile(np.linspace(0.0, 1.0, width), (height, 1))


def photo(height: int = 40, width: int = 60) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(30, 226, (height, width, 3), dtype=np.uint8)


def test_clip_map_removes_the_haze_and_the_hot_pixel():
    heat = np.full((10, 10), 0.1)
    heat[2:5, 2:5] = 0.6
    heat[0, 0] = 1.0  # one hot pixel
    clipped = clip_map(heat, 50, 98)
    assert clipped.min() == 0.0 and clipped[0, 0] == 1.0 and clipped[3, 3] == 1.0  # the hot pixel no longer dominates
    assert (clipped[heat == 0.1] == 0.0).all()  # the haze below the median is gone
    assert clip_map(np.zeros((4, 4)), 10, 90).max() == 0.0  # constant maps stay finite


def test_grayscale_overlay_colours_only_the_map():
    image, heat = photo(), ramp_map()
    grey = render_overlay(image, heat, 0.0, "jet", "grayscale")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    blended = render_overlay(image, heat, 0.5, "jet", "grayscale")
    assert np.abs(blended[:, -1, 0].astype(int) - blended[:, -1, 2].astype(int)).mean() > 20  # jet's red at the top


def test_mask_overlay_keeps_the_photo_where_the_map_is_high_and_darkens_elsewhere():
    image, heat = photo(), ramp_map()
    masked = render_overlay(image, heat, 0.8, "jet", "mask")
    assert np.array_equal(masked[:, -1], image[:, -1])  # heat 1: the photo itself
    np.testing.assert_allclose(masked[:, 0], np.round(image[:, 0] * 0.2), atol=1)  # heat 0: darkened by alpha


def test_outline_overlay_draws_the_contour_of_the_top_region_only():
    image = np.full((60, 80, 3), 128, np.uint8)
    heat = np.zeros((60, 80))
    heat[20:40, 30:50] = 1.0  # a 20x20 hot square: 8.3% of the image
    outlined = render_overlay(image, heat, 0.5, "jet", "outline", region=0.05)
    changed = np.any(outlined != image, axis=2)
    assert changed.any() and changed.mean() < 0.1
    rows, columns = np.nonzero(changed)
    assert rows.min() >= 17 and rows.max() <= 42 and columns.min() >= 27 and columns.max() <= 52  # on the border
    assert not changed[25:35, 35:45].any()  # the inside keeps the photo
    assert tuple(outlined[20, 40]) == (128, 0, 0)  # jet's hottest colour, in RGB


@pytest.mark.parametrize(
    ("grid", "size"), [((7, 7), (300, 451)), ((14, 14), (512, 512)), ((56, 56), (32, 40)), ((7, 9), (17, 1000))]
)
def test_map_at_is_normalize_map_on_the_host(grid, size):
    """The render threads' upsampling and min-max equal the engine's normalize_map, growing or shrinking."""
    import torch

    from camserve.cam import normalize_map

    cam = torch.rand(1, *grid, generator=torch.Generator().manual_seed(0))
    expected = normalize_map(cam, size)[0].numpy()
    ours = map_at(cam[0].numpy(), size)
    assert ours.shape == size and ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 1e-5


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_map_at_keeps_a_constant_map_all_zero(value):
    assert (map_at(np.full((1, 1), value, np.float32), (20, 30)) == 0).all()
    assert (map_at(np.full((7, 7), value, np.float32), (300, 451)) == 0).all()


@pytest.mark.parametrize(
    ("grid", "size"),
    [((7, 7), (1080, 1920)), ((14, 14), (512, 512)), ((56, 56), (64, 80)), ((56, 56), (32, 40)), ((7, 9), (17, 1000))],
)
def test_levels_at_are_the_float_maps_levels_within_one(grid, size):
    """The overlay's uint8 levels, resized in fixed point: within one level of the float map's, growing or shrinking."""
    cam = np.random.default_rng(sum(grid)).random(grid).astype(np.float32) * 7.0 - 2.0
    levels = levels_at(cam, size)
    assert levels.shape == size and levels.dtype == np.uint8
    exact = np.round(map_at(cam, size) * 255.0)
    assert np.abs(levels - exact).max() <= 1
    assert levels.min() == 0 and levels.max() == 255
    assert (levels_at(np.full(grid, 3.5, np.float32), size) == 0).all()  # constant: all zero, as map_at
    cam[0, 0], cam[-1, -1] = np.nan, np.inf  # a model's NaN or inf: the float map's levels, as served before
    with np.errstate(invalid="ignore"):  # the float map's own NaN arithmetic
        np.testing.assert_array_equal(levels_at(cam, size), cv2.convertScaleAbs(map_at(cam, size), alpha=255.0))


def test_an_overlay_drawn_from_levels_is_the_float_maps_within_jpeg_noise():
    """The default overlay (no clip, no heatmap PNG) is drawn from uint8 levels: the same picture as from the float
    map, off by a level or two at a few pixels. A mask reads them as level / 255 (the service draws it, and an
    outline, from the float map)."""
    image = _photo(640, 360)
    cam = np.random.default_rng(3).random((7, 7)).astype(np.float32)
    size = image.shape[:2]
    for style in ("heatmap", "grayscale", "mask"):
        from_levels = render_overlay(image, levels_at(cam, size), 0.5, "jet", style).astype(int)
        from_float = render_overlay(image, map_at(cam, size), 0.5, "jet", style).astype(int)
        error = np.mean((from_levels - from_float) ** 2)
        assert error == 0 or 10 * np.log10(255**2 / error) > 45, style  # JPEG at quality 90 is ~40 dB
        assert np.abs(from_levels - from_float).max() <= 3, style


@pytest.mark.parametrize(
    ("changes", "drawn_from"), [({}, "levels"), ({"heatmap": True}, "float"), ({"clip": (5.0, 95.0)}, "float")]
)
def test_an_explanation_draws_from_levels_unless_an_option_needs_the_float_map(changes, drawn_from):
    """What each option does to the rendered explanation: the heatmap PNG keeps 16-bit levels, a clip clips."""
    from types import SimpleNamespace

    from camserve.api import ExplainOptions
    from camserve.imaging import to_base64
    from camserve.work import render

    image = _photo(320, 180)
    cam = np.random.default_rng(4).random((7, 7)).astype(np.float32)
    options = ExplainOptions(format="png", **changes)
    explained = render(SimpleNamespace(options=options, display=image), 1, "b", {}, cam)
    heat = map_at(cam, image.shape[:2])
    if options.clip is not None:
        heat = clip_map(heat, *options.clip)
    drawn = heat if drawn_from == "float" else levels_at(cam, image.shape[:2])
    assert explained.overlay == to_base64(encode_image(render_overlay(image, drawn, 0.5, "jet"), "png"))
    if options.heatmap:
        assert explained.heatmap == to_base64(encode_heatmap_png16(heat))  # 16 bits, not the overlay's 8
    else:
        assert explained.heatmap is None


def _photo(width: int = 257, height: int = 171) -> np.ndarray:
    """A photo with sensor-like noise: the JPEG codec's hard case."""
    import skimage.data

    base = cv2.resize(skimage.data.chelsea(), (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)
    noise = np.random.default_rng(0).normal(0.0, 8.0, base.shape).astype(np.float32)
    return np.clip(base + noise, 0, 255).round().astype(np.uint8)


def _by_pillow(opened):
    """The same upload decoded by Pillow's decoder alone (the path taken before simplejpeg, and its fallback)."""
    from dataclasses import replace

    return load_rgb(replace(opened, data=None))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_decodes_upright_as_pillow_does_for_every_exif_orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = encode(Image.fromarray(_photo()), "JPEG", quality=90, exif=exif.tobytes())
    opened = open_image(body)
    assert opened.orientation == orientation and opened.data is body
    fast = load_rgb(opened)
    assert fast.shape == ((257, 171) if orientation >= 5 else (171, 257)) + (3,)
    np.testing.assert_array_equal(fast, _by_pillow(open_image(body)))  # bit for bit, EXIF turn included


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_a_jpeg_decodes_bit_for_bit_as_pillow_at_every_reduced_scale(mode, progressive, scale):
    body = encode(Image.fromarray(_photo(1001, 777)).convert(mode), "JPEG", quality=90, progressive=progressive)
    asked = (-(-1001 // scale), -(-777 // scale))
    fast = load_rgb(open_image(body), at_least=asked)
    assert fast.shape == (asked[1], asked[0], 3)  # the reduced scale that covers the size asked, not more
    np.testing.assert_array_equal(fast, _by_pillow(open_image(body)) if scale == 1 else _pillow_draft(body, scale))


def _pillow_draft(body: bytes, scale: int) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
    return np.asarray(image.convert("RGB"))


def test_a_jpeg_that_simplejpeg_refuses_is_decided_by_pillow(monkeypatch):
    import camserve.imaging as imaging

    body = encode(Image.fromarray(_photo()), "JPEG", quality=90)
    calls = []

    def refusing(*args, **kwargs):
        calls.append(args)
        raise ValueError("Unsupported JPEG process: SOF type 0xc9")  # arithmetic coding, which it does not decode

    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", refusing)
    np.testing.assert_array_equal(load_rgb(open_image(body)), np.asarray(Image.open(io.BytesIO(body)).convert("RGB")))
    assert len(calls) == 1
    with pytest.raises(ClientError, match="truncated or corrupt"):
        load_rgb(open_image(body[: len(body) // 2]))


def test_the_jpeg_overlay_keeps_opencvs_quality_and_size():
    photo = _photo(640, 480)

    def psnr(encoded: bytes) -> float:
        error = decode_image(encoded).astype(float) - photo
        return 10 * np.log10(255**2 / np.mean(error**2))

    ours = encode_image(photo, "jpeg")
    ok, opencv = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert abs(psnr(ours) - psnr(opencv.tobytes())) < 0.1 and psnr(ours) > 30
    assert abs(len(ours) - len(opencv)) / len(opencv) < 0.05
    assert Image.open(io.BytesIO(ours)).info.get("progressive") is None  # baseline, as OpenCV's


@pytest.mark.parametrize("colormap", ["jet", "turbo", "viridis", "inferno"])
def test_the_colour_lookup_equals_opencvs_colormap_on_rounded_levels(colormap):
    image = _photo(96, 64)
    heat = np.random.default_rng(3).random((64, 96)).astype(np.float32)
    heat[0, :4] = (0.0, 1.0, 0.5 / 255, 1.5 / 255)  # the ends and two ties, which round to even
    levels = np.round(heat * 255).astype(np.uint8)
    coloured = cv2.cvtColor(cv2.applyColorMap(levels, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(render_overlay(image, heat, alpha=1.0, colormap=colormap), coloured)
    expected = cv2.addWeighted(image, 0.6, coloured, 0.4, 0.0)
    np.testing.assert_array_equal(render_overlay(image, heat, alpha=0.4, colormap=colormap), expected)
