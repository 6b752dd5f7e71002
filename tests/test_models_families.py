"""The ResNet family (18, 34, 101, 152) and ConvNeXt (tiny, small, base): exact torchvision import, parameter counts,
feature grids, wrong-architecture weights, preprocessing, stages and precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution.stages import split_model, stage_names
from delib_jax.models import ARCHS, DeliberativeModel, count_params, create_model, load_torchvision, predict
from delib_jax.models.convnext import ConvNeXt, class_head

# torchvision's num_params of each model's IMAGENET1K_V1 weights (1,000 classes)
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
}
LARGE = ("resnet101", "resnet152", "convnext_small", "convnext_base")
ARCH_PARAMS = [pytest.param(a, marks=pytest.mark.slow) if a in LARGE else a for a in TORCHVISION_PARAMS]


def _assert_close_to_scale(got, ref, rtol=1e-5):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert np.isfinite(scale) and scale > 0
    err = float(np.abs(got - ref).max())
    assert err <= rtol * scale, f"max error {err:.3g} at logit scale {scale:.3g}"


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(arch):
    model = nnx.eval_shape(lambda: create_model(arch, 1000, hardness="none"))
    assert count_params(model) == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize(
    "arch,shape",
    [
        ("resnet18", (7, 7, 512)),
        ("resnet34", (7, 7, 512)),
        ("resnet101", (7, 7, 2048)),
        ("resnet152", (7, 7, 2048)),
        ("convnext_tiny", (7, 7, 768)),
        ("convnext_small", (7, 7, 768)),
        ("convnext_base", (7, 7, 1024)),
    ],
)
def test_feature_grid_at_224_with_hardness_head(arch, shape):
    spec = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda x: create_model(arch, 200)(x), spec)
    assert out.features.shape == (2, *shape)
    assert out.logits.shape == (2, 200)
    assert out.hardness_logit.shape == (2,)


def _small_convnext(depths=(1, 2), dims=(8, 16), classes=3) -> DeliberativeModel:
    """A two-stage ConvNeXt with a ConvNeXt class head, in eval mode (labelled convnext_tiny for its key map)."""
    rngs = nnx.Rngs(0)
    model = DeliberativeModel(
        ConvNeXt(depths, dims, rngs=rngs), class_head(dims[-1], classes, rngs=rngs), arch="convnext_tiny"
    )
    model.eval()
    return model


def _split_logits(model, stage: str, x: jax.Array) -> tuple[tuple, jax.Array]:
    """The shape of X at ``stage`` and head(features(x)), compiled (the modules' weights are constants)."""
    features, head = split_model(model, stage)
    return jax.eval_shape(features, x).shape, jax.jit(lambda x: head(features(x)))(x)


def test_small_convnext_splits_at_every_stage():
    model = _small_convnext()
    x = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3), jnp.float32)
    logits = predict(model, x).logits
    names = stage_names(model)
    assert names == ("image", "stem", "stage1.0", "stage1", "stage2.0", "stage2.1", "stage2", "A")
    shapes = {"stem": (8, 8, 8), "stage1": (8, 8, 8), "stage2.0": (4, 4, 16), "A": (4, 4, 16)}
    for stage in names:
        shape, z = _split_logits(model, stage, x)
        assert shape == (2, *shapes.get(stage, shape[1:]))
        _assert_close_to_scale(z, logits)


def test_resnet18_split_at_layer3():
    model = create_model("resnet18", 5, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.RandomState(3).randn(2, 64, 64, 3), jnp.float32)
    shape, z = _split_logits(model, "layer3", x)
    assert shape == (2, 4, 4, 256)
    assert "layer1.1" in stage_names(model) and "layer1.2" not in stage_names(model)
    _assert_close_to_scale(z, predict(model, x).logits)


def test_convnext_bfloat16_runs_its_linears_in_bfloat16():
    from delib_jax.models import make_predict_fn
    from delib_jax.models._inference import inference_model

    model = _small_convnext((1, 1), (8, 16))
    fast = inference_model(model, precision="bfloat16")
    assert fast.backbone.stages[0][0].fc1.dtype == jnp.bfloat16 and model.backbone.stages[0][0].fc1.dtype is None
    x = jnp.asarray(np.random.RandomState(4).randn(2, 32, 32, 3), jnp.float32)
    _assert_close_to_scale(make_predict_fn(model, precision="bfloat16")(x).logits, predict(model, x).logits, 5e-2)


tvt = pytest.importorskip("delib_jax.testing.torchvision")
torch = pytest.importorskip("torch")


