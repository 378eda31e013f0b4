"""Security properties of what ships: safe weight loading, the shipped config, and no request content in eval,
pickle or file paths."""

from __future__ import annotations

import ast
import os
import pickle

import pytest
import torch

from camserve.model import read_state_dict
from camtools.archive import RUNTIME_PACKAGE
from camtools.models import BuildError, WeightsUnavailableError, read_checkpoint
from tests.conftest import ROOT


class Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/gradcam-service-pwned",))


def test_weights_are_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(path)  # the worker
    with pytest.raises(BuildError, match="save its weights instead"):
        read_checkpoint(path)  # the build
    assert not os.path.exists("/tmp/gradcam-service-pwned")


def test_a_plain_state_dict_loads(tmp_path, resnet50):
    path = tmp_path / "resnet50.pt"
    torch.save(resnet50.state_dict(), path)
    assert "fc.weight" in read_state_dict(path) and "fc.weight" in read_checkpoint(path)
    with pytest.raises(WeightsUnavailableError, match="no weights file"):
        read_checkpoint(tmp_path / "missing.pt")


def shipped_config() -> dict[str, str]:
    lines = (ROOT / "config.properties").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_shipped_config_keeps_auth_on_binds_loopback_and_limits_sizes():
    config = shipped_config()
    assert config["disable_token_authorization"] == "false"
    # Registering is on for archives already in the model store; no URL matches allowed_urls, so nothing is fetched
    # (the live test registers one and sees http:// and file:// refused).
    assert config["enable_model_api"] == "true" and config["allowed_urls"] == "(?!)"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert config[key].startswith("http://127.0.0.1:"), key
    assert config["grpc_inference_address"] == config["grpc_management_address"] == "127.0.0.1"
    assert 20 * 1024 * 1024 <= int(config["max_request_size"]) <= 64 * 1024 * 1024
    assert int(config["max_response_size"]) >= 50 * 1024 * 1024


def runtime_sources() -> dict[str, ast.Module]:
    """Every module of the served package, in every subpackage (``cam/``, ``api/``, ``tasks/``), by its path."""
    paths = sorted(RUNTIME_PACKAGE.rglob("*.py"))
    return {path.relative_to(RUNTIME_PACKAGE).as_posix(): ast.parse(path.read_text()) for path in paths}


def test_the_checks_read_every_served_module():
    names = set(runtime_sources())
    assert {"pipeline.py", "cam/engine.py", "cam/methods/registry.py", "api/transports.py", "tasks/base.py"} <= names
    assert len(names) == len(list(RUNTIME_PACKAGE.rglob("*.py")))


def test_no_eval_exec_or_pickle_in_the_served_code():
    for name, tree in runtime_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec", "compile", "__import__"}, name
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "marshal", "shelve", "dill"} & set(modules), name


def test_files_are_opened_only_for_the_archive_contents():
    # Request handling never names a file: images are opened from memory (io.BytesIO), and the only paths are the
    # archive's own files, read at start-up: the weights and the model file by model.py, the spec by spec.py.
    file_readers = {}
    for name, tree in runtime_sources().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            from_memory = bool(node.args) and "BytesIO" in ast.unparse(node.args[0])
            torch_load = ast.unparse(func) == "torch.load"
            if (called == "open" and not from_memory) or called in {"read_text", "read_bytes"} or torch_load:
                file_readers.setdefault(name, set()).add(ast.unparse(func))
    assert set(file_readers) == {"model.py", "spec.py"}, file_readers
