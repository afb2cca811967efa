"""SyncTalk_2D's U-Net generator (``unet_328.py`` ``Model(6, 'ave')``), same module names and shapes (RECIPE §9)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..recipe import BN_EPS, GENERATOR_CHANNELS, GENERATOR_IN_CHANNELS


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project, each with BN (ReLU after the first two)."""

    def __init__(self, inp: int, oup: int, stride: int, use_res_connect: bool, expand_ratio: int = 2):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden, eps=BN_EPS),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden, eps=BN_EPS),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup, eps=BN_EPS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class DoubleConvDW(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.double_conv = nn.Sequential(
            InvertedResidual(in_channels, out_channels, stride, False, 2),
            InvertedResidual(out_channels, out_channels, 1, True, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class InConvDw(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.inconv = nn.Sequential(InvertedResidual(in_channels, out_channels, 1, False, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class Down(nn.Module):
    """Strided DoubleConvDW (the reference calls it maxpool_conv; there is no pooling)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleConvDW(in_channels, out_channels, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Bilinear x2 (align_corners=True), zero-pad to the skip's size, concat [up, skip], DoubleConvDW."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConvDW(in_channels, out_channels, stride=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        diff_y = x2.shape[2] - x1.shape[2]
        diff_x = x2.shape[3] - x1.shape[3]
        if diff_x or diff_y:
            x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x1, x2], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioConvAve(nn.Module):
    """Audio branch for mode "ave": 32x16x16 feature window -> 512x10x10."""

    def __init__(self, ch: tuple[int, ...] = GENERATOR_CHANNELS):
        super().__init__()
        self.conv1 = InvertedResidual(ch[0], ch[1], 1, False, 2)
        self.conv2 = InvertedResidual(ch[1], ch[2], 1, False, 2)
        self.conv3 = nn.Conv2d(ch[2], ch[3], kernel_size=3, padding=1, stride=1)
        self.bn3 = nn.BatchNorm2d(ch[3], eps=BN_EPS)
        self.conv4 = InvertedResidual(ch[3], ch[3], 1, True, 2)
        self.conv5 = nn.Conv2d(ch[3], ch[4], kernel_size=3, padding=3, stride=2)
        self.bn5 = nn.BatchNorm2d(ch[4], eps=BN_EPS)
        self.relu = nn.ReLU()
        self.conv6 = InvertedResidual(ch[4], ch[4], 1, True, 2)
        self.conv7 = InvertedResidual(ch[4], ch[4], 1, True, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = self.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class Generator(nn.Module):
    """``Model(6, 'ave')``: (B,6,320,320) face ROI + masked ROI, (B,32,16,16) audio -> (B,3,320,320) in [0,1], BGR."""

    def __init__(self, n_channels: int = GENERATOR_IN_CHANNELS, mode: str = "ave"):
        super().__init__()
        if mode != "ave":
            raise ValueError(f"generator mode {mode!r} is not supported; only 'ave' is")
        ch = GENERATOR_CHANNELS
        self.audio_model = AudioConvAve(ch)
        self.fuse_conv = nn.Sequential(DoubleConvDW(ch[4] * 2, ch[4], stride=1), DoubleConvDW(ch[4], ch[3], stride=1))
        self.inc = InConvDw(n_channels, ch[0])
        self.down1 = Down(ch[0], ch[0])
        self.down2 = Down(ch[0], ch[1])
        self.down3 = Down(ch[1], ch[2])
        self.down4 = Down(ch[2], ch[3])
        self.down5 = Down(ch[3], ch[4])
        self.up1 = Up(ch[4], ch[3] // 2)
        self.up2 = Up(ch[3], ch[2] // 2)
        self.up3 = Up(ch[2], ch[1] // 2)
        self.up4 = Up(ch[1], ch[0])
        self.up5 = Up(ch[1], ch[0] // 2)
        self.outc = OutConv(ch[0] // 2, 3)

    def forward(self, x: torch.Tensor, audio_feat: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        audio = self.audio_model(audio_feat)
        x6 = self.fuse_conv(torch.cat([x6, audio], dim=1))
        x = self.up1(x6, x5)
        x = self.up2(x, x4)
        x = self.up3(x, x3)
        x = self.up4(x, x2)
        x = self.up5(x, x1)
        return torch.sigmoid(self.outc(x))
