"""The runtime gates as a pytest suite, for teams that receive an artifact folder:

    pytest runtime_tests --artifact out/smollm2-135m-w4a4-boa [--providers cpu,cuda,openvino] [--gates FILE]

(``EDGEQ_ARTIFACT`` may name the folder instead.) Every test runs once per execution provider; a
provider missing here (CUDA without onnxruntime-gpu or a GPU, OpenVINO not installed) is skipped
with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeq.config import DEFAULT_GATES
from edgeq.evaluation import DecoderLM
from edgeq.validate import (
    check_gates,
    compare_with_fp,
    load_fp_reference,
    load_gates,
    model_files_bytes,
    open_for_validation,
    provider_status,
)


def pytest_addoption(parser):
    group = parser.getgroup("edgeq")
    group.addoption("--artifact", default=os.environ.get("EDGEQ_ARTIFACT"), help="artifact folder")
    group.addoption("--providers", default="cpu,cuda", help="execution providers (cpu,cuda,openvino)")
    group.addoption("--gates", default=None, help="TOML file with a [gates] table (default: edgeq's)")
    group.addoption("--threads", type=int, default=2, help="ORT threads for the timings")


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        names = [p.strip() for p in metafunc.config.getoption("providers").split(",") if p.strip()]
        status = provider_status(names)
        params = [
            pytest.param(full, marks=pytest.mark.skip(reason=why) if why else (), id=full)
            for full, why in status.items()
        ]
        metafunc.parametrize("provider", params, scope="session")


@pytest.fixture(scope="session")
def artifact(pytestconfig) -> Path:
    folder = pytestconfig.getoption("artifact")
    if not folder:
        pytest.exit("give the artifact folder: --artifact DIR or EDGEQ_ARTIFACT", returncode=4)
    return Path(folder)


@pytest.fixture(scope="session")
def report(artifact) -> dict:
    path = artifact / "report.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="session")
def gates(pytestconfig) -> dict[str, float]:
    path = pytestconfig.getoption("gates")
    return load_gates(Path(path)) if path else check_gates(DEFAULT_GATES)


@pytest.fixture(scope="session")
def reference(artifact):
    return load_fp_reference(artifact)


@pytest.fixture(scope="session")
def session_cache() -> dict:
    return {}


@pytest.fixture
def lm(artifact, provider, pytestconfig, session_cache) -> DecoderLM:
    key = ("lm", provider)
    if key not in session_cache:
        threads = pytestconfig.getoption("threads")
        session_cache[key] = open_for_validation(artifact, provider, threads)
    return session_cache[key]


@pytest.fixture
def fp_comparison(lm, reference, provider, session_cache) -> dict[str, float]:
    key = ("compare", provider)
    if key not in session_cache:
        session_cache[key] = compare_with_fp(lm.logits, reference, progress=False)
    return session_cache[key]


@pytest.fixture(scope="session")
def files_bytes(artifact) -> int:
    return model_files_bytes(artifact)
