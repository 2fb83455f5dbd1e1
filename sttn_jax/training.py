"""The pieces of one training step: the state, the optimizer, the train step and the eval step
(in the shape of Flax's examples/imagenet); `sttn_jax.train_loop.train_and_evaluate` runs them for a
whole training run, and train.py is its command line.

A training step is the original algorithm (docs/original.md, "Weight binarization"): clamp the
latent kernels to [-1, 1] (persistently), run teacher and student, take the gradient of the
distillation loss through the folded convolutions (`ops.fold_binary_pair` applies the original
gradient rule), average it over the data axis, let Adam update the latent weights. `shard_map` over
the mesh axis "data" (every device of every process) replicates parameters and splits batches;
BatchNorm statistics are synchronised over it with config.sync_batch_stats, else each device
normalises its own shard (as the original's DataParallel)."""
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ops
from sttn_jax import archs, gradient_layout, models, processes
from sttn_jax.errors import ConfigError

DATA_AXIS = "data"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
REMAT = ("auto", "on", "off")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed as one tree)."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh "data" over all devices of all processes."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """A global jax.Array split over the data axis from this process's part of the batch."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def check_model_config(config) -> None:
    """What training and evaluation share: the dtype, the activation's backend, the stem's form,
    the image and resize sizes."""
    if config.dtype not in DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r}: choose one of {sorted(DTYPES)}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("config.dtype='float64' needs JAX_ENABLE_X64=1 in the environment")
    if problem := ops.ternary.backend_problem(config.act_backend):
        raise ConfigError(f"config.act_backend={config.act_backend!r}: {problem}")
    if problem := archs.stem_conv_problem(config.stem_conv):
        raise ConfigError(f"config.stem_conv={config.stem_conv!r}: {problem}")
    if problem := archs.image_size_problem(config.image_size, config.arch):
        raise ConfigError(f"config.image_size={config.image_size}: {problem} "
                          "(--config.image_size=...)")
    if config.resize_size < config.image_size:
        raise ConfigError(f"config.resize_size={config.resize_size} is below image_size="
                          f"{config.image_size}; the crop must fit: use resize_size >= image_size")


def use_remat(config) -> bool:
    """config.remat resolved for this backend. "auto" is off on the CPU: XLA's CPU compiler drops
    jax.checkpoint's optimisation barriers before its CSE pass, which merges the recomputation
    back into the forward pass (measured: no memory saved), while a GPU's keeps them until after
    scheduling."""
    if config.remat not in REMAT:
        raise ConfigError(f"config.remat={config.remat!r}: choose one of {', '.join(REMAT)}")
    return config.remat == "on" or (config.remat == "auto" and jax.default_backend() != "cpu")


def check_batch(config, key: str, num_devices: int) -> None:
    value = config[key]
    if value <= 0:
        raise ConfigError(f"config.{key}={value} must be positive")
    if value % num_devices:
        raise ConfigError(f"{key}={value} is not divisible by the {num_devices} devices; use a "
                          f"multiple of {num_devices}, e.g. --config.{key}="
                          f"{max(num_devices, value // num_devices * num_devices)}")


def check_config(config, num_devices: int) -> None:
    """Refuses a training config that cannot work, each problem in one line naming the fix."""
    if config.arch not in archs.TRAINABLE:
        raise ConfigError(f"config.arch={config.arch!r}: train.py trains {archs.BWX2!r} (or "
                          f"{archs.TERNARY!r} as a plain network); set --config.arch={archs.BWX2}")
    check_model_config(config)
    use_remat(config)
    for key in ("batch_size", "eval_batch_size"):
        check_batch(config, key, num_devices)
    if config.num_epochs <= 0 and config.num_train_steps <= 0:
        raise ConfigError("set config.num_epochs or config.num_train_steps to a positive number")
    if config.checkpoint_every_steps <= 0:
        raise ConfigError("config.checkpoint_every_steps must be positive")


def learning_rate_fn(config, steps_per_epoch: int) -> Callable:
    """The original schedule: lr = 0.5 * base * (1 + cos(pi * epoch / epochs)), set per epoch."""
    def schedule(step):
        epoch = jnp.floor_divide(step, steps_per_epoch)
        return 0.5 * config.learning_rate * (1 + jnp.cos(jnp.pi * epoch / config.num_epochs))
    return schedule


def create_optimizer(config, learning_rate: Callable) -> optax.GradientTransformation:
    """Adam (the original: lr 0.005, betas 0.9/0.999, eps 1e-8, no weight decay)."""
    tx = optax.adam(learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    if config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


def _state(config, variables, tx) -> TrainState:
    if config.dtype == "float64":  # a parity run must not round its state to float32 every step
        variables = jax.tree_util.tree_map(
            lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, variables)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


def create_train_state(config, mesh: Mesh, tx, rng=None, variables=None) -> TrainState:
    """A fresh state on the mesh, from (a copy of: steps donate it) `variables` or from `rng`."""
    if variables is None:
        module = models.create(config.arch, config.num_classes)
        variables = models.init_variables(module, rng)
    variables = jax.tree_util.tree_map(jnp.array, dict(variables))
    return jax.device_put(_state(config, variables, tx), replicated(mesh))


def abstract_train_state(config, mesh: Mesh, tx) -> TrainState:
    """Shapes, dtypes and shardings of a state: to restore a checkpoint, and its size on disk."""
    module = models.create(config.arch, config.num_classes)
    shapes = jax.eval_shape(lambda: _state(config, models.init_variables(
        module, jax.random.PRNGKey(0)), tx))
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), shapes)


def eval_variables(state: TrainState) -> dict:
    """The variables a trained state evaluates with (latent kernels clamped, as the original)."""
    return {"params": ops.clamp_latent_kernels(state.params), "batch_stats": state.batch_stats}


def distillation_loss(student_logits, teacher_logits):
    """Mean over the batch of -sum(softmax(teacher) * log_softmax(student)) (the original TS_Loss)."""
    dtype = jnp.promote_types(teacher_logits.dtype, jnp.float32)
    targets = jax.nn.softmax(teacher_logits.astype(dtype), axis=-1)
    return jnp.mean(optax.softmax_cross_entropy(student_logits.astype(dtype), targets))


def cross_entropy_loss(logits, labels):
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def topk_correct(logits, labels, k: int):
    """Per-example 1.0 where the label is among the k largest logits."""
    top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="per_kernel")  # one program, not one per kernel shape
def ternary_zero_fraction(params, per_kernel: bool = False):
    """Fraction of zeros in the ternary kernels the pairs fold into (sign W1 = -sign W2), over all
    of them, or {path: fraction} with `per_kernel`. A property of the state, counted when the loop
    logs or evaluates, not a metric of the train step (XLA would add kernels to every step)."""
    pairs = dict(ops.binary_pairs(params))
    zeros = {k: jnp.sum(ops.folded_zeros(p["kernel_1"], p["kernel_2"])) for k, p in pairs.items()}
    if per_kernel:
        return {k: zeros[k] / p["kernel_1"].size for k, p in pairs.items()}
    total = sum(p["kernel_1"].size for p in pairs.values())
    return sum(zeros.values()) / total if pairs else jnp.zeros(())


def make_train_step(config, mesh: Mesh, tx, teacher_variables=None) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, jitted over the mesh, the teacher's
    variables (if any) bound once. A non-finite loss keeps the state but for the step counter."""
    dtype = DTYPES[config.dtype]
    axis = DATA_AXIS if config.sync_batch_stats else None
    student = models.create(config.arch, config.num_classes, dtype, config.act_backend, axis,
                            remat=use_remat(config), stem_conv=config.stem_conv)
    teacher = None if teacher_variables is None else models.create(
        config.teacher_arch, config.num_classes, dtype, config.act_backend, axis,
        stem_conv=config.stem_conv)

    def step_fn(state, batch, teacher_vars):
        images, labels = batch["image"], batch["label"]
        params = ops.clamp_latent_kernels(state.params)
        if teacher is not None:
            if config.teacher_bn_train_mode:  # the original runs its teacher in train mode
                t_logits, _ = teacher.apply(teacher_vars, images, train=True, mutable=["batch_stats"])
            else:
                t_logits = teacher.apply(teacher_vars, images, train=False)
            t_logits = jax.lax.stop_gradient(t_logits)

        def loss_fn(p):
            logits, updates = student.apply({"params": p, "batch_stats": state.batch_stats}, images,
                                            train=True, mutable=["batch_stats"])
            loss = (distillation_loss(logits, t_logits) if teacher is not None
                    else jnp.mean(cross_entropy_loss(logits, labels)))
            # pmean of the loss inside the differentiated function: shard_map's autodiff sums the
            # replicated params' cotangents over the axis: the gradient is already the global one.
            return jax.lax.pmean(loss, DATA_AXIS), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if mesh.devices.flat[0].platform == "gpu":  # a TPU's layouts are tiled: XLA's choice
            grads = gradient_layout.arranged_for_gpu_update(grads)
        if not config.sync_batch_stats:
            batch_stats = jax.tree_util.tree_map(
                lambda x: jax.lax.pmean(x, DATA_AXIS) if jnp.issubdtype(x.dtype, jnp.floating)
                else x, batch_stats)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_state = TrainState(step=state.step + 1, params=optax.apply_updates(params, updates),
                               batch_stats=batch_stats, opt_state=opt_state)
        finite = jnp.isfinite(loss)
        new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                           state.replace(step=state.step + 1))
        metrics = {"loss": loss, "finite": finite.astype(jnp.float32),
                   "top1": jax.lax.pmean(jnp.mean(topk_correct(logits, labels, 1)), DATA_AXIS),
                   "top5": jax.lax.pmean(jnp.mean(topk_correct(logits, labels, 5)), DATA_AXIS)}
        return new_state, metrics

    step = jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                                 out_specs=(P(), P())), donate_argnums=(0,))
    leaves = jax.tree_util.tree_leaves(teacher_variables)
    # abstract variables (ShapeDtypeStructs: compiling for a machine not attached) stay abstract
    abstract = leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    bound = teacher_variables if abstract else jax.device_put(teacher_variables, replicated(mesh))

    run = processes.first_call_together(step, "train step")

    def train_step(state, batch):
        return run(state, batch, bound)

    train_step.jitted, train_step.teacher_variables = step, bound  # for ahead-of-time compiling
    return train_step


