"""The training step as pure functions: `create_train_state`, `train_step`, `eval_step`.

Data parallelism (`make_mesh`, `shard_batch`, `replicate`): a 1-D ``Mesh`` over all devices with axis ``'data'``;
batches are sharded along it, the train state is replicated, and XLA inserts the gradient all-reduce. One CPU device
is the same code path with a mesh of one. Several processes (``jax.distributed``): the mesh spans every process's
devices, process k holds rows [k B / n, (k + 1) B / n) of each global batch of B rows (`process_share`; its input
pipeline decodes only those, `shard_batch` assembles the global array) and a copy of the replicated state on each of
its devices (`replicate`: ``jax.device_put`` accepts only shardings whose devices are all this process's).

    state = create_train_state(config, total_steps=1000, mesh=mesh)
    step_fn, eval_fn = compile_steps(mesh)
    state, metrics = step_fn(state, shard_batch(batch, mesh))

The hardness head alone, on a frozen classifier (``python -m train.hardness``): `create_head_train_state` and
`hardness_train_step` (``compile_steps(mesh, head_only=True)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from delib_jax.checkpoint import RunConfig, build_model
from delib_jax.data.transforms import Normalization, model_input
from delib_jax.models import DeliberativeModel, create_model, load_torchvision
from delib_jax.train.losses import hardness_bce, joint_loss, true_class_probability

DATA_AXIS = "data"


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as arrays, plus the static pieces to rebuild the model.

    Attributes:
      step: () int32, optimizer steps taken.
      params: ``nnx.State`` of the model's ``nnx.Param`` variables.
      model_state: ``nnx.State`` of every other variable (batch-norm statistics, dropout RNG streams).
      opt_state: the optax state.
      graphdef: the model structure in train mode (batch statistics, dropout) (static).
      eval_graphdef: the same in eval mode (running statistics, no dropout) (static).
      tx: the optax transformation (static).
    """

    step: jax.Array
    params: nnx.State
    model_state: nnx.State
    opt_state: Any
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    eval_graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def model(self, *, train: bool = False) -> DeliberativeModel:
        """The model with these parameters (eval mode unless ``train``)."""
        return nnx.merge(self.graphdef if train else self.eval_graphdef, self.params, self.model_state)


# The hardness head's variables (`HeadTrainState`): its parameters, and the rest of it (its dropout's RNG stream).
HEAD_PARAMS = nnx.All(nnx.Param, nnx.PathContains("hardness_head"))
HEAD_REST = nnx.All(nnx.Not(nnx.Param), nnx.PathContains("hardness_head"))


class HeadTrainState(TrainState):
    """A `TrainState` that trains the hardness head alone, on a frozen classifier (``python -m train.hardness``).

    ``params``, ``model_state`` and ``opt_state`` are the hardness head's (the optimizer sees nothing else);
    ``frozen`` holds the rest of the model (backbone and class head: parameters, batch-norm statistics), which no
    step changes. The graphdefs are the whole model's: ``graphdef`` with the head in train mode and the rest in eval
    mode (running statistics, no dropout), ``eval_graphdef`` all in eval mode. What is saved and restored (params,
    model_state, opt_state) is the head's alone.
    """

    frozen: nnx.State

    def model(self, *, train: bool = False) -> DeliberativeModel:
        return nnx.merge(self.graphdef if train else self.eval_graphdef, self.params, self.model_state, self.frozen)


def learning_rate_schedule(config: RunConfig, total_steps: int) -> optax.Schedule:
    """'step': constant lr, x0.1 after 2/3 of ``total_steps`` (the authors' 40 of 60 epochs);
    'cosine': linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if config.schedule == "step":
        return optax.piecewise_constant_schedule(config.lr, {int(round(2 * total_steps / 3)): 0.1})
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(config: RunConfig, total_steps: int) -> optax.GradientTransformation:
    """'sgd': torch's SGD (weight decay added to the gradient, then momentum, then lr); 'adamw': decoupled decay.

    Equal hyper-parameters give the same (cached) transformation object, so compiled steps are reused across runs
    in one process (the transformation is static in `TrainState`).
    """
    return _optimizer(
        config.optimizer, config.lr, config.momentum, config.weight_decay, config.schedule, config.warmup_steps,
        total_steps,
    )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _optimizer(optimizer, lr, momentum, weight_decay, schedule, warmup_steps, total_steps):
    config = RunConfig(
        arch="small", num_classes=2, class_names=["0", "1"], optimizer=optimizer, lr=lr, momentum=momentum,
        weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps,
    )  # fmt: skip
    sched = learning_rate_schedule(config, total_steps)
    if optimizer == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(sched, momentum=momentum or None))
    return optax.adamw(sched, weight_decay=weight_decay)


def forward(model: DeliberativeModel, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Logits (B, C) and hardness logit (B,) or None for training: a hardness head reads stop_gradient(A).

    images: (B, H, W, 3) normalised. The stop-gradient keeps the hardness loss out of the classifier's
    representation (see `delib_jax.train.losses`); a separate hardness network reads the images itself.
    """
    a = model.features(images)
    logits = model.classifier(a)
    if model.hardness_kind == "none":
        return logits, None
    a_hard = model.hardness_features(images, jax.lax.stop_gradient(a))
    return logits, model.hardness_logit(a_hard)


