"""Differentiable augmentation for data-efficient GAN training (DiffAugment, Zhao et al., NeurIPS 2020).

With ~1,100 training images a critic memorises the real set within a few hundred steps, and its gradients then
stop telling the generator anything useful. DiffAugment shows the critic only augmented images, real and fake
alike, each with its own random draw, and the augmentation is made of differentiable tensor operations so the
generator's gradient passes through it: the generator is never pushed to draw the augmentations themselves
(augmenting the real images alone would teach it to draw cut-out squares).

The operations are the paper's (``color,translation,cutout``) for 1-channel images in [-1, 1] (saturation has
no meaning in grey, so "color" is brightness and contrast), applied in the order the policy lists them.
Translation and cutout fill with -1, the black that surrounds an ultrasound sector, rather than the paper's 0
(mid-grey here); colour operations listed after them shift and scale the fill too (``experiment=gan_cpu``
lists ``translation, cutout, color``), the same for real and fake.
"""

from collections.abc import Callable, Sequence

import torch

# Strengths as in the paper: brightness ± 0.5 of the [-1, 1] range's half, contrast x0.5-1.5, translation up
# to 1/8 of the side, a cutout square half the side.
BRIGHTNESS = 0.5
CONTRAST = (0.5, 1.5)
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5
BACKGROUND = -1.0


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Add one random offset per image, uniform in ±``BRIGHTNESS``."""
    return x + (torch.rand(len(x), 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5) * (2 * BRIGHTNESS)


def contrast(x: torch.Tensor) -> torch.Tensor:
    """Scale each image's deviations from its own mean by a random factor in ``CONTRAST``."""
    low, high = CONTRAST
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    factor = torch.rand(len(x), 1, 1, 1, device=x.device, dtype=x.dtype) * (high - low) + low
    return (x - mean) * factor + mean


def translation(x: torch.Tensor) -> torch.Tensor:
    """Shift each image by a random whole number of pixels (up to ``TRANSLATION_RATIO`` of its side), filling
    with background. A gather from a padded copy: gradients flow to every pixel that stays in view."""
    n, _, height, width = x.shape
    shift_y = int(height * TRANSLATION_RATIO + 0.5)
    shift_x = int(width * TRANSLATION_RATIO + 0.5)
    dy = torch.randint(-shift_y, shift_y + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-shift_x, shift_x + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(height, device=x.device).view(1, -1, 1) + dy + shift_y  # index into the padded image
    cols = torch.arange(width, device=x.device).view(1, 1, -1) + dx + shift_x
    padded = torch.nn.functional.pad(x, (shift_x, shift_x, shift_y, shift_y), value=BACKGROUND)
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor) -> torch.Tensor:
    """Blank one random square per image (side ``CUTOUT_RATIO`` of the image, clipped at the border)."""
    n, _, height, width = x.shape
    size_y, size_x = int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)
    top = torch.randint(0, height + (1 - size_y % 2), (n, 1, 1), device=x.device) - size_y // 2
    left = torch.randint(0, width + (1 - size_x % 2), (n, 1, 1), device=x.device) - size_x // 2
    rows = torch.arange(height, device=x.device).view(1, -1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, -1)
    hole = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
    return torch.where(hole.unsqueeze(1), torch.full_like(x, BACKGROUND), x)


OPERATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "brightness": brightness,
    "contrast": contrast,
    "translation": translation,
    "cutout": cutout,
}
ALIASES = {"color": ("brightness", "contrast")}  # the paper's name for its colour operations


def resolve_policy(policy: Sequence[str] | str | None) -> tuple[str, ...]:
    """``model.diffaugment`` as the operations to apply, in order: a list or a comma-separated string; empty or
    null is off. An unknown name is an error listing the valid ones."""
    if policy is None:
        return ()
    names = policy.split(",") if isinstance(policy, str) else list(policy)
    resolved: list[str] = []
    for name in (str(n).strip() for n in names):
        if not name:
            continue
        if name in ALIASES:
            resolved += ALIASES[name]
        elif name in OPERATIONS:
            resolved.append(name)
        else:
            valid = ", ".join([*OPERATIONS, *ALIASES])
            raise ValueError(f"model.diffaugment: unknown operation {name!r}; choose from {valid}")
    return tuple(resolved)


class DiffAugment(torch.nn.Module):
    """Apply the policy's operations, each with its own random draw per image; identity when the policy is empty."""

    def __init__(self, policy: Sequence[str] | str | None = ()):
        super().__init__()
        self.policy = resolve_policy(policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.policy:
            x = OPERATIONS[name](x)
        return x.contiguous() if self.policy else x

    def extra_repr(self) -> str:
        return ",".join(self.policy) or "off"
