"""Resolving a run's settings layers against the method and dataset registries.

A `RunSpec` is the user's choice of layers (preset, config file, `--set`
list, the dedicated flags) as one value: every command builds it once from
its arguments and resolves it for each (method, dataset) it runs. It is
picklable and plain, so it can be handed to worker processes as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..datasets import DATASETS
from ..datasets.base import NORMALIZATIONS
from ..datasets.partition import PARTITIONERS, PROTOCOLS
from ..methods import METHODS
from .config import (
    RunConfig, assign, check_ranges, layer_items, load_config_file, load_preset, parse_override, require,
)
from .errors import UserError
from .models import model_width


@dataclass(frozen=True)
class RunSpec:
    """The settings layers of a command, applied in this order over the dataclass defaults."""

    preset: str | None = None  # preset name; None = the dataset's default preset
    config_file: str | None = None  # a TOML file of settings (`--config`)
    overrides: tuple[str, ...] = ()  # `key=value` settings (`--set`), in order
    seed: int | None = None  # `--seed`; None = the config's seed
    device: str | None = None  # `--device`; None = the config's device
    data_root: str | None = None  # `--data-root`; None = the config's dataset.root

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.config_file is not None:
            object.__setattr__(self, "config_file", str(self.config_file))

    def with_overrides(self, *extra: str) -> RunSpec:
        """This spec with `extra` `key=value` settings applied after its own."""
        return dataclasses.replace(self, overrides=(*self.overrides, *extra))

    def resolve(self, method: str, dataset: str) -> RunConfig:
        """The fully resolved, validated configuration of one run of `method` on `dataset`."""
        method_cls = METHODS.get(method)
        dataset_entry = DATASETS.get(dataset)
        cfg = RunConfig(method=method_cls.Options(name=method), dataset=dataset_entry.Options(name=dataset))

        layers: list[tuple[str, Any]] = []
        preset_name = self.preset or dataset_entry.default_preset
        if preset_name:
            layers += layer_items(load_preset(preset_name), method, dataset)
        if self.config_file:
            layers += layer_items(load_config_file(self.config_file), method, dataset)
        layers += [parse_override(o) for o in self.overrides]
        for key, value in layers:
            if key in ("method.name", "dataset.name"):
                # A saved run config names them; it must agree with the command line.
                chosen = method if key == "method.name" else dataset
                if value != chosen:
                    raise UserError(f"{key} = {value!r} in the config, but --{key.split('.')[0]} {chosen}")
                continue
            assign(cfg, key, value)
        if self.seed is not None:
            cfg.seed = self.seed
        if self.device is not None:
            assign(cfg, "device", self.device)
        if self.data_root is not None:
            cfg.dataset.root = self.data_root
        cfg.method.scale_to_width(model_width(cfg.model))
        validate(cfg)
        return cfg


def resolve_config(
    method: str,
    dataset: str,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    seed: int | None = None,
    device: str | None = None,
    data_root: str | None = None,
) -> RunConfig:
    """Shorthand for `RunSpec(...).resolve(method, dataset)`."""
    spec = RunSpec(preset=preset, config_file=config_file, overrides=tuple(overrides), seed=seed,
                   device=device, data_root=data_root)
    return spec.resolve(method, dataset)


def validate(cfg: RunConfig) -> None:
    """Every check of a resolved config: ranges and the method's and dataset's own, then registered names."""
    check_ranges(cfg)
    d = cfg.data
    require(d.partition in PARTITIONERS, "data.partition", d.partition,
            f"choose one of: {', '.join(PARTITIONERS.names())}")
    require(d.protocol in PROTOCOLS, "data.protocol", d.protocol, f"choose one of: {', '.join(PROTOCOLS)}")
    require(d.normalize in NORMALIZATIONS, "data.normalize", d.normalize, f"choose one of: {', '.join(NORMALIZATIONS)}")
