"""Find parts of a model by structure (module types, timm's hooks), never by name substrings."""

from __future__ import annotations

from typing import Iterable

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


def block_entries(model: nn.Module, indices: Iterable[int]) -> set[str]:
    """State entries of the transformer blocks `model.blocks[i]` for each i in `indices`."""
    blocks = transformer_blocks(model)
    return entries_under(model, module_names(model, [blocks[i] for i in indices]))


def transformer_blocks(model: nn.Module) -> nn.Sequential:
    """timm's block stack (`model.blocks`) of a Vision Transformer."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ValueError("the model has no transformer blocks (model.blocks)")
    return blocks


def layer_groups(model: nn.Module) -> dict[str, list[nn.Module]]:
    """A ViT's parts by layer type, each a list of modules found through timm's structure.

    "patch embedding" is `patch_embed` (the class token and position embedding are
    parameters of the model itself and are listed by `embedding_parameters`).
    """
    blocks = transformer_blocks(model)
    return {
        "patch embedding": [model.patch_embed],
        "attention": [b.attn for b in blocks],
        "mlp": [b.mlp for b in blocks],
        "normalization": [m for m in model.modules() if isinstance(m, NORM_TYPES)],
        "head": [model.get_classifier()],
    }


def embedding_parameters(model: nn.Module) -> list[str]:
    """Parameters held directly by the model (a ViT's class token and position embedding)."""
    return [name for name, _ in model.named_parameters(recurse=False)]

