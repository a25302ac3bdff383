"""Run configuration: a dataclass tree, TOML presets, and `key=value` overrides.

This module imports nothing from `methods/` or `datasets/` (they import it
for their option dataclasses); resolving a run's layers against the
registries is `benchmark/resolve.py`.

A configuration is resolved in layers, each overriding the one before:
dataclass defaults -> preset (`--preset`, or the dataset's default preset) ->
`--config FILE.toml` -> `--set key=value` -> the dedicated CLI flags.
Every key is checked against the dataclass fields and every value against the
field's type, so a typo can never silently fall back to a default.

The `method` and `dataset` sections are typed by the chosen method's and
dataset's own `Options` dataclass, so `--set method.mid_dim=128` is checked
against FedPerfix's options and refused for FedAvg. A preset may also hold
per-method and per-dataset tables (`[methods.fedperfix]`, `[datasets.cifar100]`)
that apply only when that method or dataset is the one being run.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError

# ---------------------------------------------------------------------------
# The dataclass tree


@dataclass
class MethodConfig:
    """Options of a method; each method subclasses this with its own fields."""

    name: str = "fedavg"  # registered method name (`bench list`)

    def scale_to_width(self, width: int) -> None:
        """Resolve the options whose reference size is stated for ViT-S (width 384) to a model `width` wide.

        Called once the model is known, before validation; an explicit value is kept.
        """


@dataclass
class DatasetConfig:
    """Options of a dataset; a dataset may subclass this with its own fields."""

    name: str = "digits"  # registered dataset name (`bench list`)
    root: str = "data"  # folder holding the dataset's files (--data-root)


@dataclass
class ModelConfig:
    """The Vision Transformer trained by every client."""

    name: str = "vit"  # "vit" = a ViT built from the fields below; or any timm ViT name
    image_size: int = 0  # input size in pixels; 0 = the dataset's native size
    patch_size: int = 4  # patch side in pixels
    embed_dim: int = 96  # token width
    depth: int = 4  # number of transformer blocks
    num_heads: int = 4  # attention heads per block
    mlp_ratio: float = 2.0  # MLP hidden width / embed_dim
    pretrained: bool = False  # load timm's pretrained weights (needs internet)
    pretrained_path: str = ""  # local checkpoint (weights only) to start from
    compile: bool = False  # torch.compile the model (GPU runs)


@dataclass
class DataConfig:
    """How the dataset is split over clients and fed to them."""

    partition: str = "dirichlet"  # partition scheme (`bench list`)
    protocol: str = "pool"  # pool = official train+test pooled, then split; keep-test = official test kept as test
    alpha: float = 0.5  # Dirichlet concentration; smaller = more label skew
    num_clients: int = 20  # number of clients (natural: domains x clients_per_domain)
    classes_per_client: int = 2  # shards: the exact number of classes each client holds
    clients_per_domain: int = 1  # natural: clients per domain, split inside it by Dirichlet(alpha)
    min_samples: int = 10  # every client gets at least this many samples (the reference: 256)
    dirichlet_cap: bool = False  # dirichlet: a client holding N/K samples gets no more classes (the reference's draw)
    val_fraction: float = 0.15  # share of each client's samples held out for validation
    test_fraction: float = 0.25  # share of each client's samples held out for testing (pool protocol)
    stratify: bool = False  # split each client's samples into train/val/test class by class (Office-Home reference)
    partition_seed: int = -1  # seed of the partition; -1 = the run's seed
    partition_file: str = ""  # reuse a saved partition (JSON artifact) exactly
    novel_clients: int = 0  # clients held out of training (seeded), adapted after the last round: novel_test_acc_mean
    augment: bool = True  # random crop (and flip where the dataset allows) on the device
    normalize: str = "train"  # train: mean/std of the training images only; fixed: (0.5, 0.5), the reference's


EVAL_TIMINGS = ("after-aggregation", "after-local", "reference")
PRECISIONS = ("auto", "bf16", "fp32")
NORMALIZATIONS = ("train", "fixed")  # train: statistics of the training images only; fixed: (0.5, 0.5)


@dataclass
class TrainConfig:
    """The federated schedule and the local optimizer."""

    rounds: int = 20  # communication rounds
    sample_fraction: float = 1.0  # share of clients sampled each round
    local_epochs: int = 1  # local epochs per round
    batch_size: int = 64  # local mini-batch size
    lr: float = 0.01  # SGD learning rate
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0  # SGD weight decay
    max_grad_norm: float = 0.0  # clip each step's gradient norm; 0 = off
    eval_every: int = 1  # evaluate every client every N rounds (and after the last)
    eval_batch_size: int = 512  # batch size for evaluation
    client_failure_rate: float = 0.0  # probability that a sampled client fails mid-round (seeded); its update is dropped
    # after-aggregation: every client, from the round's aggregated state (what pflbench reports);
    # after-local: only the round's sampled clients, right after their local training;
    # reference: every client, the sampled ones right after their local training and the others with the
    # round's broadcast plus their own personal part (the FedPerfix reference code's evaluation)
    eval_timing: str = "after-aggregation"  # when a round's accuracy is measured (see above)
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere; bf16; fp32 (the reference trains in fp32)
    parallel_clients: int | str = "auto"  # clients trained in one batched step; auto: <= 16 on a GPU, 1 on a CPU
    personal_device_mb: float = 2048.0  # personal state kept on the device up to this size; beyond, in host memory


@dataclass
class RunOptions:
    """How a run is carried out; nothing here changes its result."""

    checkpoint_every: int = 0  # save the whole simulation every N rounds (resume with --resume); 0 = never
    keep_checkpoint: bool = False  # keep the last checkpoint once the run has finished (default: delete it)
    deterministic: bool = False  # PyTorch's deterministic algorithms (+ cuBLAS workspace): bit-reproducible GPU runs


@dataclass
class RunConfig:
    """Everything that determines a run's result."""

    seed: int = 0  # fixes partition, init, client sampling and batches
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    method: MethodConfig = field(default_factory=MethodConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunOptions = field(default_factory=RunOptions)


# Keys that do not change the result: left out of the config hash.
# Keys that do not change the result (how clients are scheduled and where state lives change it
# only within float error).
_UNHASHED = {"seed", "device", "dataset.root", "run.checkpoint_every", "run.keep_checkpoint", "run.deterministic",
             "train.parallel_clients", "train.personal_device_mb"}

MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most a signed 64-bit seed
MAX_IMAGE_SIZE = 4096  # pixels a side: larger is a typo, not an experiment

# ---------------------------------------------------------------------------
# Presets


def _preset_dir():
    return resources.files("pflbench.benchmark") / "presets"


def list_presets() -> dict[str, str]:
    """Preset names mapped to their one-line descriptions."""
    found = {}
    for entry in _preset_dir().iterdir():
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text())
            found[entry.name[: -len(".toml")]] = str(data.get("description", ""))
    return dict(sorted(found.items()))


