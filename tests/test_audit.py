"""The dataset audit (``camtools.audit``, ``scripts/audit.py``): its figures and flag rules by hand, its sources, and
Ray Data end to end on ShapesNet trained with a planted shortcut: the class found, with and without boxes; error
rows; an actor killed mid-run; ``--resume``; a cluster joined by address; the stored heatmaps against TorchServe's."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from camtools.audit.analysis import analyse, peak_region, spray
from camtools.audit.run import AuditError, AuditOptions, audit, read_rows
from camtools.audit.sources import SourceError, read_source
from camtools.audit.worker import THUMBNAIL, box_figures
from camtools.local_server import free_port
from tests.conftest import ROOT, encode

LABELS = ("red", "green", "blue")
SMALL = AuditOptions(object_store_mb=80, batch_size=8)

# --- The figures and the rules, by hand ---


def test_pointing_and_energy_of_a_map_for_a_box_by_hand():
    heat = np.zeros((10, 20), np.float32)
    heat[2, 4], heat[8, 15] = 3.0, 1.0
    # The box is in the pixels of a 40x20 image: halved onto the 20x10 map, it covers x 4..5, y 1..2.
    pointing, energy = box_figures(heat, (8.0, 2.0, 12.0, 6.0), (40, 20))
    assert pointing is True and energy == pytest.approx(0.75)
    pointing, energy = box_figures(heat, (20.0, 10.0, 40.0, 20.0), (40, 20))
    assert pointing is False and energy == pytest.approx(0.25)
    assert box_figures(np.zeros((4, 4)), (0, 0, 2, 2), (4, 4))[1] == 0.0


def test_peak_region_is_the_area_around_the_peak_above_half_its_height():
    heat = np.zeros((32, 32), np.float32)
    heat[24:30, 26:32] = 1.0
    heat[2:6, 2:6] = 0.4  # below half the peak: not part of the region
    assert peak_region(heat) == pytest.approx((26 / 32, 24 / 32, 1.0, 30 / 32))
    assert peak_region(np.zeros((8, 8))) == (0.0, 0.0, 1.0, 1.0)


def blob(y: int, x: int, side: int = THUMBNAIL, sigma: float = 2.0) -> np.ndarray:
    ys, xs = np.mgrid[0:side, 0:side]
    return np.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_spray_finds_two_strategies_by_the_eigengap():
    rng = np.random.default_rng(0)
    maps = [blob(6 + rng.integers(-1, 2), 6 + rng.integers(-1, 2)) for _ in range(12)]
    maps += [blob(25 + rng.integers(-1, 2), 24 + rng.integers(-1, 2)) for _ in range(8)]
    strategies = spray(np.stack(maps))
    assert [len(s.members) for s in strategies] == [12, 8]
    assert sorted(strategies[1].members) == list(range(12, 20))
    assert all(s.tightness > 0.8 for s in strategies)
    assert len(spray(np.stack(maps[:12]))) == 1


def hand_rows(boxes: bool):
    """Three classes of 10 maps: red and green peak on their objects, which move; blue always peaks in the
    bottom-right corner while its objects are elsewhere."""
    rng = np.random.default_rng(1)
    rows, maps = [], []
    for target in range(3):
        for _ in range(10):
            y, x = (int(v) for v in rng.integers(2, 24, 2))
            heat = blob(29, 29) if target == 2 else blob(y + 2, x + 2)
            row = {"target": target, "predicted": target, "explained": target, "pointing": None, "energy_in_box": None}
            if boxes:
                pointing, energy = box_figures(heat, (x, y, x + 5, y + 5), (THUMBNAIL, THUMBNAIL))
                row |= {"pointing": pointing, "energy_in_box": energy}
            rows.append(row)
            maps.append(heat)
    return rows, np.stack(maps)


@pytest.mark.parametrize("boxes", [True, False])
def test_the_flag_rule_on_hand_made_maps_finds_the_class_that_looks_in_the_corner(boxes):
    rows, maps = hand_rows(boxes)
    found = analyse(rows, maps, LABELS)
    assert [item.name for item in found if item.flagged] == ["blue"]
    blue = found[2]
    assert blue.peak_region[0] >= 0.75 and blue.peak_region[1] >= 0.75
    assert "bottom-right" in blue.reason and "100% of the maps peak" in blue.reason
    if boxes:
        assert blue.pointing == 0 and found[0].pointing == 1 and "pointing 0.00 against 1.00" in blue.reason
    # The same maps with blue's looking at its objects: nothing is flagged.
    fair = maps.copy()
    fair[20:] = maps[:10]
    fair_rows = [dict(row) for row in rows]
    for row, reference in zip(fair_rows[20:], rows[:10], strict=True):
        row["pointing"], row["energy_in_box"] = reference["pointing"], reference["energy_in_box"]
    assert not any(item.flagged for item in analyse(fair_rows, fair, LABELS))


# --- The sources ---


def test_every_source_form_reads_to_the_same_rows(tmp_path):
    images = tmp_path / "images"
    for name in ("red", "blue"):
        (images / name).mkdir(parents=True)
        cv2.imwrite(str(images / name / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "list.csv").write_text(
        "file,class,x0,y0,x1,y1\nimages/red/a.png,red,1,2,5,6\nimages/blue/a.png,2,,,,\n"
    )
    from_csv = read_source(str(tmp_path / "list.csv"), LABELS)
    assert [(r["file"], r["label"], r["target"], r["box"]) for r in from_csv] == [
        ("images/red/a.png", "red", 0, (1.0, 2.0, 5.0, 6.0)),
        ("images/blue/a.png", "2", 2, None),
    ]
    assert from_csv[0]["path"] == f"{tmp_path}/images/red/a.png"
    folders = read_source(str(images), LABELS)
    assert [(r["file"], r["target"]) for r in folders] == [("blue/a.png", 2), ("red/a.png", 0)]
    table = pa.table({"file": ["images/red/a.png"], "class": ["red"], "x0": [1.0], "y0": [2.0], "x1": [5.0],
                      "y1": [6.0]})  # fmt: skip
    pq.write_table(table, tmp_path / "list.parquet")
    from_parquet = read_source(str(tmp_path / "list.parquet"), LABELS)
    assert [(r["path"], r["target"], r["box"]) for r in from_parquet] == [(from_csv[0]["path"], 0, (1, 2, 5, 6))]
    unlabelled = read_source(str(images / "red"), LABELS)
    assert [(r["file"], r["label"], r["target"]) for r in unlabelled] == [("a.png", None, None)]
    with pytest.raises(SourceError, match="class 'purple' is neither one of the model's labels"):
        read_source(str(_write(tmp_path / "bad.csv", "images/red/a.png,purple\n")), LABELS)
    with pytest.raises(SourceError, match="a box needs x1 > x0"):
        read_source(str(_write(tmp_path / "box.csv", "images/red/a.png,red,5,5,1,1\n")), LABELS)
    with pytest.raises(SourceError, match="does not exist"):
        read_source(str(tmp_path / "nowhere"), LABELS)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- Ray Data end to end, on the trained shortcut model ---


@pytest.fixture(scope="session")
def shortcut(tmp_path_factory):
    """ShapesNet trained with the corner tag that decides 'blue' (about 30 s), its archive and 90 held-out images."""
    from camtools.audit.synthetic import shortcut_dataset

    archive, boxes, folders, accuracy = shortcut_dataset(tmp_path_factory.mktemp("shortcut"))
    assert accuracy >= 0.95
    return archive, boxes, folders


def _ok(summary: dict) -> dict:
    return {item["class"]: item for item in summary["classes"]}


@pytest.mark.slow
def test_the_audit_flags_exactly_the_shortcut_class_and_its_corner_with_and_without_boxes(shortcut, tmp_path):
    archive, boxes, folders = shortcut
    for source, name in ((boxes, "boxes"), (folders, "folders")):
        out = tmp_path / name
        summary = audit(str(source), archive, out, SMALL)
        print(f"shortcut audit, {name}: " + json.dumps(summary["classes"]))
        assert summary["images"] == 90 and summary["errors"] == 0 and summary["accuracy"] >= 0.95
        assert summary["flagged"] == ["blue"], summary["classes"]
        blue = _ok(summary)["blue"]
        x0, y0, x1, y1 = blue["peak_region"]
        assert x0 >= 0.6 and y0 >= 0.6 and x1 == 1.0 and y1 == 1.0, blue  # the tag's corner
        assert "bottom-right" in blue["reason"]
        if name == "boxes":
            assert blue["pointing"] < 0.2 and _ok(summary)["red"]["pointing"] > 0.8
        else:
            assert blue["pointing"] is None and "other classes' maps" in blue["reason"]
        assert summary["engine"]["ray"] == "2.60.0" and summary["engine"]["address"] == "local"
        assert json.loads((out / "summary.json").read_text()) == summary
        rows = read_rows(out)
        assert sorted(r["file"] for r in rows) == sorted({r["file"] for r in rows}) and len(rows) == 90
        assert {r["status"] for r in rows} == {"ok"}
        page = (out / "report.html").read_text()
        assert "data:image/png;base64," in page and 'src="http' not in page and "blue" in page
        assert "Flagged classes" in (out / "report.md").read_text()
        picture = cv2.imread(str(out / "summary.png"))
        assert picture is not None and picture.shape[1] > 3 * 150


@pytest.mark.slow
def test_bad_files_become_error_rows_and_the_job_goes_on(shortcut, tmp_path):
    archive, boxes, _ = shortcut
    folder = tmp_path / "mixed"
    shutil.copytree(Path(boxes).parent / "images", folder)
    good = next((folder / "red").glob("*.png")).read_bytes()
    (folder / "red" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "red" / "text.png").write_bytes(b"not an image at all")
    (folder / "red" / "empty.jpg").write_bytes(b"")
    (folder / "red" / "huge.png").write_bytes(encode(np.zeros((1, 40000, 3), np.uint8)))
    summary = audit(str(folder), archive, tmp_path / "out", SMALL)
    rows = {r["file"]: r for r in read_rows(tmp_path / "out")}
    assert len(rows) == 94 and summary["images"] == 94 and summary["errors"] == 4
    from camserve.pipeline import ExplanationService  # the messages are the service's own

    service = _service(archive, tmp_path)
    for name in ("truncated.png", "text.png", "empty.jpg", "huge.png"):
        row = rows[f"red/{name}"]
        expected = service.answer([{"data": bytearray((folder / "red" / name).read_bytes()), "heatmap": "true"}])[0]
        assert row["status"] == "error" and row["heatmap"] is None
        assert expected.status >= 400 and row["error"] == expected.body["message"], (name, row["error"])
    assert isinstance(service, ExplanationService)


@pytest.mark.slow
def test_the_requests_options_reach_every_row_as_the_service_answers_them(shortcut, tmp_path):
    """--method, --layer, --faithfulness and --sanity: each row holds what /explanations answers with the same
    options (the service in process: the heatmap to 1e-3, deletion, insertion and the sanity figure)."""
    archive, boxes, _ = shortcut
    options = AuditOptions(object_store_mb=80, limit=6, method="hirescam", layer="features.4", faithfulness=True,
                           sanity=True)  # fmt: skip
    summary = audit(str(boxes), archive, tmp_path / "out", options)
    assert summary["method"] == "hirescam" and summary["layer"] == "features.4" and summary["errors"] == 0
    service = _service(archive, tmp_path)
    for row in read_rows(tmp_path / "out"):
        data = (Path(boxes).parent / row["file"]).read_bytes()
        fields = {"method": "hirescam", "layer": "features.4", "faithfulness": "true", "sanity": "true",
                  "heatmap": "true", "target": str(row["explained"])}  # fmt: skip
        answer = service.answer([{"data": bytearray(data), **fields}])[0].body
        explanation = answer["explanations"][0]
        # One image alone against six in a batch: the same figures up to float32 rounding (they are given to 1e-6).
        assert row["deletion"] == pytest.approx(explanation["faithfulness"]["deletion"], abs=1e-4)
        assert row["insertion"] == pytest.approx(explanation["faithfulness"]["insertion"], abs=1e-4)
        assert row["sanity"] == pytest.approx(explanation["sanity"]["rank_correlation"], abs=1e-4)
        ours = cv2.imdecode(np.frombuffer(row["heatmap"], np.uint8), cv2.IMREAD_UNCHANGED) / 65535.0
        theirs = base64.b64decode(explanation["heatmap"])
        theirs = cv2.imdecode(np.frombuffer(theirs, np.uint8), cv2.IMREAD_UNCHANGED) / 65535.0
        assert np.abs(ours - theirs).max() <= 1e-3
    # The default method at the default layer gives other maps: the options did reach the actors.
    default = audit(str(boxes), archive, tmp_path / "default", AuditOptions(object_store_mb=80, limit=6))
    assert default["method"] == "gradcam" and default["layer"] != "features.4"
    plain = {r["file"]: r["heatmap"] for r in read_rows(tmp_path / "default")}
    assert all(plain[r["file"]] != r["heatmap"] for r in read_rows(tmp_path / "out"))


def _service(archive: Path, tmp_path: Path):
    import zipfile

    import torch

    from camserve.pipeline import ExplanationService
    from camserve.spec import archive_manifest, handler_settings

    model_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(model_dir)
    manifest = archive_manifest(model_dir)
    return ExplanationService.from_archive(
        model_dir, manifest["model"]["serializedFile"], handler_settings(model_dir, manifest), torch.device("cpu")
    )


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_retried_and_every_row_is_there_once(shortcut, tmp_path):
    archive, boxes, _ = shortcut
    many = tmp_path / "many.csv"
    # 720 rows: 8 copies of each image under their own file names.
    images = Path(boxes).parent / "images"
    rows = [("file", "class")]
    for copy in range(8):
        for path in sorted(images.glob("*/*.png")):
            name = f"copies/{copy}-{path.parent.name}-{path.name}"
            (tmp_path / "copies").mkdir(exist_ok=True)
            shutil.copy(path, tmp_path / name)
            rows.append((name, path.parent.name))
    with open(many, "w", newline="") as target:
        csv.writer(target).writerows(rows)
    pids = tmp_path / "pids"
    pids.mkdir()
    killed: list[int] = []
    restarted: list[int] = []

    def kill_one() -> None:
        """Kill an actor that has begun its second batch, so that it dies holding work, then stop the others until
        its restarted process has begun a batch: the run can only finish through the restarted actor."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            busy = [path for path in pids.iterdir() if len(path.read_text().splitlines()) >= 2]
            if busy:
                os.kill(int(busy[0].name), signal.SIGKILL)
                killed.append(int(busy[0].name))
            time.sleep(0.05)
        others = [int(path.name) for path in pids.iterdir() if int(path.name) not in killed]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            while time.monotonic() < deadline:
                fresh = [p for p in pids.iterdir() if int(p.name) not in killed + others and p.read_text().strip()]
                if fresh:
                    restarted.append(int(fresh[0].name))
                    return
                time.sleep(0.05)
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    options = AuditOptions(object_store_mb=80, batch_size=4, pid_folder=str(pids))
    summary = audit(str(many), archive, tmp_path / "out", options)
    killer.join(timeout=5)
    assert killed, "no actor was killed"
    files = [r["file"] for r in read_rows(tmp_path / "out", ["file", "status"])]
    assert len(files) == len(rows) - 1 == 720 and len(set(files)) == 720
    assert summary["errors"] == 0
    assert restarted, "the killed actor was not restarted, or its new process never began a batch"


