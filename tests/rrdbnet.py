"""ESRGAN's RRDBNet (Wang et al. 2018), small enough for tests: the architecture of
RealESRGAN_x4plus with fewer blocks and channels, random weights, built offline. The
module names follow Real-ESRGAN's, so a saved state dict is an ESRGAN-family .pth."""

from __future__ import annotations

import torch
from torch import nn

OUTPUT_GAIN = 40.0


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        for i in range(5):
            setattr(self, f"conv{i + 1}",
                    nn.Conv2d(features + i * growth, growth if i < 4 else features, 3, 1, 1))
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(5):
            out = getattr(self, f"conv{i + 1}")(torch.cat(features, 1))
            if i < 4:
                features.append(self.lrelu(out))
        return x + 0.2 * out


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """4× super-resolution: features → RRDB trunk → two nearest-neighbour ×2 stages."""

    scale = 4

    def __init__(self, blocks: int = 1, features: int = 8, growth: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_first = nn.Conv2d(3, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, 3, 3, 1, 1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        up = nn.functional.interpolate
        feat = self.act(self.conv_up1(up(feat, scale_factor=2, mode="nearest")))
        feat = self.act(self.conv_up2(up(feat, scale_factor=2, mode="nearest")))
        # Random weights give outputs near zero (σ ≈ 0.03): a fixed gain and a sigmoid
        # spread them over [0, 1], so PSNR measures differences on a real pixel range.
        return torch.sigmoid(OUTPUT_GAIN * self.conv_last(self.act(self.conv_hr(feat))))