def load_preset(name: str) -> dict[str, Any]:
    """The TOML table of preset `name`; a UserError lists the valid ones."""
    presets = list_presets()
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return tomllib.loads((_preset_dir() / f"{name}.toml").read_text())


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A user's TOML config file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text (TOML files are UTF-8)") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None


def names_in_config_file(path: str | Path) -> tuple[str | None, str | None]:
    """`method.name` and `dataset.name` as a config file sets them (a run's config.toml sets both)."""
    table = load_config_file(path)
    names = []
    for section in ("method", "dataset"):
        value = table.get(section, {}).get("name") if isinstance(table.get(section), Mapping) else None
        if value is not None and not isinstance(value, str):
            raise UserError(f"bad value for {section}.name in {path}: {value!r} (expected a name)")
        names.append(value)
    return names[0], names[1]


# ---------------------------------------------------------------------------
# Typed assignment


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(key: str, value: Any, target: Any) -> Any:
    """`value` converted to type `target`, or a UserError naming `key`."""

    def bad(expected: str) -> UserError:
        return UserError(f"bad value for {key}: {value!r} (expected {expected})")

    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(target)
        for option in options:
            try:
                return coerce(key, value, option)
            except UserError:
                continue
        raise bad(" or ".join(getattr(t, "__name__", str(t)) for t in options))
    if origin is list:
        (item_type,) = typing.get_args(target)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [coerce(key, v, item_type) for v in value]
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad("true or false")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if target is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad("a number")
        if not math.isfinite(number):  # nan and inf pass float(); no option means them
            raise bad("a finite number")
        return number
    if target is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise TypeError(f"unsupported config type {target!r} for {key}")


