"""The project's PyTorch reference of the original STTN code (written from REFERENCE.md).

It is what parity is judged against: the original models with exactly the original module names
and registration order (so `nn.DataParallel(model).load_state_dict(...)` takes the original
checkpoints and ours), the CUDA extension's ternary activation (as a CPU autograd function),
`util.BinOp`, the distillation loss and the training step of `main.py`. ResNet-50 is a
torchvision-layout model written with plain `torch.nn` (torchvision is not needed).

Deliberately *not* optimised: it mirrors the original's arithmetic (two convolutions per binary
pair, in-place clamp/binarize/restore of the weights, the gradient rule applied to `.grad`).

torch is imported inside functions only; the module classes are built on first use.
"""
from __future__ import annotations

import functools
import types

ARCHS = ("resnet18_bwx2", "resnet18_ter", "resnet50")
# (in, out, stride) of the BasicBlocks features.4 ... features.11.
RESNET18_BLOCKS = ((64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
                   (256, 256, 1), (256, 512, 2), (512, 512, 1))
# main.py defaults.
ADAM_LR = 0.005
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
GRADIENT_CUTOFF = 1.96  # util.BinOp.updateBinaryGradWeight


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


def ternary_activation(x):
    """The CUDA extension's ternary activation on a torch tensor (autograd-aware)."""
    return _classes().TernaryActivationFunction.apply(x)


def resnet18_bwx2(num_classes: int = 1000):
    return _classes().ResNet18STTN(num_classes, ternary=False)


def resnet18_ter(num_classes: int = 1000):
    return _classes().ResNet18STTN(num_classes, ternary=True)


def resnet50(num_classes: int = 1000):
    return _classes().ResNet50(num_classes)


def build(arch: str, num_classes: int = 1000, device=None):
    """The reference nn.Module for `arch` (float32, train mode, PyTorch's default init).

    device="meta" builds it without memory (for its state_dict keys and shapes)."""
    makers = {"resnet18_bwx2": resnet18_bwx2, "resnet18_ter": resnet18_ter, "resnet50": resnet50}
    if arch not in makers:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if device is None:
        return makers[arch](num_classes)
    torch = _classes().torch
    with torch.device(device):
        return makers[arch](num_classes)


def init_like_original(model, generator=None):
    """main.py's student init: every Conv2d/Linear weight ~ Normal(0, std = 1 / fan_in)."""
    c = _classes()
    with c.torch.no_grad():
        for m in model.modules():
            if isinstance(m, (c.nn.Conv2d, c.nn.Linear)):
                fan_in = float(m.weight[0].nelement())
                m.weight.normal_(0.0, 1.0 / fan_in, generator=generator)
    return model


class BinOp:
    """`util.BinOp` of the original, step for step.

    Targets: every Conv2d/Linear in `named_modules()` order except the first one, any inside a
    `branch`, and the last one (fc): for resnet18_bwx2 the 32 block convolutions, consecutive
    targets forming the pairs (convK_1, convK_2).
    """

    def __init__(self, model):
        c = _classes()
        layers = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, (c.nn.Conv2d, c.nn.Linear))]
        bin_range = [i for i, (name, _) in enumerate(layers) if i != 0 and "branch" not in name]
        del bin_range[-1]  # the last layer (fc)
        if len(bin_range) % 2:
            raise ValueError("BinOp needs its target layers in pairs; is this a resnet18_bwx2?")
        self.target_names = [layers[i][0] for i in bin_range]
        self.target_modules = [layers[i][1].weight for i in bin_range]
        self.saved_params = [w.detach().clone() for w in self.target_modules]
        self.num_of_params = len(self.target_modules)

    def binarization(self):
        self.clampConvParams()
        self.save_params()
        self.binarizeConvParams()

    def clampConvParams(self):
        for w in self.target_modules:
            w.data.clamp_(-1.0, 1.0)

    def save_params(self):
        for saved, w in zip(self.saved_params, self.target_modules):
            saved.copy_(w.data)

    def binarizeConvParams(self):
        m_pair = None
        for index, w in enumerate(self.target_modules):
            n = w.data[0].nelement()
            s = w.data.size()
            if index % 2 == 0:
                other = self.target_modules[index + 1].data
                if len(s) == 4:  # (|W1|_1 + |W2|_1) / (2n) per output channel, the original's order
                    m = (w.data.norm(1, 3, keepdim=True) + other.norm(1, 3, keepdim=True)) \
                        .sum(2, keepdim=True).sum(1, keepdim=True).div(2 * n)
                else:
                    m = (w.data.norm(1, 1, keepdim=True) + other.norm(1, 1, keepdim=True)).div(2 * n)
                m_pair = m
            else:
                m = m_pair
            w.data.sign_().mul_(m.expand(s))

    def restore(self):
        for saved, w in zip(self.saved_params, self.target_modules):
            w.data.copy_(saved)

    def updateBinaryGradWeight(self):
        for w in self.target_modules:
            weight = w.data
            n = weight[0].nelement()
            s = weight.size()
            m_add = weight.sign().mul(w.grad.data)
            if len(s) == 4:
                m_add = m_add.sum(3, keepdim=True).sum(2, keepdim=True).sum(1, keepdim=True) \
                    .div(n).expand(s)
            else:
                m_add = m_add.sum(1, keepdim=True).div(n).expand(s)
            m_add = m_add.mul(weight.sign())
            m = w.grad.data
            m[weight.lt(-GRADIENT_CUTOFF) | weight.gt(GRADIENT_CUTOFF)] = 0
            w.grad.data = m.add(m_add)


def distillation_loss(teacher_logits, student_logits):
    """util.TS_Loss(..., 'mean'): mean over the batch of -sum(softmax(teacher) * log_softmax(student))."""
    c = _classes()
    if teacher_logits.requires_grad:
        raise ValueError("teacher logits must not require gradients")
    t = c.F.softmax(teacher_logits, dim=1).unsqueeze(1)
    s = c.F.log_softmax(student_logits, dim=1).unsqueeze(2)
    return (-c.torch.bmm(t, s)).mean()


def make_optimizer(model, lr: float = ADAM_LR):
    """main.py's optimizer: Adam over all parameters, betas (0.9, 0.999), eps 1e-8, no decay."""
    torch = _classes().torch
    return torch.optim.Adam(model.parameters(), lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0)


def reference_train_step(model, optimizer, binop, images, teacher_logits):
    """One step of main.py's `train()`: clamp + binarize, forward in train mode, distillation loss
    against `teacher_logits`, backward, restore, gradient rule, optimizer step.

    `binop` may be None (a model without binary pairs, e.g. resnet18_ter: plain gradients).
    Returns (loss: float, gradients: {name: tensor} after the rule, before the step; names as in
    `model.named_parameters()`).
    """
    model.train()
    if binop is not None:
        binop.binarization()
    student_logits = model(images)
    loss = distillation_loss(teacher_logits.detach(), student_logits)
    optimizer.zero_grad()
    loss.backward()
    if binop is not None:
        binop.restore()
        binop.updateBinaryGradWeight()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return float(loss.item()), grads


def evaluate(model, images, binop=None):
    """main.py's `validate()` on one batch: eval mode, binarize (clamp first) before, restore after."""
    torch = _classes().torch
    model.eval()
    if binop is not None:
        binop.binarization()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        if binop is not None:
            binop.restore()
