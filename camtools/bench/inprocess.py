"""The in-process sections: the engine against the forward pass and the peer, each method, the fast paths,
channels_last by batch, decode and encode, the response's bytes."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from camserve.api import WorkBudget
from camserve.cam import METHODS, CamEngine, CamRequest, Family, normalize_map
from camserve.imaging import encode_image
from camserve.model import PRECISIONS, images_to_batch
from camserve.pipeline import ExplanationService
from camtools.bench.context import BenchConfig, BenchContext, make_timer, plain_forward
from camtools.bench.imagework import PHOTOS, camera_photo
from camtools.gradcam import GradCAM


def in_process_costs(ctx: BenchContext) -> list[dict[str, object]]:
    model, spec, images, config, device, timed = ctx.model, ctx.spec, ctx.images, ctx.config, ctx.device, ctx.timed
    from pytorch_grad_cam import GradCAM as PeerGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    peer_model = copy.deepcopy(model).requires_grad_(True)  # the peer backpropagates into every parameter
    peer = PeerGradCAM(model=peer_model, target_layers=[peer_model.get_submodule(config.layer)])
    engine = GradCAM(model, config.layer, input_size=spec.input_size)
    service = _service_for(model, spec, device)
    side = spec.input_size
    rows = []
    for batch_size in config.batch_sizes:
        chosen = images[:batch_size]
        batch = images_to_batch(chosen, spec, device)
        prepared = [service.prepare({"body": encode_image(image, "png")}) for image in chosen]
        with torch.inference_mode():
            top1 = model(batch).argmax(dim=1).tolist()

        def cam_only(batch: torch.Tensor = batch) -> None:
            normalize_map(torch.cat(engine(batch).maps), (side, side))

        def cam_and_overlays(prepared: list = prepared) -> None:
            service.explain([copy.copy(item) for item in prepared])  # explain() releases each image it renders

        def peer_gradcam(batch: torch.Tensor = batch, targets: list = top1) -> None:
            peer(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in targets])

        contenders = {
            "floor: torchvision forward": partial(plain_forward, model, batch),
            "engine: Grad-CAM": cam_only,
            "engine: Grad-CAM + overlay encoding": cam_and_overlays,
            "pytorch-grad-cam GradCAM": peer_gradcam,
        }
        medians = timed(contenders, config.repeats, config.warmup)
        floor_s = medians["floor: torchvision forward"]
        for name, median in medians.items():
            rows.append(
                {
                    "contender": name,
                    "batch": batch_size,
                    "seconds": median,
                    "ms_per_image": 1000 * median / batch_size,
                    "images_per_s": batch_size / median,
                    "ratio_to_floor": median / floor_s,
                }
            )
    peer.activations_and_grads.release()
    return rows


def method_costs(ctx: BenchContext) -> list[dict[str, object]]:
    """Each method's cost per image at ``config.layer`` relative to the plain forward pass, timed round-robin.

    ScoreCAM and Ablation-CAM run one forward pass per scored channel, so they are timed on one image with at most
    two repeats.
    """
    model, spec, images, config, device, timed = ctx.model, ctx.spec, ctx.images, ctx.config, ctx.device, ctx.timed
    engine = CamEngine(model, input_size=spec.input_size)
    rows = []
    for method in timed_methods(engine):
        perturbation = METHODS[method].family is Family.PERTURBATION
        batch_size = 1 if perturbation else max(config.batch_sizes)
        repeats = min(config.repeats, 2) if perturbation else config.repeats
        batch = images_to_batch(images[:batch_size], spec, device)
        requests = [CamRequest(layer=config.layer, method=method)] * batch_size

        medians = timed(
            {"floor": partial(plain_forward, model, batch), method: partial(engine, batch, requests)},
            repeats,
            min(config.warmup, 1),
        )
        rows.append(
            {
                "method": method,
                "layer": config.layer,
                "batch": batch_size,
                "ms_per_image": 1000 * medians[method] / batch_size,
                "ratio_to_floor": medians[method] / medians["floor"],
            }
        )
    return rows


SANITY_CASES = (("gradcam", "layer4"), ("gradcam", "layer3"), ("hirescam", "layer4"), ("eigencam", "layer4"))
"""The sanity check's cost, timed: at the default layer (the tail is the pooling and the classifier), one stage
earlier (the tail is a whole stage), and an activation-only method (no pass)."""


def sanity_costs(ctx: BenchContext) -> list[dict[str, object]]:
    """Each case's explanation with and without ``sanity``, each timed round-robin against the plain forward pass
    at the largest batch: the sanity check's cost is the difference."""
    from camserve.cam.sanity import Sanity

    model, spec, images, config, timed = ctx.model, ctx.spec, ctx.images, ctx.config, ctx.timed
    engine = CamEngine(model, input_size=spec.input_size)
    sanity = Sanity(engine)
    batch_size = max(config.batch_sizes)
    batch = images_to_batch(images[:batch_size], spec, ctx.device)

    def checked(requests: list[CamRequest]) -> object:
        output = engine(batch, requests, keep=sanity.keep(requests))
        return sanity.figures(batch, requests, output)

    rows = []
    for method, layer in SANITY_CASES:
        requests = [CamRequest(layer=layer, method=method)] * batch_size
        checked(requests)  # builds the randomised copy, once, as a worker does on the first request
        medians = timed(
            {
                "floor": partial(plain_forward, model, batch),
                "plain": partial(engine, batch, requests),
                "sanity": partial(checked, requests),
            },
            config.repeats,
            min(config.warmup, 1),
        )
        rows.append(
            {
                "method": method,
                "layer": layer,
                "batch": batch_size,
                "ratio_to_floor": medians["plain"] / medians["floor"],
                "with_sanity_ratio_to_floor": medians["sanity"] / medians["floor"],
            }
        )
    return rows


