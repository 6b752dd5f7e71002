"""Readable explanations: the share of the image's ambiguity (strength a person can read), negligible insecurities."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax import insecurity as insec
from delib_jax.explanation import Explanation, explain
from delib_jax.models import create_model


@pytest.fixture(scope="module")
def explanations():
    model = create_model("small", 6, rngs=nnx.Rngs(0))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    images = ((pixels / 255.0 - 0.45) / 0.27).astype(np.float32)
    return explain(model, images, coverage=0.1, max_insecurities=3)


def _brute_force_shares(e: Explanation) -> list[float]:
    """Every pair's upsampled ambiguity map, summed: the total; each insecurity's map over its mask: its part."""
    maps = jnp.asarray(e.class_maps)[None]
    amb = insec.ambiguity_maps(maps, jnp.asarray(e.difficulty_map)[None])  # (1, R, H, W), clamped product
    up = np.asarray(insec.upsample(amb, e.image_size), np.float64)[0]
    ia, ib = insec.pair_indices(len(e.classes))
    where = {int(c): j for j, c in enumerate(e.classes)}
    total = up.sum()
    shares = []
    for q in e.insecurities:
        r = next(r for r in range(len(ia)) if {ia[r], ib[r]} == {where[q.a], where[q.b]})
        shares.append(up[r][q.mask].sum() / total)
    return shares


def test_shares_are_the_share_of_the_image_ambiguity(explanations):
    for e in explanations:
        assert len(e.shares) == len(e.insecurities) >= 1
        np.testing.assert_allclose(e.shares, _brute_force_shares(e), rtol=1e-4)
        assert all(0 < s <= 1 for s in e.shares)
        assert sum(e.shares) <= 1 + 1e-6  # regions of different pairs: parts of one total
        # at a fixed coverage the share ranks the insecurities as the raw strength does (one denominator per image)
        assert list(e.shares) == sorted(e.shares, reverse=True)


def test_shares_do_not_depend_on_the_scale_of_the_maps(explanations):
    """Raw strengths of two images differ by orders of magnitude; shares of the same pattern do not."""
    e = explanations[0]
    small = dataclasses.replace(e, maps=e.maps * np.float32(1e-4))
    np.testing.assert_allclose(small.shares, e.shares, rtol=1e-4)


def _with_probs(e: Explanation, probs: np.ndarray) -> Explanation:
    return dataclasses.replace(e, probs=np.asarray(probs, np.float32))


def test_negligible_rule(explanations):
    e = explanations[0]
    c = len(e.probs)
    confident = np.full(c, 0.002 / (c - 1))
    confident[e.prediction] = 0.998
    quiet = _with_probs(e, confident)
    assert all(quiet.negligible) and quiet.competing == ()
    doubtful = np.full(c, 1.0 / c)
    torn = _with_probs(e, doubtful)
    assert not any(torn.negligible) and torn.competing == e.insecurities
    assert insec.is_negligible(0.5, 0.009) and not insec.is_negligible(0.5, 0.01)


def test_json_carries_share_and_negligible(explanations):
    e = explanations[0]
    data = json.loads(json.dumps(e.to_json()))
    assert [q["share"] for q in data["insecurities"]] == list(e.shares)
    assert [q["negligible"] for q in data["insecurities"]] == list(e.negligible)
    back = Explanation.from_json(data)
    np.testing.assert_allclose(back.shares, e.shares)


def test_no_insecurity_has_no_shares(explanations):
    e = dataclasses.replace(explanations[0], insecurities=())
    assert e.shares == () and e.negligible == () and e.competing == ()


# ------------------------------------------------------------------------------------------------ model vs run config


def test_explain_refuses_class_names_of_another_run_before_computing():
    model = create_model("small", 6, rngs=nnx.Rngs(0))
    images = np.zeros((1, 48, 48, 3), np.float32)
    with pytest.raises(ValueError, match="10 class names for a model of 6 classes"):
        explain(model, images, class_names=[str(i) for i in range(10)])


def test_explain_files_refuses_another_runs_config_and_writes_nothing(tmp_path):
    from delib_jax.checkpoint import RunConfig, build_model
    from delib_jax.stream import JobOptions, explain_files

    names = [f"c{i}" for i in range(10)]
    config = RunConfig(arch="small", num_classes=10, class_names=names, crop=48, resize=56)
    model = build_model(RunConfig(arch="small", num_classes=4, class_names=names[:4], crop=48, resize=56))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="the model has 4 classes, the run configuration 10"):
        explain_files(model, config, [image], out, options=JobOptions(workers=0, progress=False))
    assert not out.exists()
    vgg = RunConfig(arch="vgg16", num_classes=4, class_names=names[:4], crop=64, resize=72)
    with pytest.raises(ValueError, match="the model is a small, the run configuration a vgg16"):
        explain_files(model, vgg, [image], out, options=JobOptions(workers=0, progress=False))
    assert not out.exists()


def test_delib_explain_refuses_a_model_that_is_not_its_configs(tmp_path, capsys, monkeypatch):
    from delib_jax import checkpoint
    from delib_jax.checkpoint import RunConfig, build_model, save_run_config
    from delib_jax.cli import main

    names = [f"c{i}" for i in range(10)]
    config = RunConfig(arch="small", num_classes=10, class_names=names, crop=48, resize=56)
    save_run_config(tmp_path / "run", config)
    other = build_model(RunConfig(arch="small", num_classes=4, class_names=names[:4], crop=48, resize=56))
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: (other, config))
    from PIL import Image

    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    code = main(["explain", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "disagree" in err and "4 classes" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


# ------------------------------------------------------------------------------------------------ legible figures

CUB_NAMES = [
    "Scissor_tailed_Flycatcher", "Summer_Tanager", "Black_footed_Albatross", "Yellow_bellied_Flycatcher",
    "Chuck_will_Widow", "Red_winged_Blackbird",
]  # fmt: skip


def _figure_explanation(explanations, probs=None) -> Explanation:
    e = explanations[0]
    names = tuple(CUB_NAMES[int(c)] for c in e.classes)
    items = tuple(dataclasses.replace(q, name_a=CUB_NAMES[q.a], name_b=CUB_NAMES[q.b]) for q in e.insecurities)
    probs = np.full(len(e.probs), 1 / len(e.probs), np.float32) if probs is None else probs
    return dataclasses.replace(
        e, class_names=names, insecurities=items, prediction_name=CUB_NAMES[e.prediction], probs=probs
    )


def _texts(fig):
    """(text, window extent) of every visible non-empty text of the drawn figure."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and t.axes is None or (t.axes is not None and t.get_visible()):
            if t.get_text().strip():
                found.append((t.get_text(), t.get_window_extent(renderer)))
    return found