def create_train_state(
    config: RunConfig,
    *,
    total_steps: int,
    mesh: Mesh | None = None,
    load_weights: bool = True,
) -> TrainState:
    """Initialise the model of ``config`` (seed ``config.seed``), optionally from ImageNet weights, and the optimizer.

    load_weights: import ``config.weights`` (torchvision format) into the backbone(s); skip it when the state is about
    to be overwritten by a checkpoint. The state is replicated over ``mesh`` when given.
    """
    abstract = nnx.eval_shape(lambda: build_model(config))
    abstract.eval()
    eval_graphdef = nnx.graphdef(abstract)
    abstract.train()
    graphdef = nnx.graphdef(abstract)
    params, model_state = _initializer(config.arch, config.num_classes, config.hardness, config.hardness_hidden)(
        config.seed
    )
    if load_weights and config.weights:
        model = nnx.merge(graphdef, params, model_state)
        load_torchvision(model, config.weights, classifier_output=False)
        _, params, model_state = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config, total_steps)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=tx.init(params),
        graphdef=graphdef, eval_graphdef=eval_graphdef, tx=tx,
    )  # fmt: skip
    if mesh is not None:
        state = replicate(state, mesh)
    return state


@functools.lru_cache(maxsize=8)
def _initializer(arch: str, num_classes: int, hardness: str, hardness_hidden: int) -> Callable:
    """A compiled seed -> (params, model_state) initialiser (one compilation instead of many eager ops)."""

    def init(seed):
        model = create_model(
            arch, num_classes, hardness=hardness, hardness_hidden=hardness_hidden, rngs=nnx.Rngs(jax.random.key(seed))
        )
        model.train()
        return nnx.split(model, nnx.Param, ...)[1:]

    return jax.jit(init)


