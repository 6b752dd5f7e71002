"""Heads that are not piecewise linear (LayerNorm, attention): their structured exact path against float64 brute
force, the head's own curvature shown to matter, integrated-gradients completeness, and the generic path beside it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution import _terms, attribute
from delib_jax.attribution._core import has_taylor, output_functions
from delib_jax.models import PoolMLPHead
from delib_jax.models.norm_heads import NormHead, norm_derivatives
from delib_jax.models.vit import ViTHead
from delib_jax.testing.reference import brute_force_terms

D, C = 6, 5
EQ2 = {"difficulty_channels": "signed"}  # Eq. 2 as written, what the references compute


def _randomise(module, seed, dtype, scale=0.6):
    """Every parameter random (LayerNorm scales and biases too, so that no norm is the identity), cast to dtype."""
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [(jax.random.normal(k, x.shape, jnp.float32) * scale + (x.ndim == 1) * 0.2).astype(dtype)
           for k, x in zip(keys, leaves)]  # fmt: skip
    nnx.update(module, jax.tree.unflatten(tree, new))
    return module


def _features(shape=(2, 3, 4, D), seed=0, dtype=np.float64):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(dtype))


def _head(kind: str, dtype=jnp.float64, seed=0):
    """A class head of each kind, bound where it reads more than A (the ViT head's class token)."""
    rngs = nnx.Rngs(seed)
    if kind == "vit":
        head = _randomise(ViTHead(D, C, num_heads=2, mlp_dim=8, rngs=rngs), seed, dtype)
        return head.bind(jnp.asarray(np.random.RandomState(seed + 7).randn(2, D), dtype))
    return _randomise(NormHead(D, C, place=kind, rngs=rngs), seed, dtype)


def _hardness(dtype=jnp.float64):
    return _randomise(PoolMLPHead(D, 1, hidden=(4,), rngs=nnx.Rngs(3)), 3, dtype)


def _brute_force(g, head, a, second="diagonal"):
    """`brute_force_terms` of g(head(.)), image by image for a head bound to a batch (it reads one class token per
    image)."""
    if not hasattr(head, "cls"):
        return brute_force_terms(lambda x: g(head(x)), a, second)
    cls = head.cls[...]
    parts = [brute_force_terms(lambda x, n=n: g(head.vit.logits(x, cls[n : n + 1])), a[n : n + 1], second)
             for n in range(a.shape[0])]  # fmt: skip
    return tuple(np.concatenate(p) for p in zip(*parts))


def _reference(classifier, hard, a, score, second="diagonal"):
    """Brute-force maps (B, C + 1, H, W) = first + 1/2 second of every class and the difficulty output."""
    class_phi, hard_phi = output_functions(score)
    f1, s1 = _brute_force(class_phi, classifier, a, second)
    if hard_phi is None:
        return f1 + 0.5 * s1
    f2, s2 = brute_force_terms(lambda x: hard_phi(hard(x)), a, second)
    return np.concatenate([f1 + 0.5 * s1, f2 + 0.5 * s2], axis=1)


def _rel_err(x, ref):
    return float(np.abs(np.asarray(x) - ref).max() / max(np.abs(ref).max(), 1e-30))


KINDS = ["after_pool", "before_pool", "vit"]


def test_layer_norm_derivatives_closed_form_equal_autodiff():
    with jax.enable_x64(True):
        rs = np.random.RandomState(0)
        x, t, t2, scale = (jnp.asarray(rs.randn(*s)) for s in ((3, 7), (3, 7), (3, 7), (7,)))
        from delib_jax.models.norm_heads import layer_norm

        f = lambda y: layer_norm(y, scale, jnp.zeros(7), 1e-6)
        y, dy, d2y = norm_derivatives(x, t, t2, scale, 1e-6)
        first = jax.jvp(f, (x,), (t,))[1]
        second = jax.jvp(lambda y: jax.jvp(f, (y,), (t,))[1], (x,), (t2,))[1]
        np.testing.assert_allclose(y, f(x), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dy, first, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(d2y, second, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("score", ["hardness", "entropy", "hesitancy"])
@pytest.mark.slow  # brute-force references
def test_structured_and_generic_paths_match_brute_force_float64(kind, score):
    with jax.enable_x64(True):
        clf, hard, a = _head(kind), _hardness(), _features()
        assert has_taylor(clf)
        ref = _reference(clf, hard, a, score)
        for path in ("fast", "generic"):
            got = attribute(clf, a, hardness_head=hard, score=score, path=path, **EQ2)
            assert got.maps.dtype == jnp.float64
            assert _rel_err(got.maps, ref) <= 1e-6, path
        assert np.abs(np.asarray(got.second_order)).max() > 1e-3 * np.abs(ref).max()  # the comparison has teeth


@pytest.mark.parametrize("kind", KINDS)
def test_the_heads_own_curvature_is_part_of_the_second_order_term(kind):
    """Dropping the head's W (what a piecewise-linear head would give) changes the second-order term: the
    structured path is exact only with it, and brute force agrees with the path that keeps it."""
    with jax.enable_x64(True):
        clf, a = _head(kind), _features(seed=1)
        phi, _ = output_functions("entropy")
        z, u, w = clf.taylor(a, a, second="diagonal")
        assert w is not None and np.abs(np.asarray(w)).max() > 1e-2 * np.abs(np.asarray(u)).max()
        _, with_w = _terms.tangent_terms(phi, z, u, second="diagonal", w=w)
        _, without_w = _terms.tangent_terms(phi, z, u, second="diagonal")
        _, ref = _brute_force(phi, clf, a)
        b, p = ref.shape[:2]
        assert _rel_err(with_w, ref.reshape(b, p, -1)) <= 1e-8
        assert _rel_err(without_w, ref.reshape(b, p, -1)) > 1e-2


@pytest.mark.parametrize("kind", ["after_pool", "before_pool"])
@pytest.mark.slow  # the full Hessian of each image
def test_norm_heads_cross_location_term_matches_brute_force(kind):
    with jax.enable_x64(True):
        clf, hard, a = _head(kind), _hardness(), _features(seed=2)
        ref = _reference(clf, hard, a, "hardness", second="cross")
        got = attribute(clf, a, hardness_head=hard, path="fast", second_order="cross", **EQ2)
        assert _rel_err(got.maps, ref) <= 1e-6


def test_vit_head_cross_location_term_takes_the_generic_path():
    """The ViT head's structured path gives Eq. 2's diagonal term; 'cross' goes to the exact generic path on 'auto'
    and is refused by name on 'fast'."""
    with jax.enable_x64(True):
        clf, a = _head("vit"), _features(seed=3)
        assert not has_taylor(clf, "cross")
        auto = attribute(clf, a, score="entropy", second_order="cross")
        generic = attribute(clf, a, score="entropy", second_order="cross", path="generic")
        np.testing.assert_allclose(auto.maps, generic.maps, rtol=1e-12, atol=1e-14)
        with pytest.raises(ValueError, match="path='generic'"):
            attribute(clf, a, score="entropy", second_order="cross", path="fast")


@pytest.mark.parametrize("kind", KINDS)
def test_integrated_gradients_complete_through_the_structured_path(kind):
    """From a random baseline (a LayerNorm is sharply curved near the zero vector, which no few-node quadrature
    resolves), Gauss-Legendre nodes along a smooth path: the maps sum to the change of every output."""
    with jax.enable_x64(True):
        clf, a, base = _head(kind), _features(seed=4), _features(seed=11)
        options = dict(method="integrated_gradients", steps=64, quadrature="gauss_legendre", baseline=base, **EQ2)
        got = attribute(clf, a, score="entropy", **options)  # every output smooth (no ReLU kinks on the path)
        assert float(np.abs(np.asarray(got.residual)).max()) <= 1e-10
        generic = attribute(clf, a, score="entropy", path="generic", **options)
        np.testing.assert_allclose(got.maps, generic.maps, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_structured_path_close_to_float64(kind):
    a64 = _features(seed=5)
    with jax.enable_x64(True):
        ref = attribute(_head(kind), a64, hardness_head=_hardness(), **EQ2).maps
    clf = _head(kind, dtype=jnp.float32)
    got = attribute(clf, jnp.asarray(a64, jnp.float32), hardness_head=_hardness(jnp.float32), **EQ2)
    assert got.maps.dtype == jnp.float32
    assert _rel_err(got.maps, np.asarray(ref)) <= 1e-4


def test_unbound_vit_head_says_how_to_bind_it():
    head = ViTHead(D, C, num_heads=2, mlp_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="class token"):
        head(jnp.zeros((1, 2, 2, D)))
    bound = head.bind(jnp.zeros((3, D)))
    with pytest.raises(ValueError, match="bound to 3 class tokens"):
        bound(jnp.zeros((1, 2, 2, D)))