VIT_CASES = (
    ("gradcam", None),
    ("legrad", "encoder.layers.encoder_layer_11"),
    ("legrad", "encoder.layers.encoder_layer_8"),
)
"""The vision transformer's methods, timed on ViT-B/16: Grad-CAM at its default layer for scale, LeGrad over the last
block and over the last four."""


def vit_methods(ctx: BenchContext) -> list[dict[str, object]]:
    """The methods that need a vision transformer (LeGrad), timed round-robin against ViT-B/16's plain forward pass
    (seeded random weights, its head drawn from N(0, 0.01²) so that no class score is flat) at the largest batch."""
    from camtools.models import prepare_model

    config, timed, device = ctx.config, ctx.timed, ctx.device
    prepared = prepare_model(arch="vit_b_16", weights="random", seed=0)
    model = prepared.model.to(device)
    with torch.no_grad():
        torch.nn.init.normal_(model.heads.head.weight, std=0.01, generator=torch.Generator().manual_seed(0))
    spec = prepared.spec
    engine = CamEngine(model, input_size=spec.input_size, default_layer=spec.default_layer)
    batch_size = max(config.batch_sizes)
    inputs = ctx.images[:batch_size]
    batch = images_to_batch(inputs, spec, device)
    rows = []
    for method, layer in VIT_CASES:
        requests = [CamRequest(layer=layer, method=method)] * batch_size
        medians = timed(
            {"floor": partial(plain_forward, model, batch), method: partial(engine, batch, requests)},
            config.repeats,
            min(config.warmup, 1),
        )
        rows.append(
            {
                "arch": "vit_b_16",
                "method": method,
                "layer": layer or spec.default_layer,
                "batch": batch_size,
                "ratio_to_floor": medians[method] / medians["floor"],
            }
        )
    return rows


def timed_methods(engine: CamEngine) -> list[str]:
    """The methods the benchmark times: those that the default work budget serves (SESS's 2 x 122 + 1 passes per
    image are counted, not timed) and that apply to the model at its default layer (LeGrad needs a ViT)."""
    budget = WorkBudget().max_forward_passes
    return [
        name
        for name, record in METHODS.items()
        if engine.forward_passes(CamRequest(method=name)) <= budget
        and (record.applies is None or record.applies(engine, engine.default_layer) is None)
    ]


