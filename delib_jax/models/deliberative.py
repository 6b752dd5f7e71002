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

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def hardness_kind(self) -> str:
        """'head' (jointly trained on A), 'network' (separate) or 'none'."""
        if self.hardness_head is not None:
            return "head"
        return "network" if self.hardness_network is not None else "none"

    def features(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3), normalised float -> A (B, H', W', D) in float32."""
        _layers.validate_images(images)
        return self.backbone(images).astype(jnp.float32)

    def features_and_context(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """A (B, H', W', D) and what else the class head reads for this batch (ViT: the class token entering its
        last block, (B, D)), or None for heads that read A only."""
        split = getattr(self.backbone, "features_and_context", None)
        if split is None:
            return self.features(images), None
        _layers.validate_images(images)
        a, context = split(images)
        return a.astype(jnp.float32), context

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
            return self.hardness_network.backbone(images).astype(jnp.float32)
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
