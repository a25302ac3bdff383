"""Model construction: any size, timm ViTs by name, pretrained weights online or from a file."""

from __future__ import annotations

import pytest
import timm
import torch

from pflbench.benchmark.config import ModelConfig
from pflbench.benchmark.engine import resolve_device
from pflbench.benchmark.errors import UserError
from pflbench.benchmark.models import build_model


def test_vit_for_any_image_size_channels_and_classes():
    model = build_model(ModelConfig(patch_size=4, embed_dim=32, depth=3, num_heads=2), image_size=12, in_chans=1,
                        num_classes=7)
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 7)
    assert len(model.blocks) == 3 and model.embed_dim == 32


def test_patch_size_must_divide_the_image():
    with pytest.raises(UserError, match="model.patch_size"):
        build_model(ModelConfig(patch_size=5), image_size=8, in_chans=1, num_classes=10)


def test_timm_vit_by_name_and_unknown_names():
    model = build_model(ModelConfig(name="vit_tiny_patch16_224"), image_size=32, in_chans=3, num_classes=5)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(UserError, match="unknown model.name 'no_such_vit'"):
        build_model(ModelConfig(name="no_such_vit"), image_size=32, in_chans=3, num_classes=5)
    with pytest.raises(UserError, match="not a Vision Transformer"):
        build_model(ModelConfig(name="resnet18"), image_size=32, in_chans=3, num_classes=5)


def test_pretrained_offline_is_one_line_with_the_way_out(monkeypatch):
    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError) as err:
        build_model(ModelConfig(name="vit_tiny_patch16_224", pretrained=True), image_size=32, in_chans=3,
                    num_classes=5)
    message = str(err.value)
    assert "model.pretrained=false" in message and "model.pretrained_path=FILE" in message and "\n" not in message


def test_pretrained_path_loads_weights_and_skips_a_new_head(tmp_path):
    cfg = ModelConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2)
    torch.manual_seed(0)
    source = build_model(cfg, image_size=8, in_chans=1, num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    target = build_model(ModelConfig(**{**cfg.__dict__, "pretrained_path": str(tmp_path / "w.pt")}), image_size=8,
                         in_chans=1, num_classes=3)
    for name, value in source.state_dict().items():
        if name.startswith("head."):
            assert target.state_dict()[name].shape != value.shape  # 3 classes: left at its init
        else:
            assert torch.equal(target.state_dict()[name], value), name
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        build_model(ModelConfig(**{**cfg.__dict__, "pretrained_path": str(tmp_path / "bad.pt")}), image_size=8,
                    in_chans=1, num_classes=3)


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
