"""Config resolution: layers, type-checked overrides, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from pflbench.benchmark.config import RunConfig, config_hash, flatten, list_presets, parse_override, to_toml
from pflbench.benchmark.resolve import RunSpec, resolve_config
from pflbench.benchmark.errors import UserError


def test_defaults_then_preset_then_overrides_then_flags():
    cfg = resolve_config("fedavg", "digits", preset="smoke",
                         overrides=["train.lr=0.2", "data.augment=false", "model.depth=3"], seed=7, device="cpu")
    assert cfg.train.lr == 0.2 and isinstance(cfg.train.lr, float)
    assert cfg.data.augment is False
    assert cfg.model.depth == 3
    assert cfg.train.rounds == 2  # from the smoke preset
    assert cfg.train.momentum == RunConfig().train.momentum  # untouched default
    assert cfg.seed == 7 and cfg.device == "cpu"


def test_dataset_default_preset_applies_without_preset():
    assert resolve_config("fedavg", "digits").data.alpha == 0.1  # digits -> demo preset


def test_config_file_layer(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text("[train]\nrounds = 3\n[methods.local]\n[methods.fedavg]\n")
    assert resolve_config("fedavg", "digits", preset="smoke", config_file=f).train.rounds == 3


@pytest.mark.parametrize("override, fragment", [
    ("no.such.key=1", "unknown config key 'no.such.key'"),
    ("train.nope=1", "allowed in train:"),
    ("train.lr=fast", "bad value for train.lr"),
    ("train.rounds=2.5", "bad value for train.rounds"),
    ("data.augment=maybe", "bad value for data.augment"),
    ("train.lr=-1", "bad value for train.lr"),
    ("data.partition=weird", "choose one of: dirichlet"),
    ("data.test_fraction=0.9", "data.test_fraction"),
    ("model.embed_dim=31", "divisible by model.num_heads"),
    ("train", "expected key=value"),
    ("method.mid_dim=4", "unknown config key 'method.mid_dim'"),  # not a FedAvg option
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(UserError) as err:
        resolve_config("fedavg", "digits", preset="smoke", overrides=[override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match="unknown method 'nope'; choose one of: .*fedavg"):
        resolve_config("nope", "digits")
    with pytest.raises(UserError, match="unknown dataset 'nope'; choose one of: .*digits"):
        resolve_config("fedavg", "nope")
    with pytest.raises(UserError, match="unknown preset 'nope'; choose one of: .*smoke"):
        resolve_config("fedavg", "digits", preset="nope")


def test_per_method_tables_apply_only_to_that_method(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[methods.fedavg]\nbogus = 1\n")
    assert resolve_config("local", "digits", config_file=f).method.name == "local"  # ignored for local
    with pytest.raises(UserError, match="unknown config key 'method.bogus'"):
        resolve_config("fedavg", "digits", config_file=f)


def test_toml_round_trip_reproduces_the_config(tmp_path):
    cfg = resolve_config("local", "digits", preset="smoke", overrides=["train.lr=0.3"], seed=3)
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    again = resolve_config("local", "digits", preset="smoke", config_file=f)
    assert flatten(again) == flatten(cfg)
    with pytest.raises(UserError, match="method.name = 'local' in the config, but --method fedavg"):
        resolve_config("fedavg", "digits", config_file=f)


def test_config_hash_ignores_seed_but_not_settings():
    a = resolve_config("fedavg", "digits", seed=1)
    b = resolve_config("fedavg", "digits", seed=2)
    c = resolve_config("fedavg", "digits", seed=1, overrides=["train.lr=0.2"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_flatten_has_dotted_keys_for_every_field():
    flat = flatten(resolve_config("fedavg", "digits"))
    assert flat["train.lr"] == 0.05 and flat["method.name"] == "fedavg" and flat["dataset.name"] == "digits"


def test_presets_are_listed_with_descriptions():
    presets = list_presets()
    assert {"smoke", "demo"} <= set(presets)
    assert all(presets.values())


def test_parse_override_keeps_equals_in_value():
    assert parse_override("method.personal=a=b") == ("method.personal", "a=b")


def test_run_spec_is_one_value_for_every_command():
    spec = RunSpec(preset="smoke", overrides=["train.lr=0.2"], seed=4)
    assert spec.overrides == ("train.lr=0.2",)  # a list is frozen to a tuple: hashable, picklable
    later = spec.with_overrides("train.lr=0.3")
    assert later.resolve("fedavg", "digits").train.lr == 0.3  # added settings come last
    assert spec.resolve("fedavg", "digits").train.lr == 0.2 and spec.resolve("local", "digits").seed == 4


def test_config_module_imports_no_registry():
    import subprocess
    import sys

    code = ("import sys, pflbench.benchmark.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('pflbench.methods', 'pflbench.datasets'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("preset,dataset", [
    ("paper-cifar100", "cifar100"), ("paper-organamnist", "organamnist"), ("paper-officehome", "officehome"),
])
def test_paper_presets_run_the_reference_protocol(preset, dataset):
    cfg = resolve_config("fedperfix", dataset, preset=preset)
    # Office-Home's reference generator: no N/K cap, at least 20 / 0.15 samples a client.
    expected = (134, False, "fixed") if dataset == "officehome" else (256, True, "fixed")
    assert (cfg.data.min_samples, cfg.data.dirichlet_cap, cfg.data.normalize) == expected
    assert cfg.train.eval_timing == "reference" and cfg.train.precision == "fp32"
    assert cfg.data.stratify == (dataset == "officehome")
    # The reference keeps the last block personal on CIFAR-100 only.
    assert cfg.method.personal_blocks == (1 if dataset == "cifar100" else 0)
    assert resolve_config("fedavg", dataset, preset=preset).method.name == "fedavg"  # the table is FedPerfix's


@pytest.mark.parametrize("preset", ["smoke", "cpu-cifar10", "cpu-cifar100", "cpu-officehome"])
def test_other_presets_keep_the_defaults(preset):
    cfg = resolve_config("fedperfix", "imagefolder" if preset == "cpu-cifar10" else "digits", preset=preset)
    assert (cfg.data.dirichlet_cap, cfg.data.normalize, cfg.data.stratify) == (False, "train", False)
    assert cfg.train.eval_timing == "after-aggregation" and cfg.method.personal_blocks == 0