def create_head_train_state(
    model: DeliberativeModel, config: RunConfig, *, total_steps: int, mesh: Mesh | None = None
) -> HeadTrainState:
    """The training state of ``model``'s hardness head alone (`HeadTrainState`), with ``config``'s optimizer.

    model: a classifier with the hardness head to train attached (``model.hardness_head``); the rest of it is frozen
    as it is. The model is left in eval mode. The state is replicated over ``mesh`` when given.
    """
    if model.hardness_head is None:
        raise ValueError("the model has no hardness head to train")
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.hardness_head.train()
    graphdef, params, head_rest, frozen = nnx.split(model, HEAD_PARAMS, HEAD_REST, ...)
    model.eval()
    tx = make_optimizer(config, total_steps)
    state = HeadTrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=head_rest, opt_state=tx.init(params),
        graphdef=graphdef, eval_graphdef=eval_graphdef, tx=tx, frozen=frozen,
    )  # fmt: skip
    if mesh is not None:
        state = replicate(state, mesh)
    return state


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, normalize: bool = True, pixel_stats: Normalization | None = None
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch`` (image (B, H, W, 3), label (B,)); returns the new state and batch metrics.

    uint8 images are normalised here with ``pixel_stats`` (on the device); float images are used as they are."""
    images = model_input(batch["image"], pixel_stats)

    def loss_fn(params):
        model = nnx.merge(state.graphdef, params, state.model_state, copy=True)
        logits, hardness_logit = forward(model, images)
        loss, metrics = joint_loss(logits, hardness_logit, batch["label"], normalize=normalize)
        return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    grads, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new, metrics


def hardness_train_step(
    state: HeadTrainState, batch: dict[str, jax.Array], *, pixel_stats: Normalization | None = None
) -> tuple[HeadTrainState, dict]:
    """One optimizer step of the hardness head alone on ``batch`` (image (B, H, W, 3), label (B,)); the classifier
    is frozen.

    A and the logits come from the eval-mode classifier (running batch-norm statistics, no dropout) outside the
    gradient; the loss is the hardness term of `joint_loss` (`delib_jax.train.losses`: binary cross-entropy of the
    head's s towards 1 - p, p the frozen classifier's probability of the true class). The metrics are
    `joint_loss`'s, with ``loss`` the hardness loss that is minimised.
    """
    images = model_input(batch["image"], pixel_stats)
    a, classifier = state.model().features_and_classifier(images)
    a = jax.lax.stop_gradient(a)
    logits = jax.lax.stop_gradient(classifier(a))

    def loss_fn(params):
        model = nnx.merge(state.graphdef, params, state.model_state, state.frozen, copy=True)
        hardness_logit = model.hardness_logit(model.hardness_features(images, a))
        _, metrics = joint_loss(logits, hardness_logit, batch["label"])
        metrics = {**metrics, "loss": metrics["hardness_loss"]}
        return metrics["loss"], (metrics, nnx.state(model, HEAD_REST))

    grads, (metrics, head_rest) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, model_state=head_rest, opt_state=opt_state)
    return new, metrics


def eval_step(
    state: TrainState, batch: dict[str, jax.Array], *, pixel_stats: Normalization | None = None
) -> dict[str, jax.Array]:
    """Eval-mode sums over the valid rows of ``batch`` (image, label, mask (B,) bool); uint8 images are normalised
    with ``pixel_stats`` as in `train_step`.

    Returns: count, correct, ce (sum of cross-entropies), hardness_loss (sum; 0 without a predictor).
    """
    model = state.model()
    out = model(model_input(batch["image"], pixel_stats))
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels)
    correct = (jnp.argmax(out.logits, axis=-1) == labels).astype(jnp.float32)
    if out.hardness_logit is None:
        hard = jnp.zeros_like(ce)
    else:
        hard = hardness_bce(out.hardness_logit, true_class_probability(out.logits, labels))
    return dict(
        count=jnp.sum(mask), correct=jnp.sum(correct * mask), ce=jnp.sum(ce * mask), hardness_loss=jnp.sum(hard * mask)
    )


# ------------------------------------------------------------------------------------------------ devices


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh (axis 'data') over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def process_share() -> tuple[int, int]:
    """(k, n): this process's index and the number of processes; process k holds rows [k B / n, (k + 1) B / n) of
    every global batch of B rows."""
    return jax.process_index(), jax.process_count()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (host or single-device values, the same in every process) as global arrays replicated over ``mesh``.

    With one process this is ``jax.device_put``; with several, each process places its own copy on its own devices
    (``jax.make_array_from_callback``), as ``jax.device_put`` refuses devices of other processes. PRNG key leaves
    stay keys."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def leaf(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(leaf, tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, keys: tuple[str, ...] = ("image", "label")) -> dict:
    """Global arrays of ``batch``'s ``keys``, split along axis 0 over the mesh's 'data' axis.

    ``batch`` holds this process's rows of the global batch (`process_share`: B / n rows of B; with one process, the
    whole batch); the global arrays have n times its rows. ValueError if the global batch size is not a multiple of
    the number of devices.
    """
    n_dev = mesh.devices.size
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()
    out = {}
    for key in keys:
        x = np.asarray(batch[key])
        total = x.shape[0] * n_proc
        if total % n_dev:
            raise ValueError(f"batch size {total} is not a multiple of the {n_dev} devices")
        out[key] = jax.make_array_from_process_local_data(sharding, x, (total, *x.shape[1:]))
    return out


@functools.lru_cache(maxsize=8)
def compile_steps(
    mesh: Mesh, *, normalize: bool = True, pixel_stats: Normalization | None = None, head_only: bool = False
) -> tuple[Callable, Callable]:
    """Jit-compiled (train_step, eval_step) whose outputs are replicated over ``mesh``; train_step donates its state.
    ``pixel_stats`` normalise uint8 batches on the device (`PipelineConfig.normalize` False). ``head_only``: the
    train step is `hardness_train_step` (a `HeadTrainState`; the eval step is the same for both).

    Cached per (mesh, normalize, pixel_stats, head_only), so runs of the same model in one process compile once."""
    rep = replicated(mesh)
    if head_only:
        step = jax.jit(lambda s, b: hardness_train_step(s, b, pixel_stats=pixel_stats), out_shardings=rep,
                       donate_argnums=0)  # fmt: skip
    else:
        step = jax.jit(lambda s, b: train_step(s, b, normalize=normalize, pixel_stats=pixel_stats),
                       out_shardings=rep, donate_argnums=0)  # fmt: skip
    evaluate = jax.jit(functools.partial(eval_step, pixel_stats=pixel_stats), out_shardings=rep)
    return step, evaluate


__all__ = [
    "DATA_AXIS", "HEAD_PARAMS", "HEAD_REST", "HeadTrainState", "TrainState", "batch_sharding", "compile_steps",
    "create_head_train_state", "create_train_state", "eval_step", "forward", "hardness_train_step",
    "learning_rate_schedule", "make_mesh", "make_optimizer", "process_share", "replicate", "replicated", "shard_batch",
    "train_step",
]  # fmt: skip
