"""Plug-ins: a package installed beside pflbench adds a method and a dataset through entry points.

The test writes a throwaway package (README's "Add your own method" example, a dataset, and their
entry points), builds it into a wheel, installs that wheel with pip into a folder of its own
(`pip install --target`), and runs `bench` in fresh processes with that folder on PYTHONPATH, as an
installed package is seen: nothing is registered by the test process itself. A second package whose import fails is
installed beside it. Each check prints what it ran and what came back.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY

PLUGIN = '''\
"""A throwaway pflbench plug-in: one method and one dataset."""

from dataclasses import dataclass

import numpy as np
from torch import nn

from pflbench.benchmark.config import DatasetConfig, MethodConfig
from pflbench.datasets import ImageSet, register_dataset
from pflbench.methods import Method, register


@dataclass
class HeadNormOptions(MethodConfig):
    """The `method.*` settings of headnorm (`--set method.norms=false`)."""

    norms: bool = True  # keep every LayerNorm on the client too


@register("headnorm")
class HeadNorm(Method):
    """FedPer with personal norms: the classifier head and every LayerNorm stay on the client."""

    Options = HeadNormOptions

    def personal_entries(self, model: nn.Module) -> set[str]:
        head = {f"head.{n}" for n, _ in model.get_classifier().named_parameters()}
        if not self.options.norms:
            return head
        norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                 for p, _ in mod.named_parameters()}
        return head | norms


@register_dataset("stripes", "stripes at four angles on 8x8 noise (offline, generated)")
def load_stripes(cfg: DatasetConfig, progress=None) -> ImageSet:
    """800 images, 4 classes: the class is the stripes' direction."""
    rng = np.random.default_rng(0)
    labels = np.arange(800) % 4
    y, x = np.mgrid[:8, :8]
    patterns = [(x % 2), (y % 2), ((x + y) % 2), ((x - y) % 2)]
    images = np.stack([patterns[k] * 200 + rng.integers(0, 55, (8, 8)) for k in labels])
    return ImageSet(images=images.astype(np.uint8)[..., None], labels=labels.astype(np.int64),
                    class_names=["vertical", "horizontal", "diagonal", "antidiagonal"], hflip=False)
'''

ENTRY_POINTS = """\
[pflbench.methods]
headnorm = pflbench_demo_plugin:HeadNorm

[pflbench.datasets]
stripes = pflbench_demo_plugin:load_stripes
"""


def _wheel(folder: Path, dist: str, modules: dict[str, str], entry_points: str) -> Path:
    """A pure-Python wheel of `modules` declaring `entry_points`, as a build backend writes one."""
    info = f"{dist.replace('-', '_')}-0.1.dist-info"
    files = {**modules, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/entry_points.txt": entry_points}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{dist.replace('-', '_')}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """The environment of a process that sees the plug-in packages installed (pip, from their wheels)."""
    tmp = tmp_path_factory.mktemp("plugin")
    good = _wheel(tmp, "pflbench-demo-plugin", {"pflbench_demo_plugin/__init__.py": PLUGIN}, ENTRY_POINTS)
    broken = _wheel(tmp, "pflbench-broken-plugin",
                    {"pflbench_broken_plugin.py": '"""Needs a package that is not installed."""\nimport nowhere_to_be_found\n'},
                    "[pflbench.methods]\nbroken = pflbench_broken_plugin\n")
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(site), str(good), str(broken)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert (site / "pflbench_demo_plugin-0.1.dist-info" / "entry_points.txt").is_file()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    return env, tmp


def _bench(env, cwd, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pflbench.benchmark.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    print(f"$ bench {' '.join(argv)}\n-> exit {done.returncode}\n{done.stdout.rstrip()}\n{done.stderr.rstrip()}")
    return done


BROKEN = ("warning: plug-in method 'broken' from package pflbench-broken-plugin failed to load:"
          " ModuleNotFoundError: No module named 'nowhere_to_be_found'; skipped")
SETTINGS = [a for o in TINY for a in ("--set", o)]


def test_bench_list_shows_the_plugins_and_one_line_for_the_broken_one(plugin_env):
    env, tmp = plugin_env
    done = _bench(env, tmp, "list")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert "FedPer with personal norms" in listed["headnorm"] and "pflbench-demo-plugin" in listed["headnorm"]
    assert "stripes at four angles" in listed["stripes"] and "pflbench-demo-plugin" in listed["stripes"]
    assert "fedperfix" in listed and "digits" in listed and "broken" not in listed  # the rest keep working
    assert done.stderr.strip().splitlines() == [BROKEN]


def test_bench_run_trains_the_plugin_method_on_the_plugin_dataset(plugin_env):
    env, tmp = plugin_env
    done = _bench(env, tmp, "run", "--method", "headnorm", "--dataset", "stripes", "--preset", "smoke",
                  "--device", "cpu", *SETTINGS, "--experiment", "plugin-run", "--quiet")
    assert done.returncode == 0, done.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("plugin-run").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.tags["pflbench.method"], run.data.tags["pflbench.dataset"]) == ("headnorm", "stripes")
    # The method's own split: the head (16 x 4 + 4) and 5 LayerNorms (2 blocks x 2, the final one; 2 x 16 each).
    assert run.data.tags["pflbench.personal_parameters"] == str(16 * 4 + 4 + 5 * 2 * 16)
    assert run.data.params["method.norms"] == "True"  # its own option, in the recorded config
    assert 0.0 <= run.data.metrics["test_acc_mean"] <= 1.0


def test_tune_and_sweep_workers_load_the_plugins_themselves(plugin_env):
    env, tmp = plugin_env
    tune = _bench(env, tmp, "tune", "--method", "headnorm", "--dataset", "stripes", "--preset", "smoke",
                  "--device", "cpu", *SETTINGS, "--trials", "2", "--workers", "2", "--experiment", "plugin-tune",
                  "--quiet")
    assert tune.returncode == 0, tune.stderr
    assert "trials=2 ran=2" in tune.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    trials = client.search_runs([client.get_experiment_by_name("plugin-tune").experiment_id],
                                "tags.`pflbench.stage` = 'tune' and attributes.status = 'FINISHED'")
    assert len([r for r in trials if "mlflow.parentRunId" in r.data.tags]) == 2

    suite = tmp / "suite.toml"
    suite.write_text(textwrap.dedent(f"""\
        experiment = "plugin-sweep"
        seeds = [0, 1]
        methods = ["headnorm", "fedavg"]
        [[run]]
        dataset = "stripes"
        preset = "smoke"
        overrides = [{", ".join(f'"{o}"' for o in TINY)}]
        """))
    sweep = _bench(env, tmp, "sweep", str(suite), "--workers", "2", "--quiet")
    assert sweep.returncode == 0, sweep.stderr
    assert "runs=4 finished=4 skipped=0 failed=0" in sweep.stdout


def test_the_registry_contract_holds_for_the_plugins(plugin_env):
    env, tmp = plugin_env
    check = ("from pflbench.benchmark.testing import check_dataset, check_method;"
             "r = check_method('headnorm', dataset='stripes'); check_method('headnorm'); check_dataset('stripes', train=True);"
             "print(f\"contract holds: headnorm, stripes (test_acc_mean {r.history[-1]['test_acc_mean']:.3f})\")")
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr)
    assert done.returncode == 0 and "contract holds: headnorm, stripes" in done.stdout, done.stderr
    # pflbench's own parametrized contract tests pick the installed plug-ins up as well.
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_registry.py"),
                           "-k", "headnorm or stripes"], cwd=tests.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    print(done.stdout[-600:])
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-2000:]
