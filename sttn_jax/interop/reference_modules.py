"""The original's models as PyTorch modules, for `interop.reference` (its module names and
registration order, so its checkpoints load), and torchvision's ResNet-50; torch on first use."""

import functools
import types

from sttn_jax.archs import RESNET18_BLOCKS


@functools.lru_cache(maxsize=None)
def _classes():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F  # noqa: F401 - returned below, in locals()

    class TernaryActivationFunction(torch.autograd.Function):
        """The CUDA extension `TerActivateFunc`: forward x < -0.5 -> -1, x < 0.5 -> 0, else +1
        (NaN -> +1); backward passes the gradient where -1 <= x <= 1 (NaN passes too)."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            out = torch.where(x < 0.5, torch.zeros_like(x), torch.ones_like(x))
            return torch.where(x < -0.5, -torch.ones_like(x), out)

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            return grad_output.masked_fill((x > 1.0) | (x < -1.0), 0.0)

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
            # bn1, ba1, prelu1, conv1 (or conv1_1, conv1_2), bn_add1, then the same with 2.
            for i, cin, s in ((1, in_ch, stride), (2, out_ch, 1)):
                setattr(self, f"bn{i}", nn.BatchNorm2d(cin))
                setattr(self, f"ba{i}", TernaryActivation())
                setattr(self, f"prelu{i}", nn.PReLU(out_ch))
                for name in [f"conv{i}"] if ternary else [f"conv{i}_1", f"conv{i}_2"]:
                    setattr(self, name, nn.Conv2d(cin, out_ch, 3, s, 1))
                setattr(self, f"bn_add{i}", nn.BatchNorm2d(out_ch))
            if stride == 2:
                self.branch = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2))

        def _conv(self, i, x):
            if self.ternary:
                return getattr(self, f"conv{i}")(x)
            return getattr(self, f"conv{i}_1")(x) + getattr(self, f"conv{i}_2")(x)

        def forward(self, x):
            out = self.ba1(self.bn1(x))
            short_cut = x
            if self.stride == 2:
                short_cut = self.branch(x)
                short_cut = torch.cat([short_cut, short_cut.mul(0.0)], 1)
            out = self.prelu1(self.bn_add1(self._conv(1, out)) + short_cut)
            return self.prelu2(self.bn_add2(self._conv(2, self.ba2(self.bn2(out)))) + out)

    class ResNet18STTN(nn.Module):
        """`ResNet18_BNN` of model_list/resnet18_{bwx2,ter}.py. AdaptiveAvgPool2d(1) replaces
        AvgPool2d(7) (identical at 224x224, and it also takes smaller test images)."""

        def __init__(self, num_classes=1000, ternary=False):
            super().__init__()
            # The blocks first, as in the original (the order the default init draws numbers).
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
        """torchvision's Bottleneck (v1.5: stride on the 3x3 conv), expansion 4."""

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
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet50(nn.Module):
        """torchvision.models.resnet50's module tree and state_dict keys."""

        def __init__(self, num_classes=1000, layers=(3, 4, 6, 3)):
            super().__init__()
            self.in_planes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
                setattr(self, f"layer{i + 1}", self._make_layer(planes, blocks, 2 if i else 1))
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
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return types.SimpleNamespace(**locals())  # torch, nn, F and the classes above
