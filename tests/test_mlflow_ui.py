"""The MLflow UI opens pflbench's runs in its model-training view, not its GenAI view.

MLflow 3's UI has two views: GenAI (traces, prompts; a run is filed under "Evaluation runs") and
model training ("Runs", "Model registry"). The test records one pflbench run in a fresh store,
starts `mlflow ui` on it, and loads the run's page as pflbench prints it in headless Chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pflbench.benchmark.engine import Simulation
from pflbench.benchmark.tracking import RunRecorder

from conftest import tiny_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
GENAI = "Evaluation runs"  # the GenAI view's menu entry (and its run pages' section)
TRAINING = "Model registry"  # the model-training view's menu entry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_text(url: str) -> str:
    """The visible text of `url` once its scripts have run (tags replaced by ' | ')."""
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"(\s*\|\s*)+", " | ", re.sub(r"<[^>]+>", " | ", dom))


# CI (.ci/run sets PFLBENCH_REQUIRE_SERVICES=1) never skips: there a missing browser fails the test.
@pytest.mark.skipif(CHROMIUM is None and os.environ.get("PFLBENCH_REQUIRE_SERVICES") != "1",
                    reason="no chromium binary on PATH (.ci/run installs Debian's chromium)")
def test_the_mlflow_ui_opens_a_pflbench_run_in_the_model_training_view(tracking_uri, tmp_path):
    assert CHROMIUM is not None, "PFLBENCH_REQUIRE_SERVICES=1 but no chromium binary on PATH"
    with RunRecorder(tracking_uri, "ui-check", run_name="fedavg-digits-ui") as recorder:
        Simulation(tiny_config("fedavg", "train.rounds=1")).run([recorder])
    experiment = MlflowClient(tracking_uri).get_experiment(recorder.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        printed = recorder.url.replace("127.0.0.1:5000", f"127.0.0.1:{port}")  # the link `bench run` prints
        page = _page_text(printed)
        assert "fedavg-digits-ui" in page and "test_acc_mean" in page  # the run's own page, loaded
        assert TRAINING in page and GENAI not in page, page[:2000]
        # The same page without the link's view choice opens in GenAI: the markers tell the views apart.
        bare = _page_text(printed.split("?")[0])
        assert "fedavg-digits-ui" in bare and GENAI in bare and TRAINING not in bare, bare[:2000]
    finally:
        ui.terminate()
        ui.wait(timeout=30)
