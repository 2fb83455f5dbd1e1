"""Train state, losses, and the data-parallel train and eval steps.

One training step is the original algorithm (REFERENCE.md, BinOp): clamp the latent binary kernels
to [-1, 1] (persistently), run the teacher and the student, take the gradient of the distillation
loss through the folded convolutions (`ops.fold_binary_pair` applies the original gradient rule),
average it over the data axis, and let Adam update the clamped latent weights.

Data parallelism: `jax.shard_map` over a 1-D mesh axis "data" spanning every device of every
process; parameters replicated, batches split. BatchNorm statistics are synchronised over the axis
when `sync_batch_stats` is set (then N devices compute exactly what one device does on the global
batch), else each device normalises with its own shard, as the original's `nn.DataParallel` did,
and the running statistics are averaged.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ops
from sttn_jax import models

DATA_AXIS = "data"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (checkpointed as one tree)."""
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh "data" over all devices of all processes."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def cosine_per_epoch(base_lr: float, num_epochs: int, steps_per_epoch: int) -> Callable:
    """The original schedule: lr = 0.5 * base * (1 + cos(pi * epoch / epochs)), set per epoch."""
    def schedule(step):
        epoch = jnp.floor_divide(step, steps_per_epoch)
        return 0.5 * base_lr * (1 + jnp.cos(jnp.pi * epoch / num_epochs))
    return schedule


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (the original: lr 0.005, betas 0.9/0.999, eps 1e-8, no weight decay)."""
    schedule = cosine_per_epoch(config.learning_rate, config.num_epochs, steps_per_epoch)
    tx = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    if config.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
    return tx


def distillation_loss(student_logits, teacher_logits):
    """Mean over the batch of -sum(softmax(teacher) * log_softmax(student)) (the original TS_Loss)."""
    t = jax.nn.softmax(teacher_logits.astype(jnp.float32) if teacher_logits.dtype == jnp.bfloat16
                       else teacher_logits, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(t.dtype), axis=-1)
    return -jnp.mean(jnp.sum(t * s, axis=-1))


def cross_entropy_loss(logits, labels):
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def topk_correct(logits, labels, k: int):
    """Per-example 1.0 where the label is among the k largest logits."""
    k = min(k, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def ternary_zero_fraction(params):
    """Fraction of zeros in the ternary kernels the binary pairs fold into (sign W1 = -sign W2):
    what STTN learns, watched as it happens. 0 for a model without pairs."""
    zeros, total = 0.0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if getattr(path[-1], "key", None) == "kernel_1":
            parent = params
            for p in path[:-1]:
                parent = parent[p.key]
            t = jnp.sign(leaf) + jnp.sign(parent["kernel_2"])
            zeros = zeros + jnp.sum(t == 0)
            total += leaf.size
    return zeros / max(total, 1)


def float_leaves_pmean(tree, axis_name):
    """Averages the floating-point leaves of `tree` over `axis_name` (counters are left alone)."""
    return jax.tree_util.tree_map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Trainer:
    """Builds the student (and teacher), the optimizer and the jitted data-parallel steps."""

    def __init__(self, config, steps_per_epoch: int, mesh: Mesh | None = None,
                 teacher_variables=None):
        self.config = config
        self.mesh = mesh or make_mesh()
        self.steps_per_epoch = steps_per_epoch
        self.dtype = DTYPES[config.dtype]
        axis = DATA_AXIS if config.sync_batch_stats else None
        self.student = models.create(config.arch, config.num_classes, self.dtype, config.act_backend,
                                     bn_axis_name=axis)
        self.eval_model = models.create(config.arch, config.num_classes, self.dtype, config.act_backend)
        self.teacher = None
        self.teacher_variables = None
        if teacher_variables is not None:
            self.teacher = models.create(config.teacher_arch, config.num_classes, self.dtype,
                                         config.act_backend, bn_axis_name=axis)
            self.teacher_variables = jax.device_put(teacher_variables, self.replicated)
        self.tx = make_optimizer(config, steps_per_epoch)
        self.tx_schedule = cosine_per_epoch(config.learning_rate, config.num_epochs, steps_per_epoch)
        self.train_step = self._build_train_step()
        self.eval_step = self._build_eval_step()

    # -- shardings -------------------------------------------------------------------------
    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DATA_AXIS))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    # -- state -----------------------------------------------------------------------------
    def init_state(self, rng) -> TrainState:
        """A fresh state with the original initialisation, replicated on the mesh."""
        variables = models.init_variables(self.eval_model, rng, self.config.image_size)
        return self.state_from_variables(variables)

    def _stored_dtype(self, tree):
        """float64 runs keep parameters, statistics and Adam moments in float64 too (float32 and
        bfloat16 runs keep them in float32): a parity run must not round its state to float32
        after every step."""
        if self.dtype != jnp.float64:
            return tree
        return jax.tree_util.tree_map(
            lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, tree)

    def state_from_variables(self, variables) -> TrainState:
        # Copies: the train step donates its state, which must never free the caller's arrays.
        variables = self._stored_dtype(variables)
        params = jax.tree_util.tree_map(jnp.array, variables["params"])
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=jax.tree_util.tree_map(jnp.array, variables["batch_stats"]),
                           opt_state=self.tx.init(params))
        return jax.device_put(state, self.replicated)

    def abstract_state(self) -> TrainState:
        """Shapes/dtypes/shardings of a state, for restoring a checkpoint without initialising."""
        size = self.config.image_size
        variables = jax.eval_shape(lambda: self.eval_model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32), train=False))

        def build(v):
            v = self._stored_dtype(v)
            return TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                              batch_stats=v["batch_stats"], opt_state=self.tx.init(v["params"]))

        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
            jax.eval_shape(build, variables))

    # -- steps -----------------------------------------------------------------------------
    def _build_train_step(self):
        config, student, teacher, tx = self.config, self.student, self.teacher, self.tx
        sync = config.sync_batch_stats
        use_teacher = teacher is not None
        teacher_train = bool(config.teacher_bn_train_mode)

        def step_fn(state, batch, teacher_variables):
            images, labels = batch["image"], batch["label"]
            params = ops.clamp_latent_kernels(state.params)
            if use_teacher:
                if teacher_train:
                    t_logits, _ = teacher.apply(teacher_variables, images, train=True,
                                                mutable=["batch_stats"])
                else:
                    t_logits = teacher.apply(teacher_variables, images, train=False)
                t_logits = jax.lax.stop_gradient(t_logits)

            def loss_fn(p):
                logits, upd = student.apply({"params": p, "batch_stats": state.batch_stats}, images,
                                            train=True, mutable=["batch_stats"])
                loss = (distillation_loss(logits, t_logits) if use_teacher
                        else cross_entropy_loss(logits, labels))
                # The mean over devices inside the differentiated function: shard_map's autodiff
                # already sums the cotangents of the replicated parameters over the axis, so this
                # yields the global-batch gradient (an extra pmean of the gradient would not).
                return jax.lax.pmean(loss, DATA_AXIS), (logits, upd["batch_stats"])

            (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            if not sync:
                batch_stats = float_leaves_pmean(batch_stats, DATA_AXIS)
            updates, opt_state = tx.update(grads, state.opt_state, params)
            new_params = optax.apply_updates(params, updates)
            metrics = {
                "loss": loss,
                "top1": jax.lax.pmean(jnp.mean(topk_correct(logits, labels, 1)), DATA_AXIS),
                "top5": jax.lax.pmean(jnp.mean(topk_correct(logits, labels, 5)), DATA_AXIS),
                "ternary_zero_fraction": ternary_zero_fraction(new_params),
            }
            new_state = TrainState(step=state.step + 1, params=new_params, batch_stats=batch_stats,
                                   opt_state=opt_state)
            # A non-finite loss leaves everything but the step counter as it was, so a diverged
            # step can never reach a checkpoint; the loop stops (or skips) on metrics["finite"].
            finite = jnp.isfinite(loss)
            kept = state.replace(step=state.step + 1)
            new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
            metrics["finite"] = finite.astype(jnp.float32)
            return new_state, metrics

        mapped = jax.shard_map(step_fn, mesh=self.mesh,
                               in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
        return jax.jit(mapped, donate_argnums=(0,))

    def _build_eval_step(self):
        model = self.eval_model

        def step_fn(variables, batch):
            logits = model.apply(variables, batch["image"], train=False)
            mask = batch["mask"]
            labels = batch["label"]
            logits32 = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
            losses = optax.softmax_cross_entropy_with_integer_labels(logits32, labels)
            sums = {
                "loss": jnp.sum(losses * mask),
                "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
                "top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
                "count": jnp.sum(mask),
            }
            return jax.lax.psum(sums, DATA_AXIS)

        mapped = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P())
        return jax.jit(mapped)

    def variables(self, state: TrainState):
        return {"params": ops.clamp_latent_kernels(state.params), "batch_stats": state.batch_stats}

    def evaluate(self, variables, batches, progress: Callable | None = None) -> dict:
        """Top-1/top-5 (fractions) and mean cross-entropy over `batches` (dicts with a mask)."""
        totals = None
        for batch in batches:
            sums = self.eval_step(variables, self.shard_batch(batch))
            totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
            if progress:
                progress(batch)
        if totals is None:
            raise ValueError("the evaluation split yielded no batches")
        totals = jax.device_get(totals)
        n = float(totals["count"])
        return {"top1": float(totals["top1"]) / n, "top5": float(totals["top5"]) / n,
                "loss": float(totals["loss"]) / n, "num_examples": int(n)}

    def shard_batch(self, batch):
        """A global jax.Array split over the data axis from this process's part of the batch."""
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)), batch)


def check_batch_divisible(global_batch: int, num_devices: int, what: str = "batch_size"):
    if global_batch % num_devices:
        raise ValueError(f"{what}={global_batch} is not divisible by the {num_devices} devices; "
                         f"use a multiple of {num_devices}, e.g. --config.{what}="
                         f"{max(num_devices, global_batch // num_devices * num_devices)}")


def steps_from_epochs(config, steps_per_epoch: int) -> int:
    if config.num_train_steps and config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * steps_per_epoch))
