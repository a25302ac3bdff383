"""Vision Transformers for any dataset's image size, built with timm."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import ModelConfig
from .errors import UserError


def build_model(cfg: ModelConfig, *, image_size: int, in_chans: int, num_classes: int) -> VisionTransformer:
    """A ViT for `image_size` px inputs with `in_chans` channels and `num_classes` outputs.

    `cfg.name == "vit"` builds timm's `VisionTransformer` from the config's
    width/depth/heads; any other name is looked up in timm (ViTs only).
    """
    if cfg.name == "vit":
        if image_size % cfg.patch_size:
            raise UserError(
                f"bad value for model.patch_size: {cfg.patch_size} (must divide the image size {image_size})"
            )
        model = VisionTransformer(
            img_size=image_size,
            patch_size=cfg.patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
        )
        if cfg.pretrained:
            raise UserError("model.pretrained needs a timm model name in model.name (e.g. vit_small_patch16_224)")
    else:
        model = _timm_vit(cfg, image_size=image_size, in_chans=in_chans, num_classes=num_classes)
    if cfg.pretrained_path:
        load_weights(model, cfg.pretrained_path)
    return model


def model_width(cfg: ModelConfig) -> int:
    """The token width of the ViT `cfg` describes (a timm name is built on the meta device to read it)."""
    if cfg.name == "vit":
        return cfg.embed_dim
    with torch.device("meta"):
        model = _timm_vit(dataclasses.replace(cfg, pretrained=False, pretrained_path=""),
                          image_size=max(cfg.image_size, 0) or 224, in_chans=3, num_classes=10)
    return int(model.embed_dim)


def _timm_vit(cfg: ModelConfig, *, image_size: int, in_chans: int, num_classes: int) -> VisionTransformer:
    import timm

    if any(c in cfg.name for c in "*?[]"):
        raise UserError(f"bad value for model.name: {cfg.name!r} (one timm model name, not a pattern;"
                        f" `timm.list_models({cfg.name!r})` lists the matches)")
    if not timm.is_model(cfg.name):
        vits = ", ".join(timm.list_models("vit_*")[:8])
        raise UserError(f"unknown model.name {cfg.name!r}; use 'vit' or a timm ViT such as {vits}, ...")
    try:
        model = timm.create_model(
            cfg.name, pretrained=cfg.pretrained, num_classes=num_classes, in_chans=in_chans, img_size=image_size
        )
    except TypeError:
        # Only ViTs take img_size; any other architecture lands here.
        raise UserError(f"model.name {cfg.name!r} is not a Vision Transformer") from None
    except (OSError, RuntimeError, ValueError, AssertionError) as err:
        if not cfg.pretrained:
            raise UserError(f"model.name {cfg.name!r} cannot be built for {image_size} px images with"
                            f" {in_chans} channels ({err}); set model.image_size to a size it takes") from None
        raise UserError(
            f"could not load pretrained weights for {cfg.name} (offline? {type(err).__name__});"
            " set model.pretrained=false, or model.pretrained_path=FILE to load a local checkpoint"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise UserError(f"model.name {cfg.name!r} is not a Vision Transformer")
    patch = model.patch_embed.patch_size
    if image_size % patch[0] or image_size % patch[1]:
        raise UserError(f"model.name {cfg.name!r} has {patch[0]} px patches, which do not tile {image_size} px images;"
                        " set model.image_size to a multiple of the patch size")
    return model


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local checkpoint (weights only); entries whose shape differs (a new head) are skipped.

    Returns the names of the model entries left at their initial values.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.pretrained_path not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-tensor file: the user's to fix
        # Not torch's message: it advises turning weights_only off, which must not be done with a foreign file.
        raise UserError(f"cannot read weights from {path} ({type(err).__name__}): not a weights-only checkpoint"
                        " of tensors; refusing to load it") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"no weights in {path} fit this model (check model.* against the checkpoint)")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