def assign(cfg: RunConfig, key: str, value: Any) -> None:
    """Set dotted `key` on the config tree, type-checked."""
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        types = _field_types(type(node))
        if part not in types:
            where = ".".join(parts[:depth]) or "the top level"
            raise UserError(
                f"unknown config key {key!r}; allowed in {where}: {', '.join(types)}"
            )
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(types[part]):
                raise UserError(f"config key {key!r} is a section; set one of its fields")
            setattr(node, part, coerce(key, value, types[part]))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise UserError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])} has no fields")


def _flatten_table(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_flatten_table(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def parse_override(text: str) -> tuple[str, str]:
    """Split a `--set key=value` argument."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"bad --set {text!r}: expected key=value, e.g. train.lr=0.05")
    return key.strip(), value.strip()


def layer_items(table: Mapping[str, Any], method: str, dataset: str) -> list[tuple[str, Any]]:
    """Settings of one TOML layer, with the per-method/-dataset tables resolved."""
    table = dict(table)
    table.pop("description", None)
    items = []
    for group, section in (("methods", "method"), ("datasets", "dataset")):
        chosen = method if group == "methods" else dataset
        per_name = table.pop(group, {})
        if not isinstance(per_name, Mapping):
            raise UserError(f"config table [{group}] must hold one table per {section} name")
        if chosen in per_name:
            items += [(f"{section}.{k}", v) for k, v in _flatten_table(per_name[chosen])]
    return _flatten_table(table) + items


# ---------------------------------------------------------------------------
# Validation


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"bad value for {key}: {value!r} ({allowed})")


def check_ranges(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express; raises UserError naming the key.

    Checks that need the registries (the partition scheme's name) live in
    `resolve.validate`, which calls this first.
    """
    dev = cfg.device
    require(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "device", dev, "auto, cpu, cuda or cuda:N")
    m, d, t = cfg.model, cfg.data, cfg.train
    for key, value in (("model.patch_size", m.patch_size), ("model.embed_dim", m.embed_dim),
                       ("model.depth", m.depth), ("model.num_heads", m.num_heads),
                       ("data.num_clients", d.num_clients), ("train.rounds", t.rounds),
                       ("train.local_epochs", t.local_epochs), ("train.batch_size", t.batch_size),
                       ("train.eval_every", t.eval_every), ("train.eval_batch_size", t.eval_batch_size)):
        require(value >= 1, key, value, "must be >= 1")
    require(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, f"must be in [0, {MAX_SEED}]")
    require(0 <= m.image_size <= MAX_IMAGE_SIZE, "model.image_size", m.image_size,
            f"0 = native, or a size in pixels up to {MAX_IMAGE_SIZE}")
    require(-1 <= d.partition_seed <= MAX_SEED, "data.partition_seed", d.partition_seed,
            f"-1 = the run's seed, or a seed in [0, {MAX_SEED}]")
    require(m.embed_dim % m.num_heads == 0, "model.embed_dim", m.embed_dim,
             f"must be divisible by model.num_heads={m.num_heads}")
    require(m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "must be > 0")
    require(d.normalize in NORMALIZATIONS, "data.normalize", d.normalize,
            f"choose one of: {', '.join(NORMALIZATIONS)}")
    require(d.alpha > 0, "data.alpha", d.alpha, "must be > 0")
    require(d.classes_per_client >= 1, "data.classes_per_client", d.classes_per_client, "must be >= 1")
    require(d.clients_per_domain >= 1, "data.clients_per_domain", d.clients_per_domain, "must be >= 1")
    require(d.min_samples >= 0, "data.min_samples", d.min_samples, "must be >= 0")
    require(0 <= d.novel_clients < d.num_clients, "data.novel_clients", d.novel_clients,
            f"must be >= 0 and leave clients to train: < data.num_clients={d.num_clients}")
    require(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in [0, 1)")
    require(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in (0, 1)")
    require(d.val_fraction + d.test_fraction < 1, "data.test_fraction", d.test_fraction,
             "val_fraction + test_fraction must leave training samples")
    require(t.eval_timing in EVAL_TIMINGS, "train.eval_timing", t.eval_timing,
            f"choose one of: {', '.join(EVAL_TIMINGS)}")
    require(t.precision in PRECISIONS, "train.precision", t.precision, f"choose one of: {', '.join(PRECISIONS)}")
    require(0 < t.sample_fraction <= 1, "train.sample_fraction", t.sample_fraction, "must be in (0, 1]")
    require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    require(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    require(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0 (0 = off)")
    require(0 <= t.client_failure_rate <= 1, "train.client_failure_rate", t.client_failure_rate, "must be in [0, 1]")
    require(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", cfg.run.checkpoint_every,
            "must be >= 0 (0 = never)")
    require(t.parallel_clients == "auto" or (isinstance(t.parallel_clients, int) and t.parallel_clients >= 1),
            "train.parallel_clients", t.parallel_clients, "an integer >= 1, or auto")
    require(t.personal_device_mb >= 0, "train.personal_device_mb", t.personal_device_mb, "must be >= 0")
    for options in (cfg.method, cfg.dataset):  # each may check its own fields
        check = getattr(options, "validate", None)
        if check is not None:
            check()


# ---------------------------------------------------------------------------
# Descriptions: each field's trailing comment, read from the source


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """`{field: its trailing comment}` of a config dataclass and the dataclasses it extends."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
        (node,) = ast.parse(source).body
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                text = comments.get(stmt.end_lineno)
                if text:
                    out[stmt.target.id] = text
    return out


def _sentinel(value: Any, text: str) -> str | None:
    """What a special value means, when the comment says (`0 = the dataset's native size`)."""
    shown = {json.dumps(value) if isinstance(value, str) else repr(value)}
    if isinstance(value, float) and value.is_integer():
        shown.add(str(int(value)))  # a comment writes 0, not 0.0
    for text_value in shown:
        match = re.search(rf"(?:^|[;,(]\s*){re.escape(text_value)} = ([^;,)]+)", text)
        if match:
            return match.group(1).strip()
    return None


def explain(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """`(key, value as TOML, description)` for every key of a resolved config, sentinels spelled out."""
    rows = []
    values = flatten(cfg)

    def walk(node: Any, prefix: str) -> None:
        comments = field_comments(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            text = comments.get(f.name, "")
            meaning = _sentinel(value, text)
            if meaning:
                if meaning in values:  # the sentinel stands for another key: show its value
                    meaning += f" = {_toml_value(values[meaning])}"
                text += f"  [here: {meaning}]"
            rows.append((f"{prefix}{f.name}", _toml_value(value), text))

    walk(cfg, "")
    return rows


# ---------------------------------------------------------------------------
# Views of a resolved config


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a nested dict of plain values."""
    return dataclasses.asdict(cfg)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """The config as `{"train.lr": 0.01, ...}`: one dict, logged in one call."""
    return dict(_flatten_table(to_dict(cfg)))


def config_hash(cfg: RunConfig) -> str:
    """A short hash of everything that changes the result, seed excluded.

    Runs of the same configuration over several seeds share this hash, which
    is how the leaderboard groups them into mean +- std.
    """
    relevant = {k: v for k, v in flatten(cfg).items() if k not in _UNHASHED}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML; `--config` reads it back to the same run."""
    data = to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
