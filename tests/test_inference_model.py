"""The inference copy of a model: batch norm folded into the convolutions, the backbone's precision option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution import Options, _compiled, attribute, make_attribute_fn
from delib_jax.explanation import make_explain_fn
from delib_jax.models import (
    DeliberativeModel,
    PoolMLPHead,
    backbones,
    create_model,
    fold_batch_norm,
    hardness_head,
    inference_model,
    inference_view,
    make_predict_fn,
    split_leaves,
)


def _random_batch_norms(model, seed=0, dtype=jnp.float32):
    """Random running statistics and affine parameters in every batch norm (at init eval BN is nearly the identity,
    which would make folding trivially right)."""
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            key, *ks = jax.random.split(key, 5)
            shape = node.mean.shape
            node.mean[...] = (0.5 * jax.random.normal(ks[0], shape)).astype(dtype)
            node.var[...] = jax.random.uniform(ks[1], shape, minval=0.3, maxval=2.0).astype(dtype)
            node.scale[...] = jax.random.uniform(ks[2], shape, minval=0.5, maxval=1.5).astype(dtype)
            node.bias[...] = (0.2 * jax.random.normal(ks[3], shape)).astype(dtype)
    return model


def _vgg16_bn_trunk(classes=3):
    """The real VGG16-BN backbone with small heads (the 25088 x 4096 fc6 is irrelevant to folding)."""
    rngs = nnx.Rngs(2)
    return DeliberativeModel(
        backbones.VGG(batch_norm=True, rngs=rngs),
        PoolMLPHead(512, classes, rngs=rngs),
        arch="vgg16_bn",
        hardness_head=hardness_head(512, hidden=8, rngs=rngs),
    )


MODELS = {  # name -> (model factory, input size, whole compiled attribution compared (else the maps from A))
    "small": (lambda: create_model("small", 4, rngs=nnx.Rngs(0)), 32, True),
    "small_network": (
        lambda: create_model("small", 4, hardness="network", hardness_hidden=8, rngs=nnx.Rngs(1)),
        32,
        True,
    ),
    "resnet50": (lambda: create_model("resnet50", 3, hardness_hidden=8, rngs=nnx.Rngs(0)), 32, False),
    "vgg16_bn": (_vgg16_bn_trunk, 32, False),
}


def _images(size, batch=2, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.RandomState(seed).randn(batch, size, size, 3).astype(dtype))


def _batch_norms(module):
    return [n for _, n in nnx.iter_graph(module) if isinstance(n, nnx.BatchNorm)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_folded_model_gives_the_same_outputs_and_maps(name):
    make, size, whole = MODELS[name]
    model = _random_batch_norms(make())
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))]
    images = _images(size)
    folded = fold_batch_norm(model)
    assert _batch_norms(folded.backbone) == [] and _batch_norms(model.backbone)  # the caller's model keeps its own
    assert len(split_leaves(folded)[1]) < len(split_leaves(model)[1])
    ref = jax.jit(lambda m, x: m(x))(inference_view(model), images)
    got = make_predict_fn(model)(images)
    scale = float(jnp.max(jnp.abs(ref.features)))
    assert scale > 0
    np.testing.assert_allclose(got.features, ref.features, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(got.logits, ref.logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.hardness_logit, ref.hardness_logit, rtol=1e-4, atol=1e-5)
    if whole:  # every map (all classes and the difficulty map, both terms) through the public compiled function,
        # against the same compiled program on the unfolded eval-mode model
        opts = Options(method="gradient_hessian").check(model.num_classes)
        structure, leaves = split_leaves(inference_view(model))
        unfolded, _ = _compiled(structure, opts)(leaves, images)
        attr = make_attribute_fn(model, method="gradient_hessian")(images)
    else:  # the large backbones: the maps from the folded and the unfolded A (two backbone compilations, not four)
        kw = dict(hardness_head=model.hardness_head, method="gradient_hessian")
        attr = attribute(model.classifier, got.features, **kw)
        unfolded = attribute(model.classifier, ref.features, **kw)
    for field in ("maps", "first_order", "second_order", "probs", "score"):
        x, y = getattr(attr, field), getattr(unfolded, field)
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=2e-5 * float(jnp.max(jnp.abs(y))), err_msg=field)
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))]
    assert all(np.array_equal(x, y) for x, y in zip(before, after))


@pytest.mark.slow  # whole compiled explanations compared
def test_folding_is_exact_in_float64():
    with jax.enable_x64(True):
        model = create_model("small", 3, hardness_hidden=8, rngs=nnx.Rngs(3))
        state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), state))
        _random_batch_norms(model, seed=1, dtype=jnp.float64)
        images = _images(16, dtype=np.float64)
        folded = fold_batch_norm(model)
        assert folded.backbone.convs[0].kernel.dtype == jnp.float64
        a_ref = inference_view(model).backbone(images)
        a = folded.backbone(images)
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(a, a_ref, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(a_ref))))
        kw = dict(hardness_head=model.hardness_head, method="gradient_hessian")
        got, ref = attribute(model.classifier, a, **kw), attribute(model.classifier, a_ref, **kw)
        assert got.maps.dtype == jnp.float64
        np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(ref.maps))))


def test_train_mode_model_is_folded_with_running_statistics_and_keeps_its_mode():
    model = _random_batch_norms(create_model("small", 3, rngs=nnx.Rngs(0)))
    images = _images(32)
    ref = jax.jit(lambda m, x: m(x))(inference_view(model), images)
    model.train()
    got = make_predict_fn(model)(images)
    assert not model.backbone.norms[0].use_running_average  # still in train mode
    np.testing.assert_allclose(got.logits, ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_explain_fn_leaves_the_model_as_it_is():
    model = create_model("small", 3, rngs=nnx.Rngs(0))
    model.train()
    fn, _ = make_explain_fn(model, top_n=3)
    out = fn(_images(32))
    assert out.attribution.maps.shape == (2, 4, 4, 4)
    assert not model.backbone.norms[0].use_running_average


@pytest.mark.slow  # whole compiled explanations compared
def test_explain_fn_normalises_uint8_pixels_on_the_device_as_the_host_would():
    from delib_jax.data.transforms import CUB_STATS, IMAGENET_STATS, normalize

    model = _random_batch_norms(create_model("small", 3, rngs=nnx.Rngs(0)))
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    fn, _ = make_explain_fn(model, top_n=3, pixel_stats=CUB_STATS)
    on_device, on_host = fn(pixels), fn(normalize(pixels, CUB_STATS))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), on_device, on_host)
    other, _ = make_explain_fn(model, top_n=3, pixel_stats=IMAGENET_STATS)  # the statistics are the run's, used
    assert not np.allclose(other(pixels).attribution.maps, on_host.attribution.maps)
    with pytest.raises(ValueError, match="pixel_stats"):
        make_explain_fn(model, top_n=3)[0](pixels)


def test_bad_precision_is_one_clear_error():
    model = create_model("small", 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_model(model, precision="float16")


@pytest.mark.slow  # whole compiled explanations compared
def test_bfloat16_backbone_keeps_the_attribution_in_float32():
    model = _random_batch_norms(create_model("small", 4, rngs=nnx.Rngs(0)))
    images = _images(32)
    bf16 = inference_model(model, precision="bfloat16")
    jaxpr = str(jax.make_jaxpr(lambda x: bf16.backbone(x))(images))
    assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr
    assert bf16.backbone.convs[0].kernel.dtype == jnp.float32  # parameters stay float32
    ref = make_attribute_fn(model)(images)
    got = make_attribute_fn(model, precision="bfloat16")(images)
    assert got.maps.dtype == jnp.float32 and got.probs.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got.maps - ref.maps)) / jnp.max(jnp.abs(ref.maps)))
    assert 0 < err < 0.1  # bfloat16 arithmetic did run (not bit-equal), and stays close
    assert make_explain_fn(model, precision="bfloat16")[0](images).attribution.maps.dtype == jnp.float32


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_nan_and_inf_images_name_their_batch_entries_unless_the_check_is_off():
    model = create_model("small", 3, rngs=nnx.Rngs(0))
    images = np.array(_images(32, batch=4))
    images[1, 3, 4, 0] = np.nan
    images[3, 0, 0, 2] = -np.inf
    fn = make_attribute_fn(model, method="gradient")
    for given in (images, jnp.asarray(images)):  # host and device arrays
        with pytest.raises(ValueError, match=r"NaN or inf values \(batch entries \[1, 3\]\)"):
            fn(given)
    assert np.isfinite(fn(images[[0, 2]]).maps).all()
    unchecked = make_attribute_fn(model, method="gradient", check_finite=False)(images).maps
    assert not np.isfinite(unchecked[1]).all() and np.isfinite(unchecked[0]).all()
