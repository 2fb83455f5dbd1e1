"""main.py's training, in PyTorch, for the parity tests: the student init, the distillation loss
(util.TS_Loss), the optimizer and one step of `train()`, on the reference models and `util.BinOp`
of `sttn_jax.interop.reference` (which the library keeps for its evaluation parity)."""
from sttn_jax.interop.reference_modules import _classes


def init_like_original(model, generator=None):
    """main.py's student init: every Conv2d/Linear weight ~ Normal(0, std = 1 / fan_in)."""
    c = _classes()
    with c.torch.no_grad():
        for m in model.modules():
            if isinstance(m, (c.nn.Conv2d, c.nn.Linear)):
                m.weight.normal_(0.0, 1.0 / float(m.weight[0].nelement()), generator=generator)
    return model



def distillation_loss(teacher_logits, student_logits):
    """util.TS_Loss(..., 'mean'): batch mean of -sum(softmax(teacher) * log_softmax(student))."""
    c = _classes()
    if teacher_logits.requires_grad:
        raise ValueError("teacher logits must not require gradients")
    t = c.F.softmax(teacher_logits, dim=1).unsqueeze(1)
    s = c.F.log_softmax(student_logits, dim=1).unsqueeze(2)
    return (-c.torch.bmm(t, s)).mean()


def make_optimizer(model, lr: float = 0.005):
    """main.py's optimizer: Adam over all parameters, its default lr, betas, eps, no decay."""
    return _classes().torch.optim.Adam(model.parameters(), lr, betas=(0.9, 0.999), eps=1e-8,
                                       weight_decay=0)


def reference_train_step(model, optimizer, binop, images, teacher_logits):
    """One step of main.py's `train()`: clamp + binarize, forward in train mode, distillation loss
    against `teacher_logits`, backward, restore, gradient rule, optimizer step (`binop` None: a
    model without pairs). Returns (loss, {parameter name: gradient after the rule})."""
    model.train()
    if binop is not None:
        binop.binarization()
    loss = distillation_loss(teacher_logits.detach(), model(images))
    optimizer.zero_grad()
    loss.backward()
    if binop is not None:
        binop.restore()
        binop.updateBinaryGradWeight()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return float(loss.item()), grads
