"""A second, personal copy of the model beside the shared one (APFL's and Ditto's local model v).

The copy is registered as a submodule of the model (`TWIN`), so its entries
are ordinary state entries that the engine keeps per client like any other
personal part, and the model's own forward (the shared model w) never runs it.
Storage doubles, as in the papers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

TWIN = "personal_model"  # the copy's submodule name: its entries are `personal_model.<name of w's entry>`


def unwrapped(model: nn.Module) -> nn.Module:
    """The module itself when `model` is a `torch.compile` wrapper around it."""
    return getattr(model, "_orig_mod", model)


def add_twin(model: nn.Module) -> nn.Module:
    """Register a copy of `model` (same initial weights) as its submodule `TWIN`; returns the copy."""
    twin = copy.deepcopy(model)
    model.add_module(TWIN, twin)
    return twin


def twin_of(model: nn.Module) -> nn.Module:
    """The personal copy added by `add_twin`."""
    return getattr(unwrapped(model), TWIN)


def twin_entries(model: nn.Module) -> set[str]:
    """Every state entry of the copy (its parameters and buffers, and what a method added to it)."""
    return {n for n in unwrapped(model).state_dict(keep_vars=True) if n.startswith(TWIN + ".")}


def paired_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, w, v) for every parameter of the shared model w and its copy's counterpart v."""
    model = unwrapped(model)
    twin = dict(getattr(model, TWIN).named_parameters())
    return [(n, p, twin[n]) for n, p in model.named_parameters() if not n.startswith(TWIN + ".")]


def shared_parameter_names(model: nn.Module) -> tuple[str, ...]:
    """The shared model's parameters (everything outside the copy)."""
    return tuple(n for n, _, _ in paired_parameters(model))


def twin_parameter_names(model: nn.Module) -> tuple[str, ...]:
    """The copy's parameters, as the model names them."""
    return tuple(n for n, _ in unwrapped(model).named_parameters() if n.startswith(TWIN + "."))


def squared_distance(model: nn.Module) -> torch.Tensor:
    """||v - w||^2 summed over every parameter pair."""
    return sum((v - w).float().pow(2).sum() for _, w, v in paired_parameters(model))
