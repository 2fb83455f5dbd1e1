"""The original's model files as PyTorch modules, for `interop.reference`: `ResNet18_BNN` of its
resnet18_bwx2 / resnet18_ter (the module names and registration order of the original, so its
checkpoints load), the CUDA extension's ternary activation as an autograd function, and
torchvision's ResNet-50 in plain `torch.nn`. Built on first use (torch is imported then)."""
from __future__ import annotations

import functools
import types

# (in, out, stride) of the BasicBlocks features.4 ... features.11.
RESNET18_BLOCKS = ((64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
                   (256, 256, 1), (256, 512, 2), (512, 512, 1))


@functools.lru_cache(maxsize=None)
def _classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class TernaryActivationFunction(torch.autograd.Function):
        """The CUDA extension `TerActivateFunc`: forward x < -0.5 -> -1, x < 0.5 -> 0, else +1
        (NaN -> +1); backward passes the gradient where -1 <= x <= 1 (NaN passes too)."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            out = torch.ones_like(x)
            out = torch.where(x < 0.5, torch.zeros_like(x), out)
            return torch.where(x < -0.5, -torch.ones_like(x), out)

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            grad = grad_output.clone()
            grad[(x > 1.0) | (x < -1.0)] = 0.0
            return grad

    class TernaryActivation(nn.Module):
        """`SymmTerActive_cuda` of the original (no parameters)."""

        def forward(self, x):
            return TernaryActivationFunction.apply(x)

    class BasicBlock(nn.Module):
        """The original's Bi-Real-style block; `ternary=True` is resnet18_ter's (one conv)."""

        def __init__(self, in_ch, out_ch, stride, ternary=False):
            super().__init__()
            self.stride = stride
            self.ternary = ternary
            self.bn1 = nn.BatchNorm2d(in_ch)
            self.ba1 = TernaryActivation()
            self.prelu1 = nn.PReLU(out_ch)
            if ternary:
                self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1)
            else:
                self.conv1_1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1)
                self.conv1_2 = nn.Conv2d(in_ch, out_ch, 3, stride, 1)
            self.bn_add1 = nn.BatchNorm2d(out_ch)
            self.bn2 = nn.BatchNorm2d(out_ch)
            self.ba2 = TernaryActivation()
            self.prelu2 = nn.PReLU(out_ch)
            if ternary:
                self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
            else:
                self.conv2_1 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
                self.conv2_2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
            self.bn_add2 = nn.BatchNorm2d(out_ch)
            if stride == 2:
                self.branch = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))

        def forward(self, x):
            out = self.ba1(self.bn1(x))
            if self.stride == 2:
                short_cut = self.branch(x)
                short_cut = torch.cat([short_cut, short_cut.mul(0.0)], 1)
            else:
                short_cut = x
            if self.ternary:
                out = self.conv1(out)
            else:
                out = self.conv1_1(out) + self.conv1_2(out)
            out = self.bn_add1(out)
            out = out + short_cut
            out = self.prelu1(out)
            add = out
            out = self.ba2(self.bn2(out))
            if self.ternary:
                out = self.conv2(out)
            else:
                out = self.conv2_1(out) + self.conv2_2(out)
            out = self.bn_add2(out)
            out = out + add
            return self.prelu2(out)

    class ResNet18STTN(nn.Module):
        """`ResNet18_BNN` of model_list/resnet18_{bwx2,ter}.py. AdaptiveAvgPool2d(1) replaces
        AvgPool2d(7) (identical at 224x224, and it also takes smaller test images)."""

        def __init__(self, num_classes=1000, ternary=False):
            super().__init__()
            blocks = [BasicBlock(i, o, s, ternary) for i, o, s in RESNET18_BLOCKS]
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.PReLU(64),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                *blocks)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.fc(x.view(x.size(0), -1))

    class Bottleneck(nn.Module):
        """torchvision's Bottleneck (v1.5: stride on the 3x3 conv)."""
        expansion = 4

        def __init__(self, in_planes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    class ResNet50(nn.Module):
        """torchvision.models.resnet50's module tree and state_dict keys."""

        def __init__(self, num_classes=1000, layers=(3, 4, 6, 3)):
            super().__init__()
            self.in_planes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, layers[0], 1)
            self.layer2 = self._make_layer(128, layers[1], 2)
            self.layer3 = self._make_layer(256, layers[2], 2)
            self.layer4 = self._make_layer(512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * 4, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def _make_layer(self, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.in_planes != planes * 4:
                downsample = nn.Sequential(
                    nn.Conv2d(self.in_planes, planes * 4, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(self.in_planes, planes, stride, downsample)]
            self.in_planes = planes * 4
            layers += [Bottleneck(self.in_planes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = torch.flatten(self.avgpool(x), 1)
            return self.fc(x)

    return types.SimpleNamespace(
        torch=torch, nn=nn, F=F, TernaryActivationFunction=TernaryActivationFunction,
        TernaryActivation=TernaryActivation, BasicBlock=BasicBlock, ResNet18STTN=ResNet18STTN,
        Bottleneck=Bottleneck, ResNet50=ResNet50)
