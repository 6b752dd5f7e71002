"""The deliberative model: a backbone to A, a class head on A and a hardness predictor, exposed separately."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.models import _layers
from delib_jax.models.heads import PoolMLPHead


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Outputs:
    """What one forward pass gives: logits (B, C), hardness logit (B,) or None, features A (B, H, W, D)."""

    logits: jax.Array
    hardness_logit: jax.Array | None
    features: jax.Array


def _float(a: jax.Array) -> jax.Array:
    """A as the heads read it: float32 (from a bfloat16 backbone too), float64 kept (a float64 model under x64)."""
    return a if a.dtype == jnp.float64 else a.astype(jnp.float32)


class HardnessNetwork(nnx.Module):
    """A separate hardness predictor (the paper's ref. [46]): its own backbone to A_s and a head to one logit."""

    def __init__(self, backbone: nnx.Module, head: PoolMLPHead):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.backbone(images))[:, 0]


class DeliberativeModel(nnx.Module):
    """Classifier plus hardness predictor.

    - ``features(images)``: A (B, H, W, D), the tensor the explanation attributes to;
    - ``classifier``: the class head, A -> logits (B, C);
    - ``hardness_head``: jointly trained head on A -> one logit (default), or
      ``hardness_network``: a separate network whose own A_s at the same layer is used for the difficulty map.
    Heads are NNX modules; ``nnx.split`` turns them into pure functions of (state, A) for jit / vmap / jvp.
    Calls follow the model's mode: eval (as `delib_jax.models.create_model` returns it) uses the running batch-norm
    statistics; train mode uses and updates batch statistics (training only).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        classifier: nnx.Module,
        *,
        arch: str,
        hardness_head: PoolMLPHead | None = None,
        hardness_network: HardnessNetwork | None = None,
    ):
        if hardness_head is not None and hardness_network is not None:
            raise ValueError("give either a hardness head on A or a separate hardness network, not both")
        self.arch = arch
        self.backbone = backbone
        self.classifier = classifier
        self.hardness_head = hardness_head
        self.hardness_network = hardness_network

    @classmethod
    def from_split(
        cls,
        features: nnx.Module,
        head: nnx.Module,
        *,
        hardness_head: nnx.Module | None = None,
        arch: str = "custom",
        num_classes: int | None = None,
        input_size: int = 224,
    ) -> DeliberativeModel:
        """A classifier of your own, given as its two halves, as a model `delib_jax.explain` and the explanation job
        (`delib_jax.stream.explain_files` with a `delib_jax.stream.ModelConfig`) take.

        features: an NNX module, images (B, H, W, 3) normalised -> A (B, h, w, D), the layer the explanation
        attributes to (channels last); head: an NNX module, A -> logits (B, C). hardness_head: optionally a trained
        hardness predictor on A, A -> (B, 1) logits (without one, explain with score='entropy' or 'hesitancy').
        num_classes: C, read from ``head.out_features`` when it has one, else found from the output shape of
        ``head(features(x))`` for an ``input_size`` square image (shapes only, nothing computed). The modules are
        used as they are (not copied); inference runs them in eval mode (`delib_jax.models.inference_view`)."""
        for name, module in (("features", features), ("head", head), ("hardness_head", hardness_head)):
            if module is not None and not isinstance(module, nnx.Module):
                raise TypeError(f"{name} must be a flax.nnx.Module, got {type(module).__name__}")
        model = cls(features, head, arch=arch, hardness_head=hardness_head)
        if num_classes is None and getattr(head, "out_features", None) is None:
            num_classes = _output_width(features, head, input_size)
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
            model.split_num_classes = int(num_classes)
        return model

    @property
    def num_classes(self) -> int:
        c = getattr(self.classifier, "out_features", None)
        return int(c) if c is not None else self.split_num_classes

    @property
    def hardness_kind(self) -> str:
        """'head' (jointly trained on A), 'network' (separate) or 'none'."""
        if self.hardness_head is not None:
            return "head"
        return "network" if self.hardness_network is not None else "none"

    def features(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3), normalised float -> A (B, H', W', D) in float32."""
        _layers.validate_images(images)
        return _float(self.backbone(images))

    def features_and_context(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """A (B, H', W', D) and what else the class head reads for this batch (ViT: the class token entering its
        last block, (B, D)), or None for heads that read A only."""
        split = getattr(self.backbone, "features_and_context", None)
        if split is None:
            return self.features(images), None
        _layers.validate_images(images)
        a, context = split(images)
        return _float(a), context

    def bind_classifier(self, context: jax.Array | None) -> nnx.Module:
        """The class head as a function of A alone: itself, or bound to ``context`` (`features_and_context`)."""
        return self.classifier if context is None else self.classifier.bind(context)

    def features_and_classifier(self, images: jax.Array) -> tuple[jax.Array, nnx.Module]:
        """A (B, H', W', D) and the class head as a function of A alone, for this batch.

        Most heads read A only and come back as they are. A head that also reads something the image gives but the
        grid does not hold (ViT's reads the class token entering its last block) comes back with that input bound
        (``classifier.bind(context)``): the class token is held fixed while A is attributed, so it is never a
        location of the maps."""
        a, context = self.features_and_context(images)
        return a, self.bind_classifier(context)

    def hardness_features(self, images: jax.Array, features: jax.Array | None = None) -> jax.Array | None:
        """The feature tensor the hardness predictor reads: A itself for a head, A_s for a separate network."""
        if self.hardness_network is not None:
            return _float(self.hardness_network.backbone(images))
        if self.hardness_head is not None:
            return self.features(images) if features is None else features
        return None

    def hardness_logit(self, a_hard: jax.Array) -> jax.Array:
        """Hardness logit (B,) from the hardness features (A or A_s)."""
        head = self.hardness_head if self.hardness_head is not None else self.hardness_network.head
        if head is None:
            raise ValueError("this model has no hardness predictor (created with hardness='none')")
        return head(a_hard)[:, 0]

    def __call__(self, images: jax.Array) -> Outputs:
        a, classifier = self.features_and_classifier(images)
        logits = classifier(a)
        a_hard = self.hardness_features(images, a)
        hard = None if a_hard is None else self.hardness_logit(a_hard)
        return Outputs(logits=logits, hardness_logit=hard, features=a)


def _output_width(features: nnx.Module, head: nnx.Module, size: int) -> int:
    """C of ``head(features(x))`` for a (1, size, size, 3) image, from shapes only (`DeliberativeModel.from_split`)."""
    from delib_jax.models._inference import inference_view

    graphdef, state = nnx.split(inference_view(nnx.Sequential(features, head)))
    try:
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                             jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))  # fmt: skip
    except Exception as e:  # the modules' own errors for an input they cannot take
        raise ValueError(f"cannot tell the number of classes from head(features(x)) for a {size} px image "
                         f"({type(e).__name__}): give num_classes=C (or input_size=)") from None  # fmt: skip
    if out.ndim != 2 or out.shape[-1] < 2:
        raise ValueError(f"head(features(x)) must give logits (B, C) with C >= 2, got shape {out.shape}")
    return int(out.shape[-1])
