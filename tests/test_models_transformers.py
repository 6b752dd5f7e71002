"""ViT (vit_b_16, vit_b_32) and Swin (swin_t) imported from torchvision: logits equal torchvision's on the same
random weights, parameter counts, feature grids, the ViT head bound to its class token, split_model's stages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.models import DeliberativeModel, count_params, create_model, load_torchvision, predict
from delib_jax.models.swin import Swin, swin_head
from delib_jax.models.vit import ViT, ViTHead

TORCHVISION_PARAMS = {"vit_b_16": 86_567_656, "vit_b_32": 88_224_232, "swin_t": 28_288_354}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(arch):
    model = nnx.eval_shape(lambda: create_model(arch, 1000, hardness="none"))
    assert count_params(model) == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize(
    "arch,shape", [("vit_b_16", (14, 14, 768)), ("vit_b_32", (7, 7, 768)), ("swin_t", (7, 7, 768))]
)
def test_feature_grid_at_224(arch, shape):
    spec = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda x: create_model(arch, 200)(x), spec)
    assert out.features.shape == (2, *shape)
    assert out.logits.shape == (2, 200)
    assert out.hardness_logit.shape == (2,)


TINY_VIT = dict(image_size=32, patch_size=8, width=16, depth=3, num_heads=2, mlp_dim=24)
TINY_SWIN = dict(patch_size=2, embed_dim=8, depths=(2, 2), num_heads=(2, 4), window_size=4)


def tiny_vit(num_classes: int = 5, seed: int = 0) -> DeliberativeModel:
    """A 3-block ViT on 32 px images (patch 8: a 4 x 4 grid), keyed as torchvision's ViT (arch vit_b_16)."""
    rngs = nnx.Rngs(seed)
    head = ViTHead(16, num_classes, num_heads=2, mlp_dim=24, rngs=rngs)
    model = DeliberativeModel(ViT(**TINY_VIT, rngs=rngs), head, arch="vit_b_16")
    model.eval()
    return model


def tiny_swin(num_classes: int = 5, seed: int = 0) -> DeliberativeModel:
    """A two-stage Swin (width 8 then 16, window 4), keyed as torchvision's Swin (arch swin_t)."""
    rngs = nnx.Rngs(seed)
    backbone = Swin(**TINY_SWIN, rngs=rngs)
    model = DeliberativeModel(backbone, swin_head(backbone.out_channels, num_classes, rngs=rngs), arch="swin_t")
    model.eval()
    return model


def _images(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def test_vit_of_another_size_is_one_value_error():
    model = tiny_vit()
    with pytest.raises(ValueError, match="takes 32 x 32 images") as err:
        model.features(_images((1, 40, 40, 3)))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="224 x 224"):
        jax.eval_shape(lambda x: create_model("vit_b_16", 10)(x), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))