def _randomised(sd: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Every floating entry off its initial value: weight tensors by 30 % of themselves, vectors (norm weights and
    biases, ConvNeXt's layer scales, batch-norm means: initialised to 1, 0 or 1e-6) by noise of scale 0.3, batch-norm
    variances by a positive factor."""
    rng = np.random.RandomState(seed)
    out = {}
    for k, w in sd.items():
        if not np.issubdtype(w.dtype, np.floating):
            out[k] = w
            continue
        n = rng.standard_normal(w.shape).astype(np.float32)
        if k.endswith("running_var"):
            out[k] = w * np.exp(0.2 * n)
        elif w.size == w.shape[0]:  # (D,) and the layer scales (D, 1, 1)
            out[k] = w + 0.3 * n
        else:
            out[k] = w * (1 + 0.3 * n)
    return out


def _torch_with_random_weights(net) -> dict[str, np.ndarray]:
    """Randomise ``net``'s state dict in place; return it as numpy."""
    sd = _randomised(tvt.state_dict_numpy(net))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return sd


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_import_gives_torchvision_logits(arch):
    net = tvt.build(arch, num_classes=10)
    sd = _torch_with_random_weights(net)
    x = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    ref = tvt.logits(net, x)
    # built from shapes, then filled: no random initialisation (which compiles one program per parameter shape),
    # and a parameter the key map missed would leave an abstract array the forward cannot run on
    model = load_torchvision(nnx.eval_shape(lambda: create_model(arch, 10, hardness="none")), sd)
    _assert_close_to_scale(predict(model, jnp.asarray(x)).logits, ref)


def test_small_convnext_imports_exactly():
    """A two-stage ConvNeXt (depths (1, 2), dims (8, 16)) against torchvision's class with the same settings."""
    cn = tvt.torchvision().models.convnext
    torch.manual_seed(0)
    net = cn.ConvNeXt([cn.CNBlockConfig(8, 16, 1), cn.CNBlockConfig(16, None, 2)], num_classes=3).eval()
    model = load_torchvision(_small_convnext(), _torch_with_random_weights(net))
    x = np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32)
    _assert_close_to_scale(predict(model, jnp.asarray(x)).logits, tvt.logits(net, x))


def test_small_convnext_keeps_its_own_class_layer_with_other_class_counts():
    """classifier_output=False: a 10-class torchvision head into a 3-class model; A and the head's norm imported."""
    cn = tvt.torchvision().models.convnext
    torch.manual_seed(1)
    net = cn.ConvNeXt([cn.CNBlockConfig(8, 16, 1), cn.CNBlockConfig(16, None, 2)], num_classes=10).eval()
    sd = _torch_with_random_weights(net)
    model = _small_convnext()
    before = np.asarray(model.classifier.linear.kernel[...])
    load_torchvision(model, sd, classifier_output=False)
    np.testing.assert_array_equal(model.classifier.linear.kernel[...], before)
    np.testing.assert_array_equal(model.classifier.norm.scale[...], sd["classifier.0.weight"])
    x = np.random.RandomState(3).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        ref = net.features(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    _assert_close_to_scale(predict(model, jnp.asarray(x)).features, ref)


def _zero_state_dict(arch: str) -> dict[str, np.ndarray]:
    """torchvision's ``arch`` keys and shapes (built on the meta device: no initialisation), as zeros."""
    with torch.device("meta"):
        net = getattr(tvt.torchvision().models, arch)(weights=None, num_classes=10)
    return {k: np.zeros(tuple(v.shape), np.float32) for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "source,target,match",
    [
        ("resnet18", "resnet34", r"resnet34; missing keys \(80\): layer1\.2\.bn1\.bias"),
        ("resnet18", "resnet50", r"missing keys \(165\).*mis-shaped keys \(24\): layer1\.0\.conv1\.weight: file has"),
        ("resnet50", "resnet18", r"unexpected keys \(165\): layer1\.0\.bn3\.bias"),
        ("convnext_tiny", "convnext_small", r"convnext_small; missing keys \(162\): features\.5\.10\.block"),
        ("convnext_tiny", "convnext_base", r"mis-shaped keys \(181\): features\.0\.0\.weight: file has \(96,"),
    ],
)
def test_wrong_architecture_weights_are_one_value_error(source, target, match):
    model = nnx.eval_shape(lambda: create_model(target, 10, hardness="none"))  # checked before any value is set
    with pytest.raises(ValueError, match=match) as info:
        load_torchvision(model, _zero_state_dict(source))
    assert "\n" not in str(info.value)


def test_preprocessing_follows_torchvision_weights():
    """resize / crop of each architecture equal its IMAGENET1K_V1 weights' transforms (all bilinear, antialiased)."""
    weights = {
        "resnet18": "ResNet18_Weights",
        "resnet34": "ResNet34_Weights",
        "resnet101": "ResNet101_Weights",
        "resnet152": "ResNet152_Weights",
        "convnext_tiny": "ConvNeXt_Tiny_Weights",
        "convnext_small": "ConvNeXt_Small_Weights",
        "convnext_base": "ConvNeXt_Base_Weights",
    }
    for arch, name in weights.items():
        t = tvt.torchvision().models.get_weight(f"{name}.IMAGENET1K_V1").transforms()
        assert (ARCHS[arch].resize, ARCHS[arch].crop) == (t.resize_size[0], t.crop_size[0]), arch
        assert t.interpolation.value == "bilinear" and t.antialias
