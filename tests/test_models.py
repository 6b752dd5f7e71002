"""Backbones, heads and weight import: shapes, parameter counts, torchvision equivalence, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.models import count_params, create_model, load_torchvision, predict, read_state_dict

TORCHVISION_PARAMS = {"vgg16": 138_357_544, "vgg16_bn": 138_365_992, "resnet50": 25_557_032, "alexnet": 61_100_840}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(arch):
    model = nnx.eval_shape(lambda: create_model(arch, 1000, hardness="none"))
    assert count_params(model) == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize(
    "arch,shape",
    [("vgg16", (14, 14, 512)), ("vgg16_bn", (14, 14, 512)), ("resnet50", (7, 7, 2048)), ("alexnet", (13, 13, 256))],
)
def test_feature_tensor_shape_at_224(arch, shape):
    spec = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda x: create_model(arch, 200)(x), spec)
    assert out.features.shape == (2, *shape)
    assert out.logits.shape == (2, 200)
    assert out.hardness_logit.shape == (2,)


def test_separate_hardness_network_has_its_own_features():
    model = create_model("small", 5, hardness="network", rngs=nnx.Rngs(1))
    model.eval()
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    a = model.features(x)
    a_s = model.hardness_features(x, a)
    assert a_s.shape == a.shape and not np.allclose(a_s, a)
    assert model.hardness_kind == "network"
    np.testing.assert_allclose(predict(model, x).hardness_logit, model.hardness_logit(a_s), rtol=1e-5, atol=1e-6)


def test_hardness_in_unit_interval_and_heads_are_pure_functions():
    from delib_jax.difficulty import hardness

    model = create_model("small", 7, rngs=nnx.Rngs(0))
    model.eval()
    x = jnp.asarray(np.random.RandomState(1).randn(4, 32, 32, 3) * 3, jnp.float32)
    out = predict(model, x)
    s = np.asarray(hardness(out.hardness_logit))
    assert s.shape == (4,) and np.all((s >= 0) & (s <= 1))
    graphdef, state = nnx.split(model.classifier)
    pure = jax.jit(lambda st, a: nnx.merge(graphdef, st)(a))
    np.testing.assert_allclose(pure(state, out.features), out.logits, rtol=1e-5, atol=1e-6)


def test_split_leaves_rebuilds_the_model_inside_jit_and_keys_a_cache():
    from delib_jax.models import make_predict_fn, split_leaves

    model = create_model("small", 5, rngs=nnx.Rngs(3))
    model.eval()
    x = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3), jnp.float32)
    structure, leaves = split_leaves(model)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    out = jax.jit(lambda ls, x: structure.merge(ls)(x).logits)(leaves, x)
    np.testing.assert_allclose(out, predict(model, x).logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(make_predict_fn(model)(x).logits, out, rtol=1e-6, atol=1e-6)
    # same architecture, other weights: an equal (hashable) structure, so compiled functions keyed on it are reused
    twin = create_model("small", 5, rngs=nnx.Rngs(4))
    twin.eval()
    other, _ = split_leaves(twin)
    assert hash(other) == hash(structure) and other == structure
    training = create_model("small", 5, rngs=nnx.Rngs(4))
    training.train()
    assert split_leaves(training)[0] != structure  # train mode: another program
    assert split_leaves(create_model("small", 6))[0] != structure


@pytest.mark.parametrize(
    "images,match",
    [
        (np.zeros((2, 32, 32, 4), np.float32), "channels"),
        (np.zeros((2, 3, 32, 32), np.float32), "channels"),
        (np.zeros((32, 32, 3), np.float32), "rank 4"),
        (np.zeros((2, 32, 32, 3), np.uint8), "floating point"),
        (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN"),
        ([[1.0]], "array"),
    ],
)
def test_bad_images_give_one_clear_error(images, match):
    model = create_model("small", 3)
    with pytest.raises(ValueError, match=match):
        predict(model, images)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_models_are_created_ready_for_inference():
    """create_model returns eval mode: calls use the running batch-norm statistics and never change them; predict
    and make_predict_fn give eval-mode outputs for a model switched to train mode, and leave it in train mode."""
    from delib_jax.models import make_predict_fn

    model = create_model("small", 3, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3) * 2 + 1, jnp.float32)
    stats = [np.asarray(v).copy() for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    first = model.features(x)
    np.testing.assert_array_equal(model.features(x[:2]), first[:2])  # no batch statistics: per-image results
    assert all(np.array_equal(a, b) for a, b in zip(stats, jax.tree.leaves(nnx.state(model, nnx.BatchStat))))
    expected = predict(model, x)
    model.train()
    for out in (predict(model, x), make_predict_fn(model)(x)):
        np.testing.assert_allclose(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert model.backbone.norms[0].use_running_average is False


def test_bad_options():
    with pytest.raises(ValueError, match="unknown arch"):
        create_model("vgg19", 10)
    with pytest.raises(ValueError, match="hardness"):
        create_model("small", 10, hardness="yes")
    with pytest.raises(ValueError, match="at least 2"):
        create_model("small", 1)


# --- weight import against PyTorch on the same random weights ---------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.mark.slow  # full-size models, in JAX and in PyTorch
@pytest.mark.parametrize("arch,size", [("vgg16", 112), ("vgg16_bn", 112), ("alexnet", 224), ("resnet50", 64)])
def test_torchvision_import_gives_same_logits(arch, size, tmp_path):
    from delib_jax.testing import torch_models

    torch.manual_seed(0)
    ref_model = torch_models.build(arch, num_classes=10)
    np.savez(tmp_path / "w.npz", **torch_models.state_dict_numpy(ref_model))
    model = create_model(arch, 10, hardness="none")
    load_torchvision(model, tmp_path / "w.npz")
    x = np.random.RandomState(0).randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x)).numpy()
        ref_a = ref_model.feature_map(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    # the README's route first: model.features right after the import, on the model as create_model returned it
    # (in train mode batch norm used the batch's statistics and overwrote the imported ones)
    a = model.features(jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(a) - ref_a).max() <= 1e-4 * np.abs(ref_a).max()
    out = predict(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(out.features) - ref_a).max() <= 1e-4 * np.abs(ref_a).max()
    assert np.abs(np.asarray(out.logits) - ref).max() <= 1e-4 * np.abs(ref).max()


def _alexnet_state():
    from delib_jax.testing import torch_models

    torch.manual_seed(0)
    return torch_models.state_dict_numpy(torch_models.build("alexnet", num_classes=10))


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_weight_errors_name_missing_unexpected_and_misshaped_keys():
    sd = _alexnet_state()
    sd.pop("features.3.weight")
    sd["features.99.weight"] = np.zeros(3, np.float32)
    sd["classifier.4.weight"] = np.zeros((10, 10), np.float32)
    model = create_model("alexnet", 10, hardness="none")
    with pytest.raises(ValueError) as err:
        load_torchvision(model, sd)
    msg = str(err.value)
    assert "missing keys (1): features.3.weight" in msg
    assert "unexpected keys (1): features.99.weight" in msg
    assert "classifier.4.weight: file has (10, 10), model needs (4096, 4096)" in msg
    assert "\n" not in msg  # one line: the training CLIs print it as their error


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_imagenet_head_dropped_for_other_class_counts(tmp_path):
    from safetensors.numpy import save_file

    sd = _alexnet_state()  # a 10-class file into a 7-class model
    save_file(sd, str(tmp_path / "w.safetensors"))
    model = create_model("alexnet", 7)
    before = np.asarray(model.classifier.linears[2].kernel[...]).copy()
    load_torchvision(model, tmp_path / "w.safetensors", classifier_output=False)
    np.testing.assert_array_equal(model.classifier.linears[2].kernel[...], before)
    np.testing.assert_array_equal(model.backbone.convs[0].kernel[...], sd["features.0.weight"].transpose(2, 3, 1, 0))


def test_pth_read_with_weights_only(tmp_path):
    sd = {"module.fc.weight": torch.ones(2, 3), "module.fc.bias": torch.zeros(2)}
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    out = read_state_dict(tmp_path / "w.pth")
    assert sorted(out) == ["fc.bias", "fc.weight"] and out["fc.weight"].shape == (2, 3)


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_state_dict(tmp_path / "nope.npz")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported weights format"):
        read_state_dict(tmp_path / "w.bin")
    with pytest.raises(ValueError, match="no torchvision weights"):
        load_torchvision(create_model("small", 3), {})


@pytest.mark.parametrize("name", ["w.safetensors", "w.npz", "w.pth"])
def test_garbage_weights_file_is_one_value_error_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match=f"weights file {path} is not a readable") as e:
        read_state_dict(path)
    assert "\n" not in str(e.value)
    torch.save([1, 2], tmp_path / "list.pth")  # readable, but not a state dict
    with pytest.raises(ValueError, match="expected a state dict"):
        read_state_dict(tmp_path / "list.pth")


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_small_cnn_stride_follows_its_pools():
    from delib_jax.models.backbones import SmallCNN

    x = jnp.zeros((1, 64, 64, 3))
    assert SmallCNN(rngs=nnx.Rngs(0))(x).shape == (1, 8, 8, 128)
    assert SmallCNN(pools=2, rngs=nnx.Rngs(0))(x).shape == (1, 16, 16, 128)
