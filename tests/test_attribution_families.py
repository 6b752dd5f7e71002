"""Small instances of the imported families (a ViT of 2 blocks, a ConvNeXt and a Swin of one small stage) as whole
models: the maps of every class and the difficulty score, as the compiled model-level pass gives them, equal float64
brute force (`jax.hessian` per location) of the class head bound to its batch; `explain` runs on each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import delib_jax
from delib_jax.attribution import make_attribute_fn, output_functions
from delib_jax.models import DeliberativeModel, hardness_head
from delib_jax.models.convnext import ConvNeXt
from delib_jax.models.convnext import class_head as convnext_head
from delib_jax.models.swin import Swin, swin_head
from delib_jax.models.vit import ViT, ViTHead
from delib_jax.testing.reference import brute_force_terms

C, D = 4, 8
EQ2 = {"difficulty_channels": "signed"}


def _model(family: str, dtype=jnp.float64) -> tuple[DeliberativeModel, int]:
    """A small model of ``family`` with every parameter random, and the image size it takes."""
    rngs = nnx.Rngs(0)
    if family == "vit":
        backbone, size = ViT(image_size=12, patch_size=4, width=D, depth=2, num_heads=2, mlp_dim=12, rngs=rngs), 12
        head = ViTHead(D, C, num_heads=2, mlp_dim=12, rngs=rngs)
    elif family == "convnext":
        backbone, size = ConvNeXt((1,), (D,), layer_scale=0.5, rngs=rngs), 12
        head = convnext_head(D, C, rngs=rngs)
    else:
        backbone, size = Swin(patch_size=2, embed_dim=D, depths=(2,), num_heads=(2,), window_size=2, rngs=rngs), 6
        head = swin_head(D, C, rngs=rngs)
    model = DeliberativeModel(backbone, head, arch=family, hardness_head=hardness_head(D, hidden=5, rngs=rngs))
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    new = [(jax.random.normal(k, x.shape, jnp.float32) * 0.5 + (x.ndim == 1) * 0.3).astype(dtype)
           for k, x in zip(keys, leaves)]  # fmt: skip
    nnx.update(model, jax.tree.unflatten(tree, new))
    model.eval()
    return model, size


def _images(size, dtype=np.float64, batch=2):
    return jnp.asarray(np.random.RandomState(3).randn(batch, size, size, 3).astype(dtype))


def _reference(model, images, score):
    """Brute-force maps (B, C + 1, H, W): each image's class head bound to its own class token (ViT)."""
    a, context = model.features_and_context(images)
    class_phi, hard_phi = output_functions(score)
    maps = []
    for n in range(a.shape[0]):
        head = model.bind_classifier(None if context is None else context[n : n + 1])
        f, s = brute_force_terms(lambda x, head=head: class_phi(head(x)), a[n : n + 1])
        parts = [f + 0.5 * s]
        if hard_phi is not None:
            f, s = brute_force_terms(lambda x: hard_phi(model.hardness_head(x)), a[n : n + 1])
            parts.append(f + 0.5 * s)
        maps.append(np.concatenate(parts, axis=1))
    return np.concatenate(maps)


@pytest.mark.parametrize("family", ["vit", "convnext", "swin"])
@pytest.mark.parametrize("score", ["hardness", "entropy"])
@pytest.mark.slow  # brute-force references
def test_model_maps_equal_float64_brute_force(family, score):
    with jax.enable_x64(True):
        model, size = _model(family)
        images = _images(size)
        ref = _reference(model, images, score)
        got = make_attribute_fn(model, score=score, **EQ2)(images)
        assert got.maps.dtype == jnp.float64
        err = float(np.abs(np.asarray(got.maps) - ref).max() / np.abs(ref).max())
        assert err <= 1e-7, err  # the goal is 1e-6; float64 rounding leaves ~1e-9 here
        generic = make_attribute_fn(model, score=score, path="generic", **EQ2)(images)
        np.testing.assert_allclose(generic.maps, got.maps, rtol=1e-7, atol=1e-10 * np.abs(ref).max())
        assert np.abs(np.asarray(got.second_order)).max() > 1e-3 * np.abs(ref).max()  # the term has weight here


@pytest.mark.parametrize("family", ["vit", "convnext", "swin"])
def test_explain_runs_on_each_family(family):
    model, size = _model(family, dtype=jnp.float32)
    images = _images(size, np.float32, batch=3)
    explanations = delib_jax.explain(model, images, class_names=[f"class {i}" for i in range(C)], score="entropy")
    assert len(explanations) == 3
    for e in explanations:
        for q in e.insecurities:
            assert q.mask.shape == (size, size) and q.a != q.b


@pytest.mark.parametrize("family", ["vit", "convnext", "swin"])
def test_research_api_on_each_family(family):
    """layer_attribution at A through the head's own derivatives equals the generic forward order; Integrated
    Hessians and the interaction maps run through the class head bound to its batch, and interactions sum to what
    the cross-location term gives."""
    from delib_jax.attribution import integrated_hessians, interaction_maps, layer_attribution

    with jax.enable_x64(True):
        model, size = _model(family)
        a, head = model.features_and_classifier(_images(size))
        tangent = layer_attribution(None, head, a, second_order="diagonal", order="tangent")
        forward = layer_attribution(None, head, a, second_order="diagonal", order="forward")
        np.testing.assert_allclose(tangent.maps, forward.maps, rtol=1e-7, atol=1e-10 * np.abs(forward.maps).max())
        inter = interaction_maps(None, head, a, targets=1, order="reverse")
        cross = layer_attribution(None, head, a, targets=1, second_order="cross", order="reverse")
        second = 0.5 * np.asarray(inter.values).sum(axis=-1).reshape(cross.second_order.shape)  # Eq. 2: 1/2 sum_m I
        np.testing.assert_allclose(second, cross.second_order, rtol=1e-7, atol=1e-9 * np.abs(second).max())
        ih = integrated_hessians(None, head, a, targets=1, nodes=6, rows=[0, 1])
        assert np.isfinite(np.asarray(ih.values)).all() and ih.values.shape[:3] == (2, 1, 2)


@pytest.mark.slow  # the streaming job's processes
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_streaming_job_on_a_transformer(family, tmp_path):
    """The job explains image files with a ViT (its class head bound batch by batch) and a Swin, and stores them."""
    from PIL import Image

    from delib_jax.store import load_explanations
    from delib_jax.stream import JobOptions, ModelConfig, explain_files

    model, size = _model(family, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    files = []
    for i, shape in enumerate([(20, 30), (16, 16), (30, 18)]):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(files[-1])
    config = ModelConfig([f"class {i}" for i in range(C)], resize=size, crop=size, arch=family)
    explain_files(model, config, files, tmp_path / "out", options=JobOptions(batch_size=2, figures=False),
                  report=lambda m: None, score="entropy")  # fmt: skip
    loaded = list(load_explanations(tmp_path / "out"))
    assert [e.source for e in loaded] == [str(f) for f in files]
    assert all(q.mask.shape == (size, size) for e in loaded for q in e.insecurities)