@pytest.mark.slow
def test_resume_writes_only_the_rest(shortcut, tmp_path):
    archive, boxes, _ = shortcut
    out = tmp_path / "out"
    first = audit(str(boxes), archive, out, AuditOptions(object_store_mb=80, limit=30))
    assert first["images"] == 30 and first["new_images"] == 30
    before = {r["file"]: r["heatmap"] for r in read_rows(out, ["file", "heatmap"])}
    second = audit(str(boxes), archive, out, AuditOptions(object_store_mb=80, resume=True))
    rows = read_rows(out, ["file", "heatmap"])
    assert second["new_images"] == 60 and second["images"] == 90 and len({r["file"] for r in rows}) == 90 == len(rows)
    assert all(before[r["file"]] == r["heatmap"] for r in rows if r["file"] in before)
    again = audit(str(boxes), archive, out, AuditOptions(object_store_mb=80, resume=True))
    assert again["new_images"] == 0 and again["images"] == 90


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "audit.py"), *args], capture_output=True, text=True, timeout=600,
        env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_a_wrong_archive_or_path_is_one_line_and_exit_2(shortcut, tmp_path):
    archive, boxes, _ = shortcut
    for args, message in (
        ([str(boxes), "--archive", str(tmp_path / "none.mar")], "does not exist"),
        ([str(boxes), "--archive", str(boxes)], "is not a .mar"),
        ([str(tmp_path / "nowhere"), "--archive", str(archive)], "IMAGES"),
    ):
        result = run_cli(*args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    with pytest.raises(AuditError, match="IMAGES"):
        audit(str(tmp_path / "nowhere"), archive, tmp_path / "out", SMALL)


@pytest.mark.slow
def test_the_audit_joins_a_cluster_by_address(shortcut, tmp_path):
    archive, boxes, _ = shortcut
    port = free_port()
    temp = Path(f"/tmp/ray-head-{port}")
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=2", "--block",
         "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        result = run_cli(str(boxes), "--archive", str(archive), "--out", str(tmp_path / "out"), "--address", address,
                         "--limit", "24")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["engine"]["address"] == address and summary["images"] == 24 and summary["errors"] == 0
        assert "audited 24 images" in result.stdout and "images/s" in result.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # this head alone, never a global `ray stop`
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.slow
def test_stored_heatmaps_equal_torchserves_for_the_same_images(shortcut, tmp_path):
    import requests

    from camtools.local_server import run_torchserve

    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17")
    archive, boxes, _ = shortcut
    out = tmp_path / "out"
    audit(str(boxes), archive, out, AuditOptions(object_store_mb=80, limit=12))
    stored = {r["file"]: r for r in read_rows(out)}
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(archive, store / archive.name)
    with run_torchserve(store / archive.name, tmp_path / "torchserve") as server:
        for file, row in stored.items():
            data = (Path(boxes).parent / file).read_bytes()
            fields = {"target": str(row["explained"]), "heatmap": "true"}
            answer = requests.post(
                f"{server.inference}/explanations/{server.model}", headers=server.headers(),
                files={"data": data}, data=fields, timeout=60,
            ).json()  # fmt: skip
            live = base64.b64decode(answer["explanations"][0]["heatmap"])
            ours = cv2.imdecode(np.frombuffer(row["heatmap"], np.uint8), cv2.IMREAD_UNCHANGED) / 65535.0
            theirs = cv2.imdecode(np.frombuffer(live, np.uint8), cv2.IMREAD_UNCHANGED) / 65535.0
            assert answer["predictions"][0]["index"] == row["predicted"]
            assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-3, file
