"""Find parts of a model by structure (module types, timm's hooks), never by name substrings."""

from __future__ import annotations

from torch import nn

# Normalization layers by type: a ViT's LayerNorm, a CNN's BatchNorm, and kin.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
)


def module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """The qualified names of `modules` inside `model`."""
    wanted = {id(m) for m in modules}
    return [name for name, m in model.named_modules() if id(m) in wanted]


def entries_under(model: nn.Module, prefixes: list[str]) -> set[str]:
    """Names of the parameters and persistent buffers inside the modules named `prefixes`."""
    names = set(model.state_dict(keep_vars=True))
    return {n for n in names for p in prefixes if n == p or n.startswith(p + ".")}


def head_entries(model: nn.Module) -> set[str]:
    """State entries of the classifier head, found through timm's `get_classifier()`."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise ValueError("the model has no classifier head (get_classifier)")
    return entries_under(model, module_names(model, [head]))


def norm_entries(model: nn.Module) -> set[str]:
    """State entries of every normalization layer, chosen by module type."""
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    return entries_under(model, module_names(model, norms))
