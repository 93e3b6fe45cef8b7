"""Grad-CAM (Selvaraju et al., 2017): where in the image the predicted class's evidence lies.

Works for every net here: each has ``forward_features`` (the last convolutional maps) and
``forward_head`` (timm's convention, copied by SmallCNN). Gradients are taken with
``torch.autograd.grad`` on the features only: no hooks, no parameter gradients, safe to call from
several threads at once.
"""

import numpy as np
import torch
import torch.nn.functional as F


def grad_cam(net: torch.nn.Module, image: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, int]:
    """``image``: 1xCxHxW. Returns the heatmap (HxW in [0, 1]) and the class it explains."""
    net.eval()
    with torch.enable_grad():
        features = net.forward_features(image)
        logits = net.forward_head(features)
        target = int(logits.argmax(dim=1)) if target is None else target
        (gradient,) = torch.autograd.grad(logits[0, target], features)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return (cam / cam.max() if cam.max() > 0 else cam).cpu().numpy(), target


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, max_side: int = 512) -> np.ndarray:
    """The heatmap in colour over the grey image, as HxWx3 uint8 (at most ``max_side`` pixels a side)."""
    import cv2
    from matplotlib import colormaps

    scale = min(1.0, max_side / max(gray.shape))
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    base = cv2.resize(gray, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    heat = cv2.resize(heatmap.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    coloured = colormaps["jet"](heat)[..., :3]
    blended = (1 - alpha) * np.repeat(base[..., None], 3, axis=2) + alpha * coloured
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)
