"""What a stage trains: the parameter groups of the video UNet, unfrozen exactly (masks for part of a tensor)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gen1.config import ConfigError
from gen1.training.config import LATENT_CHANNELS, TRAINABLE_GROUPS

log = logging.getLogger(__name__)


@dataclass
class Trainable:
    """The parameters an optimizer updates; ``masks`` restrict some of them elementwise (1 = trainable)."""

    parameters: list[nn.Parameter]
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> mask of param's shape
    names: list[str] = field(default_factory=list)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups; a masked parameter gets no weight decay, so its frozen elements stay exact."""
        plain = [p for p in self.parameters if id(p) not in self.masks]
        masked = [p for p in self.parameters if id(p) in self.masks]
        groups = [{"params": plain, "weight_decay": weight_decay}] if plain else []
        if masked:
            groups.append({"params": masked, "weight_decay": 0.0})
        return groups


def _conv_in_weight(model: nn.Module) -> tuple[str, nn.Parameter]:
    found = [(n, p) for n, p in model.named_parameters() if n.endswith("conv_in.weight")]
    if len(found) != 1:
        raise ValueError(f"expected one conv_in.weight in the model, found {[n for n, _ in found]}")
    return found[0]


def select_trainable(model: nn.Module, groups: Sequence[str]) -> Trainable:
    """Freeze everything, then unfreeze exactly ``groups`` of a `gen1.unet.VideoUNet` (or "all" of any model).

    - ``all``: every parameter;
    - ``spatial``: the image model's parameters (shared by image and video mode), conv_in included;
    - ``temporal``: the temporal convolutions and transformers;
    - ``conv_in_structure``: the input channels of conv_in that read the depth latent and t_s channels
      (elementwise: a gradient mask keeps conv_in's latent channels fixed).
    """
    unknown = set(groups) - set(TRAINABLE_GROUPS)
    if unknown:
        raise ConfigError(f"unknown trainable groups {sorted(unknown)}; expected some of {TRAINABLE_GROUPS}")
    named = dict(model.named_parameters())
    names_of = {id(p): n for n, p in named.items()}
    chosen: dict[int, nn.Parameter] = {}
    masks: dict[int, torch.Tensor] = {}
    if "all" in groups:
        chosen.update({id(p): p for p in named.values()})
    if "spatial" in groups:
        chosen.update({id(p): p for p in model.spatial_parameters()})
    if "temporal" in groups:
        chosen.update({id(p): p for p in model.temporal_parameters()})
    if "conv_in_structure" in groups:
        _, w = _conv_in_weight(model)
        if id(w) not in chosen:
            if w.shape[1] <= LATENT_CHANNELS:
                raise ValueError(f"conv_in has {w.shape[1]} input channels: no structure channels to train")
            mask = torch.zeros_like(w)
            mask[:, LATENT_CHANNELS:] = 1.0
            masks[id(w)] = mask
            chosen[id(w)] = w
    for p in named.values():
        p.requires_grad_(id(p) in chosen)
    params = [p for p in named.values() if id(p) in chosen]  # model order: deterministic optimizer state
    for p in params:
        if id(p) in masks:
            mask = masks[id(p)]
            p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))
    trainable = Trainable(parameters=params, masks=masks, names=[names_of[id(p)] for p in params])
    log.info(
        "trainable %s: %d tensors, %.2fM of %.2fM parameters%s",
        list(groups),
        len(params),
        sum(p.numel() for p in params) / 1e6,
        sum(p.numel() for p in named.values()) / 1e6,
        " (conv_in: structure channels only)" if masks else "",
    )
    return trainable
