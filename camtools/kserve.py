"""The storage layout that KServe's TorchServe runtime reads: config/config.properties and model-store/<model>.mar.

Build-time only: this module is not shipped inside the archive.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from camserve import settings

__all__ = ["ENVELOPES", "kserve_config", "write_kserve_storage"]

ENVELOPES = {"v1": "kserve", "v2": "kservev2"}
"""KServe protocol version to TorchServe's request envelope."""


METRICS_FILE = Path(__file__).resolve().parent.parent / "metrics.yaml"


def kserve_config(protocol: str, model_name: str, workers: int = 1, batch_size: int = 1) -> str:
    """config.properties for the TorchServe runtime inside a KServe predictor pod.

    KServe's own model server in the pod answers on port 8080 and forwards to TorchServe on 8085, so TorchServe
    binds the pod's interfaces and leaves authentication to the cluster (Istio/Knative): token authorization is off
    here, unlike the shipped config.properties. TorchServe's KServe envelopes read the first request of a batch
    only, so batchSize is 1: a client batches by sending several ``instances`` (v1) or ``inputs`` (v2). The
    handler's metrics are declared in ``config/metrics.yaml`` beside it (without ``metrics_config`` TorchServe
    drops them), and ``install_py_dep_per_model`` lets the worker install the archive's requirements (OpenCV),
    which KServe's TorchServe image lacks.
    """
    if protocol not in ENVELOPES:
        raise ValueError(f"protocol must be v1 or v2, got {protocol!r}")
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            model_name: {
                "1.0": {
                    "defaultVersion": True,
                    "marName": f"{model_name}.mar",
                    "minWorkers": workers,
                    "maxWorkers": workers,
                    "batchSize": batch_size,
                    "maxBatchDelay": settings.MAX_BATCH_DELAY_MS,
                    "responseTimeout": settings.RESPONSE_TIMEOUT_S,
                }
            }
        },
    }
    return "\n".join(
        [
            "# TorchServe inside a KServe predictor pod (written by scripts/kserve_storage.py).",
            "inference_address=http://0.0.0.0:8085",
            "management_address=http://0.0.0.0:8085",
            "metrics_address=http://0.0.0.0:8082",
            "grpc_inference_port=7070",
            "grpc_management_port=7071",
            "enable_envvars_config=true",
            "install_py_dep_per_model=true",
            "metrics_config=/mnt/models/config/metrics.yaml",
            "disable_token_authorization=true",
            "enable_model_api=false",
            f"service_envelope={ENVELOPES[protocol]}",
            "metrics_mode=prometheus",
            f"max_request_size={settings.MAX_REQUEST_BYTES}",
            f"max_response_size={settings.MAX_RESPONSE_BYTES}",
            "model_store=/mnt/models/model-store",
            f"model_snapshot={json.dumps(snapshot, separators=(',', ':'))}",
            "",
        ]
    )


def write_kserve_storage(mar: Path, out: Path, protocol: str, workers: int = 1) -> Path:
    """Lay out ``out/config/config.properties``, ``out/config/metrics.yaml`` and ``out/model-store/<mar name>``;
    return ``out``."""
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True, exist_ok=True)
    shutil.copy2(mar, out / "model-store" / mar.name)
    shutil.copy2(METRICS_FILE, out / "config" / "metrics.yaml")
    (out / "config" / "config.properties").write_text(kserve_config(protocol, mar.stem, workers))
    return out
