"""Where to personalize: the layer-sensitivity study of the FedPerfix paper.

For each layer type of the ViT (patch embedding, attention, MLP,
normalization, head) and for each block depth, one run personalizes only that
part through the `partial` method; one FedAvg run is the baseline. The parts
are found through the model's structure, then written as glob patterns over
entry names (`blocks.0.attn.*`), so each run's config says exactly what was
personal. Every run is recorded under one MLflow parent run, which also holds
the table (CSV) and the bar chart (PNG).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from ..methods.structure import embedding_parameters, layer_groups, module_names, transformer_blocks
from .config import RunConfig, config_hash
from .engine import Callback, Simulation
from .errors import UserError
from .reports import sensitivity_csv, sensitivity_png
from .resolve import RunSpec
from .experiment import Recording, run_experiment
from .records import Stage, Tag
from .tracking import ParentRun

STAGE = Stage.SENSITIVITY


@dataclass(frozen=True)
class Part:
    """One arm of the study: what is personal (nothing for the baseline)."""

    label: str  # "attention", "block 0", "fedavg"
    group: str  # "baseline", "layer type" or "depth"
    patterns: tuple[str, ...] = ()  # `method.personal` of the partial run; empty = FedAvg


@dataclass
class PartResult:
    """The outcome of one arm."""

    part: Part
    test_acc_mean: float
    test_acc_weighted: float
    personal_parameters: int
    run_id: str | None


@dataclass
class SensitivityResult:
    """Every arm's outcome, the baseline first, and where the study was recorded."""

    dataset: str
    seed: int
    results: list[PartResult]
    parent_run_id: str | None
    files: dict[str, Path] = field(default_factory=dict)  # "csv", "png" -> written paths

    @property
    def baseline(self) -> PartResult:
        return self.results[0]

    def rows(self) -> list[dict[str, object]]:
        """The table: part, group, personal parameters, accuracies and the gain over FedAvg."""
        base = self.baseline.test_acc_mean
        return [{
            "part": r.part.label, "group": r.part.group, "personal_parameters": r.personal_parameters,
            "test_acc_mean": r.test_acc_mean, "test_acc_weighted": r.test_acc_weighted,
            "delta_vs_fedavg": r.test_acc_mean - base, "run_id": r.run_id or "",
        } for r in self.results]


def _patterns(model: nn.Module, modules: Sequence[nn.Module]) -> tuple[str, ...]:
    """Glob patterns covering the entries of `modules` (those without any entry are left out)."""
    names = set(model.state_dict(keep_vars=True))
    out = []
    for name in module_names(model, list(modules)):
        if any(n.startswith(name + ".") for n in names):
            out.append(f"{name}.*")
    return tuple(out)


def study_parts(model: nn.Module) -> list[Part]:
    """The baseline, one part per layer type, then one per block depth, found by structure."""
    parts = [Part("fedavg", "baseline")]
    for label, modules in layer_groups(model).items():
        patterns = _patterns(model, modules)
        if label == "patch embedding":
            patterns += tuple(embedding_parameters(model))  # class token and position embedding
        parts.append(Part(label, "layer type", patterns))
    for i, block in enumerate(transformer_blocks(model)):
        parts.append(Part(f"block {i}", "depth", _patterns(model, [block])))
    return parts


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run_sensitivity(
    dataset: str,
    spec: RunSpec = RunSpec(),
    *,
    tracking_uri: str | None = None,
    experiment: str = "pflbench",
    out_dir: str | Path | None = None,
    callbacks: Callable[[Part, RunConfig], Sequence[Callback]] = lambda part, cfg: (),
) -> SensitivityResult:
    """Run the whole study; `callbacks(part, cfg)` adds progress reporters to each run.

    The table (CSV) and bar chart (PNG) go to `out_dir` (a temporary folder
    when None) and are attached to the parent run.
    """
    for text in spec.overrides:
        if text.strip().startswith("method."):
            raise UserError(f"bench sensitivity chooses the method settings itself; drop --set {text}")

    def resolve(method: str, extra: Sequence[str] = ()) -> RunConfig:
        return spec.with_overrides(*extra).resolve(method, dataset)

    base_cfg = resolve("fedavg")
    resolve("partial", ["method.personal=head.*"])  # the arms' config is refused now, not after the baseline
    parent = ParentRun(tracking_uri, experiment, run_name=f"sensitivity-{dataset}-s{base_cfg.seed}", stage=STAGE,
                       tags={Tag.DATASET: dataset, Tag.SEED: base_cfg.seed}).prepare()
    baseline = Simulation(base_cfg)
    parts = study_parts(baseline.model)
    parent.params = {"dataset": dataset, "seed": base_cfg.seed, "preset": spec.preset or "", "parts": len(parts),
                     "config_hash": config_hash(base_cfg)}
    results: list[PartResult] = []
    with parent:
        for part in parts:
            if part.patterns:
                arm = spec.with_overrides(f"method.personal={','.join(part.patterns)}")
                method = "partial"
            else:
                arm, method = spec, "fedavg"
            recording = Recording(tracking_uri, experiment, stage=STAGE, run_name=f"{STAGE}-{_slug(part.label)}",
                                  parent_run_id=parent.run_id,
                                  tags={Tag.SENSITIVITY_PART: part.label, Tag.SENSITIVITY_GROUP: part.group})
            # Same seed and data settings: the baseline's images and partition are reused as they are.
            done = run_experiment(arm, method, dataset, recording=recording, images=baseline.images,
                                  partition=baseline.partition,
                                  callbacks=lambda sim, recorder: callbacks(part, sim.cfg))
            final = done.result.final.metrics()
            results.append(PartResult(part, final["test_acc_mean"], final["test_acc_weighted"],
                                      done.sim.num_personal_parameters, done.run_id))
            parent.log_metrics({f"test_acc_mean.{_slug(part.label)}": final["test_acc_mean"]})
        study = SensitivityResult(dataset, base_cfg.seed, results, parent.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(out_dir) if out_dir is not None else Path(tmp)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # checked up front; this is a folder that changed meanwhile
                raise UserError(f"cannot create {folder}: {err.strerror}") from None
            stem = f"sensitivity-{dataset}-s{base_cfg.seed}"
            csv = folder / f"{stem}.csv"
            csv.write_text(sensitivity_csv(study.rows()))
            shown = results[1:]
            png = sensitivity_png([r.part.label for r in shown], [r.test_acc_mean for r in shown],
                                  [r.part.group for r in shown], study.baseline.test_acc_mean, folder / f"{stem}.png",
                                  f"where to personalize: {dataset}, seed {base_cfg.seed}")
            parent.log_artifact(csv)
            parent.log_artifact(png)
            if out_dir is not None:
                study.files = {"csv": csv, "png": png}
    return study
