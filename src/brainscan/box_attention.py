"""Box attention: a train-time loss that teaches a classifier where to look, from tumour boxes.

For a slice with a tumour box, the class activation map of its true class (CAM, Zhou et al. 2016: the classifier's
weights over the last feature map, which for a pooled linear head is exactly what the logit averages) is turned into
a distribution over positions by a softmax, and the loss is its cross-entropy against the box's share of each
position. A model whose evidence for "glioma" lies on the skull or the image border pays for it; slices without a
box (no tumour, or no box given) add nothing. Nothing changes at prediction time: the model and its exports are as
without it. No maintained library offers this (pytorch-grad-cam computes maps, not differentiable losses on them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BrainscanError
from .models import ModelSpec


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``boxes`` N×4 (``x0, y0, x1, y1`` in pixels of a ``size``-px slice; NaN: none) → N×1×S×S float masks, 1 on
    the pixels whose centres lie in the box (:func:`brainscan.explain.box_mask`'s rule), all 0 without a box."""
    centres = torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1) for i in range(4))  # NaN compares False: an empty mask
    cols = (centres >= x0) & (centres <= x1)
    rows = (centres >= y0) & (centres <= y1)
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1).float()


class BoxAttention:
    """Scores the last feature map of each forward pass made inside :meth:`watching` (a hook on the spec's last CAM
    layer) against box masks with :meth:`loss`; ``weight`` scales the term."""

    def __init__(self, model: nn.Module, spec: ModelSpec, weight: float) -> None:
        self.weight = weight
        self.classifier = model.get_submodule(spec.classifier)
        layer = model.get_submodule(spec.cam_layers[0])
        channels = _out_channels(layer)
        if not isinstance(self.classifier, nn.Linear) or channels != self.classifier.in_features:
            raise BrainscanError(
                f"--box-loss needs a model whose classifier is one linear layer over the pooled last feature map; "
                f"{spec.name}'s {spec.cam_layers[0]} gives {channels} channels and its {spec.classifier} is "
                f"{type(self.classifier).__name__}."
            )
        self.layer = layer
        self.features: torch.Tensor | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Keep the feature maps of the forward passes made inside (training passes; never exports or validation)."""

        def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            self.features = output

        hook = self.layer.register_forward_hook(keep)
        try:
            yield
        finally:
            hook.remove()
            self.features = None

    def loss(self, masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``weight`` × the mean over the last forward pass's images of the cross-entropy between each boxed image's
        box (``masks``: N×1×H×W at any size) and the softmax of its true class's activation map (0 for no box)."""
        if self.features is None:
            raise RuntimeError("BoxAttention.loss before a forward pass")
        features, self.features = self.features.float(), None
        boxed = masks.flatten(1).amax(1) > 0
        if not boxed.any():
            return features.new_zeros(())
        cams = torch.einsum("nk,nkhw->nhw", self.classifier.weight[targets[boxed]].float(), features[boxed])
        share = F.adaptive_avg_pool2d(masks[boxed].float(), cams.shape[-2:]).flatten(1)
        share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
        entropy = -(share * F.log_softmax(cams.flatten(1), dim=1)).sum(1)
        return self.weight * entropy.sum() / len(masks)


def _out_channels(layer: nn.Module) -> int | None:
    """Channels a layer's output has: its last convolution's or BatchNorm's (None when it has neither)."""
    found = None
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            found = module.out_channels
        elif isinstance(module, nn.BatchNorm2d):
            found = module.num_features
    return found