def _service_for(model, spec, device) -> ExplanationService:
    engine = CamEngine(model, input_size=spec.input_size, default_layer=spec.default_layer)
    return ExplanationService(engine=engine, spec=spec, device=device)


def fast_path_costs(ctx: BenchContext) -> list[dict[str, object]]:
    base_model, spec, images, config, device, timed = ctx.model, ctx.spec, ctx.images, ctx.config, ctx.device, ctx.timed
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    side = spec.input_size
    inputs = images[: config.agreement_images]
    batch_size = max(config.batch_sizes)
    reference_top1, reference_maps = None, None
    rows, runs = [], {}
    for channels_last in (False, True):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = copy.deepcopy(base_model).to(device, memory_format=memory_format)
        for precision in precisions:
            engine = GradCAM(model, config.layer, autocast_dtype=PRECISIONS[precision], input_size=side)
            batches = [
                images_to_batch(inputs[i : i + batch_size], spec, device, channels_last)
                for i in range(0, len(inputs), batch_size)
            ]
            targets = None if reference_top1 is None else [[c] for c in reference_top1]
            top1, maps = [], []
            for index, batch in enumerate(batches):
                wanted = None if targets is None else targets[index * batch_size : (index + 1) * batch_size]
                output = engine(batch, wanted)
                top1 += output.logits.argmax(dim=1).tolist()
                maps += [normalize_map(m, (side, side))[0].cpu().numpy().ravel() for m in output.maps]
            if reference_top1 is None:
                reference_top1, reference_maps = top1, maps
            runs[(precision, channels_last)] = partial(engine, batches[0])
            rows.append(
                {
                    "precision": precision,
                    "channels_last": channels_last,
                    "batch": batches[0].shape[0],
                    "top1_agreement": float(np.mean([a == b for a, b in zip(top1, reference_top1, strict=True)])),
                    "heatmap_correlation": float(
                        np.mean([_correlation(a, b) for a, b in zip(maps, reference_maps, strict=True)])
                    ),
                }
            )
    medians = timed(runs, config.repeats, config.warmup)
    for row in rows:
        row["seconds"] = medians[(row["precision"], row["channels_last"])]
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        row["ships"] = row["top1_agreement"] >= 0.99 and row["heatmap_correlation"] >= 0.98
    return rows


def channels_last_by_batch(ctx: BenchContext) -> list[dict[str, object]]:
    """Grad-CAM on inputs in the channels_last memory format against the default one, at each batch size, with the
    model's weights as they are (the service converts only the inputs of batches from its threshold on)."""
    model, spec, images, config, device, timed = ctx.model, ctx.spec, ctx.images, ctx.config, ctx.device, ctx.timed
    engine = GradCAM(model, config.layer, input_size=spec.input_size)
    rows = []
    for batch_size in config.channels_last_batches:
        inputs = images[:batch_size]
        runs = {
            layout: partial(engine, images_to_batch(inputs, spec, device, channels_last=layout == "channels_last"))
            for layout in ("contiguous", "channels_last")
        }
        medians = timed(runs, config.repeats, config.warmup)
        rows.append(
            {
                "batch": batch_size,
                "contiguous_ms_per_image": 1000 * medians["contiguous"] / batch_size,
                "channels_last_ms_per_image": 1000 * medians["channels_last"] / batch_size,
                "speedup": medians["contiguous"] / medians["channels_last"],
            }
        )
    return rows


def channels_last_threshold(rows: Sequence[dict[str, object]]) -> int:
    """The smallest measured batch from which channels_last is faster at every larger measured batch; 0: never."""
    threshold = 0
    for row in sorted(rows, key=lambda r: r["batch"], reverse=True):
        if row["speedup"] <= 1.0:
            break
        threshold = row["batch"]
    return threshold


