"""The PyTorch reference that parity is judged against: the original's models, `util.BinOp` and
validate step, mirroring its arithmetic (two convolutions per pair, in-place binarize/restore)."""

from sttn_jax.interop.reference_modules import _classes  # noqa: F401 - also for tests

GRADIENT_CUTOFF = 1.96  # util.BinOp.updateBinaryGradWeight


def ternary_activation(x):
    """The CUDA extension's ternary activation on a torch tensor (autograd-aware)."""
    return _classes().TernaryActivationFunction.apply(x)


def build(arch: str, num_classes: int = 1000, device=None):
    """The reference nn.Module for `arch` (float32, train mode, PyTorch's default init);
    device="meta": without memory (for its state_dict keys and shapes)."""
    c = _classes()
    makers = {"resnet18_bwx2": lambda: c.ResNet18STTN(num_classes, ternary=False),
              "resnet18_ter": lambda: c.ResNet18STTN(num_classes, ternary=True),
              "resnet50": lambda: c.ResNet50(num_classes)}
    if arch not in makers:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(makers)}")
    with c.torch.device(device or "cpu"):
        return makers[arch]()


class BinOp:
    """`util.BinOp` of the original, step for step: every Conv2d/Linear but the first, the
    `branch` ones and fc; for resnet18_bwx2 the 32 block convolutions, in pairs."""

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
        for index, w in enumerate(self.target_modules):
            n = w.data[0].nelement()
            s = w.data.size()
            if index % 2 == 0:  # the pair's m, computed before either member is binarized
                other = self.target_modules[index + 1].data
                if len(s) == 4:  # (|W1|_1 + |W2|_1) / (2n) per output channel, the original's order
                    m = (w.data.norm(1, 3, keepdim=True) + other.norm(1, 3, keepdim=True)) \
                        .sum(2, keepdim=True).sum(1, keepdim=True).div(2 * n)
                else:
                    m = (w.data.norm(1, 1, keepdim=True) + other.norm(1, 1, keepdim=True)).div(2 * n)
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


def evaluate(model, images, binop=None):
    """main.py's `validate()` on one batch: eval mode, clamped and binarized while it runs."""
    model.eval()
    if binop is not None:
        binop.binarization()
    try:
        with _classes().torch.no_grad():
            return model(images)
    finally:
        if binop is not None:
            binop.restore()
