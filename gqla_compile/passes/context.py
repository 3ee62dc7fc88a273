"""The explicit per-layer context the passes share besides the graph.

Layers of one structure share one captured graph module (capture.py), so nothing layer-specific may live
on the graph: each layer gets its own :class:`LayerContext` (its capture, its own parameters, detection's
complete result) and every pass of that layer is constructed with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture import CapturedAttention
from .match import Detection, LatentAttentionMatch


@dataclass
class LayerContext:
    """One attention layer on its way through the passes."""

    capture: CapturedAttention
    parameters: dict[str, torch.Tensor]  # the layer's own parameters and buffers, detached
    detection: Detection | None = None  # set by the detect pass

    @classmethod
    def of(cls, module: nn.Module, capture: CapturedAttention) -> "LayerContext":
        parameters = {**{n: p.detach() for n, p in module.named_parameters()}, **dict(module.named_buffers())}
        return cls(capture, parameters)

    @property
    def module_path(self) -> str:
        return self.capture.module_path

    @property
    def match(self) -> LatentAttentionMatch:
        """The complete match (n_g probed); only for layers detection matched."""
        if self.detection is None or self.detection.match is None:
            raise RuntimeError(f"{self.module_path}: no latent-attention match (run the detect pass first)")
        return self.detection.match