def response_byte_costs(ctx: BenchContext, repeats: int = 50) -> list[dict[str, object]]:
    """What a response's bytes cost on the worker's CPU, per response: TorchServe's own ``json.dumps(indent=2)``
    (what it runs on a dict) against orjson, and the standard library's base64 against pybase64 on the overlay."""
    model, spec, images, device = ctx.model, ctx.spec, ctx.images, ctx.device
    import base64
    import json as stdlib_json

    import orjson
    import pybase64

    service = _service_for(model, spec, device)
    bodies = [result.body for result in service.answer([{"body": encode_image(i, "jpeg")} for i in images[:8]])]
    overlays = [encode_image(image, "jpeg") for image in images[:8]]
    contenders = {
        "JSON: json.dumps(indent=2), TorchServe's": (lambda: [stdlib_json.dumps(b, indent=2).encode() for b in bodies]),
        "JSON: orjson.dumps": lambda: [orjson.dumps(b) for b in bodies],
        "base64: base64.b64encode": lambda: [base64.b64encode(o) for o in overlays],
        "base64: pybase64.b64encode": lambda: [pybase64.b64encode(o) for o in overlays],
    }
    medians = make_timer(torch.device("cpu"))(contenders, repeats, 3)
    return [
        {
            "step": name,
            "us_per_response": 1e6 * seconds / len(bodies),
            "bytes_per_response": statistics.mean(len(orjson.dumps(b)) for b in bodies)
            if name.startswith("JSON")
            else statistics.mean(map(len, overlays)),
        }
        for name, seconds in medians.items()
    ]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-3) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def stage_shares(ctx: BenchContext) -> dict[str, float]:
    """Where a batch's time goes when it arrives as JPEG files: decode, CAM (forward + gradient), encode."""
    model, spec, images, config, device = ctx.model, ctx.spec, ctx.images, ctx.config, ctx.device
    service = _service_for(model, spec, device)
    rows = [{"body": encode_image(image, "jpeg")} for image in images[: max(config.batch_sizes)]]
    totals = dict.fromkeys(("decode", "cam", "encode"), 0.0)
    for repeat in range(config.warmup + config.repeats):
        service.answer(rows)
        if repeat >= config.warmup:
            for stage in totals:
                totals[stage] += service.stage_seconds[stage]
    whole = sum(totals.values())
    return {f"{stage}_share": seconds / whole for stage, seconds in totals.items()} | {
        f"{stage}_ms_per_image": 1000 * seconds / config.repeats / len(rows) for stage, seconds in totals.items()
    }


PHOTO_TARGETS_MS = {"1080p": 40.0, "12 MP": 60.0}
"""The most a photo may cost over the plain forward pass at batch 1 (the serving-speed issue's CPU targets)."""


def photo_profiles(ctx: BenchContext) -> list[dict[str, object]]:
    """Where one camera-like phone photo's time goes inside the worker (:func:`camera_photo`), with the shipped
    defaults (max_side 2048): decode and resize (``prepare``), the forward pass, Grad-CAM, and the overlay's
    rendering and encoding, each a median over the run's repeats, against the plain forward pass at batch 1 timed
    round-robin with them."""
    model, spec, config, device, timed = ctx.model, ctx.spec, ctx.config, ctx.device, ctx.timed
    service = _service_for(model, spec, device)
    floor_batch = images_to_batch(ctx.images[:1], spec, device)
    rows = []
    for name, size in PHOTOS.items():
        row = {"body": camera_photo(size)}
        stages: dict[str, list[float]] = {"prepare": [], "forward": [], "cam": [], "encode": []}

        def one_request(row: dict = row, stages: dict = stages) -> None:
            started = time.perf_counter()
            prepared = service.prepare(row)
            prepare = time.perf_counter() - started
            service.stage_seconds = {}
            (result,) = service.explain([prepared])
            assert result.status == 200, result.body
            stages["prepare"].append(prepare + service.stage_seconds["decode"])  # with the model's resize
            for stage in ("forward", "cam", "encode"):
                stages[stage].append(service.stage_seconds[stage])

        medians = timed({"floor": partial(plain_forward, model, floor_batch), name: one_request}, config.repeats, 1)
        ms = {stage: 1000 * statistics.median(values[-config.repeats :]) for stage, values in stages.items()}
        total = 1000 * medians[name]
        rows.append(
            {
                "photo": name,
                "width": size[0],
                "height": size[1],
                "jpeg_bytes": len(row["body"]),
                **{f"{stage}_ms": value for stage, value in ms.items()},
                "total_ms": total,
                "floor_ms": 1000 * medians["floor"],
                "over_floor_ms": total - 1000 * medians["floor"],
                "target_over_floor_ms": PHOTO_TARGETS_MS[name],
            }
        )
    return rows