def make_eval_step(config, mesh: Mesh, module=None) -> Callable:
    """`eval_step(variables, batch) -> sums` of loss, top-1, top-5 and count of real (mask 1)
    examples in the global batch."""
    model = module or models.create(config.arch, config.num_classes, DTYPES[config.dtype],
                                    config.act_backend, stem_conv=config.stem_conv)

    def step_fn(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)
        mask, labels = batch["mask"], batch["label"]
        sums = {"loss": jnp.sum(cross_entropy_loss(logits, labels) * mask),
                "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
                "top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
                "count": jnp.sum(mask)}
        return jax.lax.psum(sums, DATA_AXIS)

    return processes.first_call_together(
        jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())),
        "eval step")


def evaluate(eval_step: Callable, mesh: Mesh, variables, batches, progress=None) -> dict:
    """Top-1/top-5 (fractions), mean cross-entropy and count over this process's `batches`."""
    totals = None
    for batch in batches:
        sums = eval_step(variables, shard_batch(mesh, batch))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
        if progress:
            progress()
    if totals is None:
        raise ConfigError("the evaluation split yielded no batches")
    totals = jax.device_get(totals)
    n = float(totals["count"])
    return {"top1": float(totals["top1"]) / n, "top5": float(totals["top5"]) / n,
            "loss": float(totals["loss"]) / n, "num_examples": int(n)}


def total_steps(config, steps_per_epoch: int) -> int:
    if config.num_train_steps and config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * steps_per_epoch))
