"""IResNet (Duta et al. improved residual networks, as used for ArcFace).

Parameter names and shapes follow insightface's arcface_torch `iresnet.py`, so its released
IResNet state dicts load with `load_state_dict` (fine-tuning from published backbones).
Input: aligned 112x112 RGB, normalised to [-1, 1]. Output: the `num_features`-d embedding
after the BN-Dropout-FC-BN head (not yet L2-normalised).
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

# Blocks per stage, as arcface_torch's iresnet.py and iresnet2060.py define them.
LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
          "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6), "iresnet2060": (3, 128, 896, 3)}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    def __init__(self, layers=(3, 4, 14, 3), num_features: int = 512, dropout: float = 0.0,
                 widths=(64, 128, 256, 512), input_size: int = 112, stem_stride: int = 1,
                 checkpoint_segments=(0, 0, 0, 0)):
        super().__init__()
        # Per stage, 0 or the number of segments whose activations are recomputed in the
        # backward pass when training (memory for time; arcface_torch's r2060 uses 20 and 100
        # for its 128- and 896-block stages).
        self.checkpoint_segments = tuple(checkpoint_segments)
        self.inplanes = widths[0]
        # stem_stride 1 is insightface's design; 2 (as MobileFaceNet's stem) quarters the cost of
        # the full-resolution maps, which dominate a narrow network's time on CPUs.
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        side = -(-input_size // stem_stride)
        for _ in range(4):  # four stride-2 stages: 112 -> 7 (56 -> 4 after a stride-2 stem)
            side = -(-side // 2)
        self.fc = nn.Linear(widths[3] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # As in the reference: the final BN's scale is fixed at 1, only its shift learns.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage, segments in zip((self.layer1, self.layer2, self.layer3, self.layer4), self.checkpoint_segments):
            if segments and self.training:
                x = checkpoint_sequential(stage, segments, x, use_reentrant=False)
            else:
                x = stage(x)
        x = self.bn2(x).flatten(1)
        x = self.fc(self.dropout(x))
        return self.features(x)