def floor_ms_per_image(model, spec, images, device, timed, config: BenchConfig, batch_size: int) -> float:
    """The plain forward pass at ``batch_size``, ms per image, timed now."""
    batch = images_to_batch(images[:batch_size], spec, device)
    floor = partial(plain_forward, model, batch)
    return 1000 * timed({"floor": floor}, config.repeats, config.warmup)["floor"] / batch_size


DENSE_EXPLAINED = 3
"""Explanations per image in the detector's and segmenter's rows."""


def dense_tasks(ctx: BenchContext) -> list[dict[str, object]]:
    """A detector and a segmenter (``config.detector``, ``config.segmenter``, seeded random weights) on one photo
    (chelsea, 451x300) through the service, each against its own plain forward pass of the same input, timed
    round-robin. With random weights no box reaches a score of 0.5: the detector's requests ask for score_threshold
    0 and the detector has five classes (a fine-tuned one's head: over 91 random classes no box scores even the
    model's own 0.05), so that each explains its top three boxes; the segmenter's name three classes."""
    import tempfile
    from pathlib import Path

    from camtools.models import prepare_model

    config, device, timed = ctx.config, ctx.device, ctx.timed
    photo = encode_image(ctx.images[0], "png")
    rows = []
    labels = Path(tempfile.mkdtemp(prefix="bench-labels-")) / "labels.txt"
    labels.write_text("background\ncat\ndog\nbird\nfish\n")
    for task, arch in (("detection", config.detector), ("segmentation", config.segmenter)):
        given = labels if task == "detection" else None
        prepared = prepare_model(arch=arch, weights="random", task=task, progress=False, labels=given)
        model, spec = prepared.model.to(device), prepared.spec
        service = _service_for(model, spec, device)
        if task == "detection":
            extra = {"score_threshold": "0", "explain": str(DENSE_EXPLAINED)}
            methods = ("hirescam", "gradcam", "eigencam")
        else:
            extra = {"target": ",".join(str(c) for c in range(1, DENSE_EXPLAINED + 1))}
            methods = ("gradcam", "hirescam", "eigencam")
        item = service.prepare({"data": photo, **extra})
        image = torch.tensor(item.model_input, device=device).permute(2, 0, 1).float().div(255)
        floor_input = [image] if task == "detection" else images_to_batch([item.model_input], spec, device)

        def answer(method: str, extra: dict = extra, service: ExplanationService = service) -> None:
            (result,) = service.answer([{"data": photo, "method": method, **extra}])
            assert result.status == 200 and len(result.body["explanations"]) == DENSE_EXPLAINED, result.status

        contenders = {"floor": partial(plain_forward, model, floor_input)}
        contenders |= {method: partial(answer, method) for method in methods}
        medians = timed(contenders, max(3, config.repeats // 2), 1)
        for method in methods:
            rows.append(
                {
                    "task": task,
                    "arch": arch,
                    "method": method,
                    "explanations": DENSE_EXPLAINED,
                    "input": "x".join(str(v) for v in item.model_input.shape[1::-1]),
                    "ms": 1000 * medians[method],
                    "floor_ms": 1000 * medians["floor"],
                    "ratio_to_floor": medians[method] / medians["floor"],
                }
            )
    return rows
