"""The request contract: the three input forms, every option's validation and message, and the response schema."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from camserve.api import (
    MAX_TOPK,
    OPTION_NAMES,
    ExplainOptions,
    ExplainResponse,
    Explanation,
    ModelInfo,
    Prediction,
    Request,
    parse_options,
    parse_request,
)
from camserve.errors import ClientError

IMAGE = b"\x89PNG-not-really-but-bytes"


def test_raw_body_uses_default_options():
    request = parse_request({"body": bytearray(IMAGE)})
    assert request.image == IMAGE and request.options == ExplainOptions()


def test_each_door_makes_the_same_runtime_neutral_request():
    """A TorchServe row, a KServe v1 instance (an object, or the base64 text alone) and a v2 element with its input's
    parameters read as the same request; a bad one is refused only when the service reads it, in its own row."""
    text = base64.b64encode(IMAGE).decode()
    made = [
        Request.torchserve({"body": {"image": text, "target": [3]}}, "a"),
        Request.v1_instance({"data": text, "target": 3}, "b"),
        Request.v2_element(text, {"target": 3}, "c"),
    ]
    assert [request.id for request in made] == ["a", "b", "c"]
    assert {request.read() for request in made} == {parse_request({"body": {"image": text, "target": [3]}})}
    assert Request.v1_instance(text).read().image == IMAGE
    bad = Request.v2_element(text, ["not", "an", "object"])  # made without a fuss: the door never raises
    with pytest.raises(ClientError, match="parameters must be an object"):
        bad.read()
    with pytest.raises(ClientError, match="not valid base64"):
        Request.v1_instance({"data": "%%%"}).read()


def test_multipart_fields_arrive_as_bytes():
    row = {"data": bytearray(IMAGE), "target": bytearray(b"281"), "topk": bytearray(b"3"), "heatmap": b"true"}
    request = parse_request(row)
    assert request.image == IMAGE
    assert request.options == ExplainOptions(topk=3, target=(281,), heatmap=True)


def test_json_body_carries_base64_and_typed_options():
    body = {"image": base64.b64encode(IMAGE).decode(), "target": [281, 282], "alpha": 0.25, "format": "png"}
    request = parse_request({"body": body})
    assert request.image == IMAGE
    assert request.options == ExplainOptions(target=(281, 282), alpha=0.25, format="png")


def test_json_sent_without_json_content_type_is_still_parsed():
    body = json.dumps({"image": base64.b64encode(IMAGE).decode(), "topk": 2}).encode()
    assert parse_request({"body": bytearray(body)}).options.topk == 2


def test_kserve_v1_instance_and_v2_input_rows():
    encoded = base64.b64encode(IMAGE).decode()
    v1 = parse_request({"data": encoded, "target": 281, "topk": 2})
    assert v1.image == IMAGE and v1.options == ExplainOptions(target=(281,), topk=2)
    v2 = parse_request({"name": "image", "shape": [1], "datatype": "BYTES", "data": encoded, "parameters": {"topk": 3}})
    assert v2.image == IMAGE and v2.options == ExplainOptions(topk=3)
    with pytest.raises(ClientError, match="datatype BYTES"):
        parse_request({"name": "image", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]})


def test_data_url_is_accepted():
    body = {"image": "data:image/png;base64," + base64.b64encode(IMAGE).decode()}
    assert parse_request({"body": body}).image == IMAGE


@pytest.mark.parametrize(
    ("row", "kind", "fragment"),
    [
        ({"body": bytearray(b'{"image": "abc"')}, "InvalidJSON", "not valid JSON"),
        ({"body": {"image": "@@not base64@@"}}, "InvalidImage", "not valid base64"),
        ({"body": {"image": 12}}, "InvalidImage", "must be a base64 string"),
        ({"body": {"topk": 3}}, "MissingImage", "no image"),
        ({"body": [1, 2]}, "InvalidRequest", "must be an object"),
        ({"body": "plain text"}, "InvalidRequest", "the body is text"),
        ({"target": bytearray(b"281")}, "MissingImage", "no image"),
    ],
)
def test_malformed_requests_name_the_problem(row, kind, fragment):
    with pytest.raises(ClientError, match=fragment) as error:
        parse_request(row)
    assert error.value.kind == kind and error.value.status == 400


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"topk": 0}, "topk must be an integer from 1 to 20, got 0"),
        ({"clip": [99.9, 62]}, "clip must be two percentiles from 0 to 100, lower first, such as [62, 99.9]"),
        ({"clip": "62"}, "clip must be two percentiles from 0 to 100, lower first, such as [62, 99.9], got '62'"),
        ({"clip": [0, 101]}, "clip must be two percentiles from 0 to 100"),
        ({"clip": "nan,50"}, "clip must be two percentiles from 0 to 100"),
        ({"overlay": "sparkles"}, "overlay must be one of heatmap, outline, mask, grayscale, got 'sparkles'"),
        ({"region": 1}, "region must be a number from 0.01 to 0.99, got 1"),
        ({"topk": 50}, "topk must be an integer from 1 to 20, got 50"),
        ({"topk": "three"}, "topk must be an integer from 1 to 20, got 'three'"),
        ({"topk": True}, "topk must be an integer from 1 to 20, got True"),
        ({"topk": 2.5}, "topk must be an integer from 1 to 20, got 2.5"),
        (
            {"target": -1},
            "target must be a class index (0 to the model's number of classes - 1) or a list of at most 10",
        ),
        ({"target": []}, "target must be a class index (0 to the model's number of classes - 1)"),
        ({"target": list(range(11))}, "a list of at most 10"),
        ({"target": "tabby"}, "got 'tabby'"),
        ({"alpha": 2}, "alpha must be a number from 0 to 1, got 2"),
        ({"alpha": "nan"}, "alpha must be a number from 0 to 1, got 'nan'"),
        ({"colormap": "nope"}, "colormap must be one of "),
        ({"format": "bmp"}, "format must be one of jpeg, png, webp, got 'bmp'"),
        ({"heatmap": "maybe"}, "heatmap must be true or false, got 'maybe'"),
        (
            {"method": "gradcam+++"},
            "method must be one of gradcam, gradcam++, xgradcam, hirescam, layercam, gradcam-elementwise",
        ),
        ({"layer": "layer4; rm -rf /"}, "layer must be a dotted module path of at most 200 characters"),
        ({"layer": "../etc"}, "layer must be a dotted module path"),
        ({"layer": 4}, "layer must be a dotted module path"),
        ({"layer": "layer4." * 100}, "layer must be a dotted module path"),
        ({"max_side": 8}, "max_side must be an integer from 16 to 16384, got 8"),
        ({"explain": 6}, "explain must be an integer from 1 to 5, got 6"),
        ({"explain": 0}, "explain must be an integer from 1 to 5, got 0"),
        ({"explain": 2, "target": 281}, "give either target (classes to explain) or explain (top N), not both"),
    ],
)
def test_every_bad_value_gets_its_message(options, message):
    with pytest.raises(ClientError) as error:
        parse_options(options)
    assert message in error.value.message
    assert error.value.to_dict() == {"code": 400, "type": "InvalidOption", "message": error.value.message}


def test_method_layer_and_explain_options():
    options = parse_options({"method": b"GradCAM++", "layer": b"layer3.5.conv2", "explain": b"3"})
    assert (options.method, options.layer, options.explain) == ("gradcam++", "layer3.5.conv2", 3)
    # The method, layer and topk defaults are the model's (Grad-CAM, a detector's HiResCAM; its spec's default layer;
    # 5 or fewer classes): see the pipeline.
    assert ExplainOptions().method is None and ExplainOptions().layer is None and ExplainOptions().topk is None


def test_unknown_options_list_the_known_ones():
    with pytest.raises(ClientError) as error:
        parse_options({"top_k": 3})
    assert error.value.kind == "UnknownOption"
    assert "top_k" in error.value.message
    assert all(name in error.value.message for name in OPTION_NAMES)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("281", (281,)), ("281, 282", (281, 282)), ("[281,282]", (281, 282)), (281, (281,)), ([0, 999], (0, 999))],
)
def test_target_forms(raw, expected):
    assert parse_options({"target": raw}).target == expected


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_topk_accepts_exactly_1_to_20(value):
    for raw in (value, str(value), str(value).encode()):
        if 1 <= value <= MAX_TOPK:
            assert parse_options({"topk": raw}).topk == value
        else:
            with pytest.raises(ClientError, match="topk must be an integer from 1 to 20"):
                parse_options({"topk": raw})


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_alpha_accepts_exactly_0_to_1(value):
    if 0.0 <= value <= 1.0:
        assert parse_options({"alpha": value}).alpha == value
    else:
        with pytest.raises(ClientError, match="alpha must be a number from 0 to 1"):
            parse_options({"alpha": value})


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.integers(), st.text(max_size=8), st.binary(max_size=8))))
def test_any_option_mapping_parses_or_fails_with_a_client_error(raw):
    try:
        options = parse_options(raw)
    except ClientError as error:
        assert error.status == 400 and error.message
    else:
        assert isinstance(options, ExplainOptions)
        assert set(raw) <= set(OPTION_NAMES)


def test_response_schema():
    response = ExplainResponse(
        model=ModelInfo("resnet50", "1.0", "random", "resnet50", 1000),
        width=451,
        height=300,
        predictions=[Prediction(281, "tabby", 0.5)],
        explanations=[
            Explanation(
                index=281,
                label="tabby",
                probability=0.5,
                method="gradcam",
                layer="layer4",
                format="jpeg",
                width=451,
                height=300,
                overlay="b64",
            ),
            Explanation(
                index=282,
                label="tiger cat",
                probability=0.25,
                method="gradcam",
                layer="layer4",
                format="png",
                width=226,
                height=150,
                overlay="b64",
                heatmap="png16",
            ),
        ],
    ).to_dict()
    assert response == {
        "model": {
            "name": "resnet50",
            "version": "1.0",
            "weights": "random",
            "arch": "resnet50",
            "classes": 1000,
            "task": "multiclass",
        },
        "image": {"width": 451, "height": 300},
        "predictions": [{"index": 281, "label": "tabby", "probability": 0.5}],
        "explanations": [
            {
                "index": 281,
                "label": "tabby",
                "probability": 0.5,
                "method": "gradcam",
                "layer": "layer4",
                "format": "jpeg",
                "width": 451,
                "height": 300,
                "overlay": "b64",
            },
            {
                "index": 282,
                "label": "tiger cat",
                "probability": 0.25,
                "method": "gradcam",
                "layer": "layer4",
                "format": "png",
                "width": 226,
                "height": 150,
                "overlay": "b64",
                "heatmap": "png16",
            },
        ],
    }


# --- Adversarial values: every one a 400 that names the option, never another exception ---

HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"topk": b"--5"}, "topk must be an integer from 1 to 20, got '--5'"),
        ({"topk": b"+-3"}, "topk must be an integer from 1 to 20, got '+-3'"),
        ({"target": b"--1"}, "target must be a class index"),
        ({"explain": b"-+2"}, "explain must be an integer from 1 to 5, got '-+2'"),
        ({"topk": HUGE.encode()}, "topk is 5000 bytes long"),
        ({"topk": "9" * 900}, "topk must be an integer from 1 to 20"),
        ({"topk": "\u0663"}, "topk must be an integer"),  # ARABIC-INDIC DIGIT THREE
        ({"topk": "３"}, "topk must be an integer"),  # FULLWIDTH DIGIT THREE
        ({"topk": " 3 \t"}, None),
        ({"topk": "1_0"}, "topk must be an integer"),
        ({"alpha": "\u0660.5"}, "alpha must be a number from 0 to 1"),
        ({"alpha": "1_0e-1"}, "alpha must be a number from 0 to 1"),
        ({"alpha": "inf"}, "alpha must be a number from 0 to 1"),
        ({"alpha": "-nan"}, "alpha must be a number from 0 to 1"),
        ({"alpha": float("nan")}, "alpha must be a number from 0 to 1"),
        ({"alpha": "1e99999"}, "alpha must be a number from 0 to 1"),
        ({"target": "[" * 900}, "target must be a class index"),
        ({"target": "[" * 5000}, "target is 5000 characters long"),
        ({"target": "[[[1]]]"}, "target must be a class index"),
        ({"target": ",".join(["1"] * 400)}, "a list of at most 10"),
        ({"layer": "a" * 300}, "layer must be a dotted module path of at most 200 characters"),
        ({"layer": "a" * 5000}, "layer is 5000 characters long"),
        ({"heatmap": b"\xff\xfe"}, "heatmap is not UTF-8 text"),
        ({"max_side": b"1e3"}, "max_side must be an integer"),
    ],
)
def test_adversarial_multipart_values_name_the_option(fields, fragment):
    row = {"data": bytearray(IMAGE), **{k: bytearray(v) if isinstance(v, bytes) else v for k, v in fields.items()}}
    if fragment is None:
        assert parse_request(row).options
        return
    with pytest.raises(ClientError) as error:
        parse_request(row)
    assert fragment in error.value.message and error.value.status == 400
    assert len(error.value.message) < 400


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            b'{"image": "aGk=", "topk": ' + HUGE.encode() + b"}",
            "topk must be an integer from 1 to 20, got <a 5000-digit",
        ),
        (b'{"image": "aGk=", "target": [' + HUGE.encode() + b"]}", "target must be a class index"),
        (b'{"image": "aGk=", "alpha": ' + HUGE.encode() + b".5}", "alpha must be a number from 0 to 1"),
        (b'{"image": "aGk=", "target": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
        (b'{"image": "aGk=", "target": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}", "target must be a class index"),
        (b'{"image": "aGk=", "alpha": NaN}', "alpha must be a number from 0 to 1, got nan"),
        (b'{"image": "aGk=", "alpha": -Infinity}', "alpha must be a number from 0 to 1, got -inf"),
        (b'{"image": "aGk=", "topk": 2, "topk": 3}', "the key 'topk' more than once"),
        (b'{"image": "aGk=", "topk": 1e400}', "topk must be an integer"),
        (b'{"image": "aGk=", "topk": {"a": {"b": {"c": [1]}}}}', "topk must be an integer"),
        (b'{"image": "aGk=", "' + b"x" * 5000 + b'": 1}', "unknown option"),
    ],
)
def test_adversarial_json_bodies_name_the_problem(body, fragment):
    with pytest.raises(ClientError) as error:
        parse_request({"body": bytearray(body)})
    assert fragment in error.value.message and error.value.status == 400
    assert len(error.value.message) < 600


def test_picture_options_parse_from_json_and_multipart():
    assert parse_options({"clip": [62, 99.9], "overlay": "outline", "region": 0.3}) == ExplainOptions(
        clip=(62.0, 99.9), overlay="outline", region=0.3
    )
    assert parse_options({"clip": b"[5, 95]", "overlay": b"MASK"}).clip == (5.0, 95.0)
    assert parse_options({"clip": b"5,95"}).clip == (5.0, 95.0)
    assert ExplainOptions().overlay == "heatmap" and ExplainOptions().clip is None


def test_smoothing_options_parse():
    assert parse_options({"eigen_smooth": True, "aug_smooth": b"yes"}) == ExplainOptions(
        eigen_smooth=True, aug_smooth=True
    )
    with pytest.raises(ClientError, match="aug_smooth must be true or false, got 'sometimes'"):
        parse_options({"aug_smooth": "sometimes"})