def test_vit_head_bound_to_its_class_token_gives_the_logits():
    model = tiny_vit()
    x = _images((2, 32, 32, 3), 1)
    a, head = model.features_and_classifier(x)
    assert a.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(head(a), predict(model, x).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class token") as err:
        model.classifier(a)
    assert "\n" not in str(err.value)


def test_split_model_vit_only_at_the_image():
    from delib_jax.attribution import split_model, stage_names

    model = tiny_vit()
    x = _images((2, 32, 32, 3), 2)
    features, head = split_model(model, "image", hardness=False)
    np.testing.assert_allclose(head(features(x)), predict(model, x).logits, rtol=1e-5, atol=1e-6)
    assert stage_names(model) == ("image",)
    for stage in ("A", "stem"):
        with pytest.raises(ValueError, match="only at 'image'.*features_and_classifier") as err:
            split_model(model, stage)
        assert "\n" not in str(err.value)


def test_split_model_swin_stages_compose_to_the_model():
    from delib_jax.attribution import split_model, stage_names

    model = tiny_swin()
    x = _images((1, 18, 18, 3), 3)
    logits = predict(model, x).logits
    names = stage_names(model)
    assert names == ("image", "stem", "stage1.0", "stage1.1", "stage1", "stage2.0", "stage2.1", "stage2", "A")
    for stage in ("stem", "stage1", "stage2.0"):  # image and A: the full backbone on one side (tested elsewhere)
        features, head = split_model(model, stage)
        composed = jax.jit(lambda x, features=features, head=head: head(features(x)))
        np.testing.assert_allclose(composed(x), logits, rtol=1e-5, atol=1e-5)
    features, _ = split_model(model, "stage1")
    assert jax.eval_shape(features, x).shape == (1, 9, 9, 8)


def test_swin_t_split_at_stage3_composes():
    from delib_jax.attribution import split_model

    def run(x):  # shapes only: the model is built inside the trace (no 28M random weights)
        features, head = split_model(create_model("swin_t", 4, hardness="none"), "stage3")
        xs = features(x)
        return xs, head(xs)

    xs, z = jax.eval_shape(run, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert xs.shape == (1, 14, 14, 384) and z.shape == (1, 4)


# --- against real torchvision on the same random weights ---------------------------------------------------------

torch = pytest.importorskip("torch")


def _close(ours, ref, rtol=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max error {err:.3g}, logit scale {np.abs(ref).max():.3g}"


def _torch_tiny_vit(num_classes=5):
    from delib_jax.testing.torchvision import torch_tiny_vit

    return torch_tiny_vit(num_classes)


def _torch_tiny_swin(num_classes=5):
    from delib_jax.testing.torchvision import torchvision

    tv = torchvision()
    torch.manual_seed(0)
    net = tv.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=num_classes
    )
    from delib_jax.testing.torchvision import randomise

    return randomise(net)


def test_tiny_vit_equals_torchvision():
    from delib_jax.testing.torchvision import logits, state_dict_numpy

    ref = _torch_tiny_vit()
    model = load_torchvision(tiny_vit(), state_dict_numpy(ref))
    x = np.random.RandomState(4).randn(2, 32, 32, 3).astype(np.float32)
    _close(predict(model, jnp.asarray(x)).logits, logits(ref, x))
    a, head = model.features_and_classifier(jnp.asarray(x))
    _close(head(a), logits(ref, x))


@pytest.mark.parametrize(
    "hw",
    [
        (16, 16),  # grids 8 then 4: multiples of the window, shifted windows in stage 1, shift off in stage 2
        (18, 18),  # grid 9: padded to 12 inside the attention; merging pads it to 10; stage 2 grid 5 padded to 8
        (18, 12),  # grids 9 x 6, then 5 x 3: shifted along H only in stage 2 (the window covers the padded W)
    ],
)
def test_tiny_swin_equals_torchvision(hw):
    from delib_jax.testing.torchvision import logits, state_dict_numpy

    ref = _torch_tiny_swin()
    model = load_torchvision(tiny_swin(), state_dict_numpy(ref))
    x = np.random.RandomState(5).randn(2, *hw, 3).astype(np.float32)
    _close(predict(model, jnp.asarray(x)).logits, logits(ref, x))


def test_swin_relative_position_index_is_checked_not_loaded():
    from delib_jax.testing.torchvision import state_dict_numpy

    sd = state_dict_numpy(_torch_tiny_swin())
    key = "features.1.0.attn.relative_position_index"
    assert key in sd  # a buffer in torchvision's state dict
    load_torchvision(tiny_swin(), sd)  # present: no 'unexpected keys'
    load_torchvision(tiny_swin(), {k: v for k, v in sd.items() if not k.endswith("relative_position_index")})
    sd[key] = sd[key][::-1].copy()
    with pytest.raises(ValueError, match=f"{key}: file's values differ"):
        load_torchvision(tiny_swin(), sd)


@pytest.mark.parametrize("build", ["vit", "swin"])
def test_import_with_another_number_of_classes_keeps_the_new_output_layer(build):
    from delib_jax.testing.torchvision import state_dict_numpy

    ref, model = (_torch_tiny_vit(7), tiny_vit(5)) if build == "vit" else (_torch_tiny_swin(7), tiny_swin(5))
    out = model.classifier.head if build == "vit" else model.classifier.linear
    before = np.asarray(out.kernel[...]).copy()
    load_torchvision(model, state_dict_numpy(ref), classifier_output=False)
    np.testing.assert_array_equal(out.kernel[...], before)
    key = "heads.head.weight" if build == "vit" else "head.weight"
    with pytest.raises(ValueError, match=f"{key}: file has \\(7, 16\\), model needs \\(5, 16\\)"):
        load_torchvision(model, state_dict_numpy(ref))


def test_swin_state_dict_into_a_vit_is_one_value_error():
    from delib_jax.testing.torchvision import state_dict_numpy

    with pytest.raises(ValueError, match="weights do not match torchvision's vit_b_16.*missing keys") as err:
        load_torchvision(tiny_vit(), state_dict_numpy(_torch_tiny_swin()))
    assert "\n" not in str(err.value)


@pytest.mark.slow  # full-size models, one forward each in JAX and in PyTorch (5-20 s each on 2 cores)
@pytest.mark.parametrize("arch", ["vit_b_16", "vit_b_32", "swin_t"])
def test_torchvision_import_gives_same_logits(arch):
    from delib_jax.testing.torchvision import build, logits, randomise, state_dict_numpy

    ref = randomise(build(arch, num_classes=10))
    # built abstract (no random init of the full model): every variable must come from the file, so a leaf the key
    # map missed stays a shape and the forward fails
    model = load_torchvision(nnx.eval_shape(lambda: create_model(arch, 10, hardness="none")), state_dict_numpy(ref))
    x = np.random.RandomState(6).randn(1, 224, 224, 3).astype(np.float32)
    _close(predict(model, jnp.asarray(x)).logits, logits(ref, x))


@pytest.mark.slow  # a full-size state dict
def test_swin_t_state_dict_into_vit_b_16_is_one_value_error():
    from delib_jax.testing.torchvision import build, state_dict_numpy

    sd = state_dict_numpy(build("swin_t", num_classes=10))
    with pytest.raises(ValueError, match="weights do not match torchvision's vit_b_16") as err:
        load_torchvision(nnx.eval_shape(lambda: create_model("vit_b_16", 10, hardness="none")), sd)
    assert "\n" not in str(err.value)