@pytest.mark.parametrize("with_examples", [False, True])
def test_figure_names_whole_and_inside_the_canvas(explanations, with_examples):
    from delib_jax.visualize import explanation_figure

    e = _figure_explanation(explanations)
    image = np.zeros((*e.image_size, 3), np.uint8)
    examples = {c: np.full((20, 20, 3), 80 * (c % 3), np.uint8) for c in range(6)} if with_examples else None
    fig = explanation_figure(e, image, examples=examples)
    texts = _texts(fig)
    tokens = {w for text, _ in texts for w in text.split()}
    shown = {*e.class_names, *(n for q in e.insecurities for n in (q.name_a, q.name_b))}
    for name in shown:  # every word of every name whole: nothing cut mid-word, no ellipsis
        assert set(name.split("_")) <= tokens, (name, sorted(tokens))
    assert not any("…" in text for text, _ in texts)
    width, height = fig.canvas.get_width_height()
    for text, box in texts:  # nothing clipped at an edge
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (text, box)
    rows = {round(ax.get_position().y0, 2) for ax in fig.axes if ax.get_images()}
    assert (len(rows) == 1) == (not with_examples)  # no empty bottom row without examples
    assert any("of the ambiguity" in text for text, _ in texts)  # the readable strength, not 1e-13


def test_figure_of_an_image_where_nothing_competes(explanations):
    from delib_jax.visualize import explanation_figure

    e = explanations[0]
    probs = np.full(len(e.probs), 0.001, np.float32)
    probs[e.prediction] = 1 - 0.001 * (len(probs) - 1)
    e = _figure_explanation(explanations, probs)
    assert e.insecurities and not e.competing
    fig = explanation_figure(e, np.zeros((*e.image_size, 3), np.uint8))
    texts = [text for text, _ in _texts(fig)]
    assert any("nothing competes" in t for t in texts)
    assert not any(t.startswith("1. ") for t in texts)  # no region drawn on an image where no two classes compete


def test_heat_maps_use_a_perceptually_uniform_colour_map():
    from matplotlib import colormaps

    from delib_jax.visualize import heatmap_overlay

    ramp = np.linspace(0, 1, 16, dtype=np.float32)[None].repeat(4, 0)
    out = heatmap_overlay(np.zeros((4, 16, 3), np.uint8), ramp, alpha=1.0)
    expected = (colormaps["viridis"](ramp)[..., :3] * 255).astype(np.uint8)
    np.testing.assert_allclose(out.astype(int), expected.astype(int), atol=2)


def test_report_rows_read_as_shares_and_say_when_nothing_competes(explanations):
    from delib_jax.report import render_index

    e = _figure_explanation(explanations)
    page = render_index([e])
    assert f"{e.shares[0]:.0%} of the ambiguity" in page and "strength" not in page
    record = {  # an index record: the top-N probabilities, no maps
        "source": "a.jpg", "prediction_name": "x", "confidence": 0.99, "difficulty": 0.1, "score": "hardness",
        "top": [[0, 0.99], [1, 0.004], [2, 0.003]],
        "insecurities": [{"a": 0, "b": 1, "name_a": "x", "name_b": "y", "strength": 2.7e-13, "coverage": 0.1}],
    }  # fmt: skip
    page = render_index([record])
    assert "nothing competes" in page and "e-13" not in page
    record["top"][1][1] = 0.3
    assert "nothing competes" not in render_index([record])
