"""The LLaVA families' torch half: vision and projector export wrappers (imported by ``export_specs`` only).
The text side reuses ``qwen2_vl_torch``'s embed and decoder wrappers (a plain decoder with 1-D positions
is what they run when ``position_ids`` is [B, S])."""
from __future__ import annotations

import torch
from torch import nn


class LlavaVisionWrapper(nn.Module):
    """pixel_values [N, 3, S, S] -> embeddings (-> CLIP's pre-layernorm) -> encoder layers up to the last selected
    hidden state -> the selected hidden states concatenated [N, P, vision_hidden * len(layers)] (CLS row dropped
    with ``drop_cls``)."""

    def __init__(self, vision_model, layers: list[int], drop_cls: bool):
        super().__init__()
        self.vision_model = vision_model
        self.layers = list(layers)
        self.drop_cls = bool(drop_cls)

    def forward(self, pixel_values):
        vm = self.vision_model
        h = vm.embeddings(pixel_values)
        if getattr(vm, "pre_layrnorm", None) is not None:
            h = vm.pre_layrnorm(h)
        states = [h]
        for layer in vm.encoder.layers[: max(self.layers)]:
            h = layer(h, None)
            states.append(h)
        feats = torch.cat([states[i] for i in self.layers], dim=-1)
        return feats[:, 1:] if self.drop_cls else feats


class LlavaProjectorWrapper(nn.Module):
    """features [N, P, D] -> image_embeds [N * P, hidden], followed by ``image_newline`` as one more row where the
    model has one (LLaVA-NeXT / OneVision: the family's numpy ``pack_image_features`` takes it from there)."""

    def __init__(self, projector, image_newline=None):
        super().__init__()
        self.projector = projector
        self.image_newline = image_newline

    def forward(self, features):
        x = self.projector(features)
        x = x.reshape(-1, x.shape[-1])
        if self.image_newline is None:
            return x
        return torch.cat([x, self.image_newline.to(x.dtype)[None]], dim=0)
