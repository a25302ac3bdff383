"""The layer-sensitivity study: which parts it personalizes, and how it is recorded."""

from __future__ import annotations

import fnmatch

import pytest
from conftest import TINY, tiny_config
from mlflow.tracking import MlflowClient
from torch import nn

from pflbench.benchmark.cli import main
from pflbench.benchmark.engine import Simulation
from pflbench.benchmark.sensitivity import study_parts
from pflbench.methods.structure import head_entries, norm_entries

LABELS = ["fedavg", "patch embedding", "attention", "mlp", "normalization", "head", "block 0", "block 1"]


def _expand(model: nn.Module, patterns) -> set[str]:
    names = list(model.state_dict())
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def test_parts_cover_exactly_the_structural_layers():
    model = Simulation(tiny_config("fedavg")).model
    parts = {p.label: p for p in study_parts(model)}
    assert list(parts) == LABELS
    assert parts["fedavg"].patterns == ()
    under = lambda prefix: {n for n in model.state_dict() if n.startswith(prefix)}  # noqa: E731
    expected = {
        "patch embedding": under("patch_embed.") | {"cls_token", "pos_embed"},
        "attention": under("blocks.0.attn.") | under("blocks.1.attn."),
        "mlp": under("blocks.0.mlp.") | under("blocks.1.mlp."),
        "normalization": norm_entries(model),
        "head": head_entries(model),
        "block 0": under("blocks.0."),
        "block 1": under("blocks.1."),
    }
    for label, names in expected.items():
        assert names and _expand(model, parts[label].patterns) == names, label


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One study on the tiny digits config, run through the CLI."""
    root = tmp_path_factory.mktemp("sensitivity")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sets = [arg for kv in [*TINY, "train.rounds=1"] for arg in ("--set", kv)]
    code = main(["sensitivity", "--dataset", "digits", "--preset", "smoke", "--device", "cpu", "--quiet",
                 "--tracking-uri", uri, "--experiment", "sens", "--out", str(root / "out"), *sets])
    assert code == 0
    return root, uri


def test_every_part_is_one_child_run_of_one_parent(study):
    root, uri = study
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sens")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["pflbench.stage"] == "sensitivity" and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_part = {r.data.tags["pflbench.sensitivity.part"]: r for r in children}
    assert sorted(by_part) == sorted(LABELS) and len(children) == len(LABELS)
    assert by_part["fedavg"].data.params["method.name"] == "fedavg"
    assert by_part["head"].data.params["method.name"] == "partial"
    assert by_part["head"].data.params["method.personal"] == "['head.*']"
    assert by_part["block 1"].data.params["method.personal"] == "['blocks.1.*']"
    # The parent's metrics repeat each child's final accuracy.
    for label, child in by_part.items():
        key = "test_acc_mean." + label.replace(" ", "_")
        assert parent.data.metrics[key] == child.data.metrics["test_acc_mean"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"sensitivity-digits-s0.csv", "sensitivity-digits-s0.png"}


def test_table_and_chart_are_written(study):
    root, _ = study
    csv = (root / "out" / "sensitivity-digits-s0.csv").read_text().splitlines()
    assert csv[0] == "part,group,personal_parameters,test_acc_mean,test_acc_weighted,delta_vs_fedavg,run_id"
    rows = [line.split(",") for line in csv[1:]]
    assert [r[0] for r in rows] == LABELS
    base = float(rows[0][3])
    assert rows[0][2] == "0"
    for r in rows:
        assert float(r[5]) == pytest.approx(float(r[3]) - base, abs=2e-6)
    assert (root / "out" / "sensitivity-digits-s0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_settings_are_refused(tmp_path, capsys):
    code = main(["sensitivity", "--dataset", "digits", "--preset", "smoke", "--set", "method.personal=head.*",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert code == 2
    assert "method.personal" in capsys.readouterr().err
