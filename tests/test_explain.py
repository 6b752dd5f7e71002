"""explain(): contents of an Explanation, JSON / PNG round trips, image reading and conversion, figures."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from delib_jax.attribution import attribute_images, grad_cam
from delib_jax.explanation import (
    Explanation,
    ImageReadError,
    decode_mask,
    encode_mask,
    explain,
    read_image,
    read_mask_png,
    to_rgb,
    write_mask_pngs,
)
from delib_jax.insecurity import find_insecurities
from delib_jax.models import create_model
from delib_jax.visualize import save_figure

NAMES = ["sparrow", "wren", '<b>&"x"', "finch", "tern", "gull"]


@pytest.fixture(scope="module")
def setup():
    model = create_model("small", 6, rngs=nnx.Rngs(0))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    images = ((pixels / 255.0 - 0.45) / 0.27).astype(np.float32)
    explanations = explain(
        model, images, class_names=NAMES, coverage=0.1, max_insecurities=3, sources=["a.png", "b.png", None]
    )
    return model, pixels, images, explanations


def test_explanation_matches_its_parts(setup):
    model, _, images, explanations = setup
    attr = attribute_images(
        model, images, method="gradient_hessian", score="hardness", top_n=5, difficulty_channels="positive"
    )  # explain()'s default difficulty map
    cam = grad_cam(model.classifier, model.features(images))
    found = find_insecurities(
        attr.class_maps, attr.difficulty_map, attr.classes, image_size=(48, 48), k=3, coverage=0.1, max_insecurities=3
    )
    assert len(explanations) == 3
    for i, e in enumerate(explanations):
        np.testing.assert_allclose(e.probs, attr.probs[i], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e.maps, attr.maps[i], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(e.grad_cam, cam[i], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(e.difficulty, attr.score[i], rtol=1e-5)
        assert e.prediction == int(np.argmax(attr.probs[i])) == int(e.classes[0])
        assert e.prediction_name == NAMES[e.prediction]
        assert e.class_names == tuple(NAMES[c] for c in e.classes)
        assert e.maps.shape == (6, 6, 6) and e.image_size == (48, 48)
        valid = np.flatnonzero(found.valid[i])
        assert len(e.insecurities) == len(valid) >= 1
        for item, q in zip(e.insecurities, valid):
            assert (item.a, item.b) == tuple(int(c) for c in found.pairs[i, q])
            assert (item.name_a, item.name_b) == (NAMES[item.a], NAMES[item.b])
            np.testing.assert_array_equal(item.mask, found.masks[i, q])
            assert item.mask.shape == (48, 48) and item.mask.dtype == bool
            assert 0 < item.coverage <= 0.12  # 10%, more only by values tied at the threshold
        strengths = [float(q.strength) for q in e.insecurities]
        assert strengths == sorted(strengths, reverse=True)
    assert explanations[0].source == "a.png" and explanations[2].source is None


def test_json_round_trip_is_exact(setup):
    _, _, _, explanations = setup
    for e in explanations:
        text = json.dumps(e.to_json())
        back = Explanation.from_json(json.loads(text))
        assert jax.tree.structure(back) == jax.tree.structure(e)  # static fields: names, pairs, sizes, source
        for x, y in zip(jax.tree.leaves(e), jax.tree.leaves(back)):
            np.testing.assert_array_equal(x, y)
        assert back.insecurities[0].label == e.insecurities[0].label


def test_mask_pngs_round_trip(setup, tmp_path):
    _, _, _, explanations = setup
    e = explanations[0]
    names = write_mask_pngs(e, tmp_path, "img0")
    assert len(names) == len(e.insecurities)
    data = json.loads(json.dumps(e.to_json(mask_paths=names)))
    assert "png" in data["insecurities"][0]["mask"]
    back = Explanation.from_json(data, base_dir=tmp_path)
    for a, b in zip(e.insecurities, back.insecurities):
        np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(read_mask_png(tmp_path / names[0]), e.insecurities[0].mask)


@pytest.mark.parametrize("shape, fill", [((5, 7), None), ((1, 1), True), ((1, 1), False), ((3, 4), True)])
def test_rle(shape, fill):
    rng = np.random.default_rng(0)
    mask = rng.random(shape) > 0.5 if fill is None else np.full(shape, fill)
    rle = encode_mask(mask)
    assert sum(rle["counts"]) == mask.size and rle["size"] == list(shape)
    np.testing.assert_array_equal(decode_mask(rle), mask)
    assert encode_mask(np.array([[True, True, False]]))["counts"] == [0, 2, 1]


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_explain_options_and_errors(setup):
    model, _, images, _ = setup
    found = explain(
        model, images[:1], score="entropy", method="gradient", top_n=None, k=2, threshold=0.0, max_insecurities=None
    )
    assert found[0].maps.shape == (7, 6, 6) and len(found[0].insecurities) <= 15
    assert found[0].class_names == tuple(str(c) for c in found[0].classes)  # default names: indices
    with pytest.raises(ValueError, match="coverage"):
        explain(model, images, coverage=0.95)
    with pytest.raises(ValueError, match="k must be"):
        explain(model, images, top_n=3, k=4)
    with pytest.raises(ValueError, match="not both"):
        explain(model, images, coverage=0.2, threshold=0.1)
    with pytest.raises(ValueError, match="hardness"):
        explain(create_model("small", 3, hardness="none", rngs=nnx.Rngs(1)), images)


def _open(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return read_image(path)


def test_image_modes_convert_to_rgb(tmp_path):
    sixteen = np.array([[0, 257, 32896, 65535]], np.uint16)
    rgb = np.asarray(_open(tmp_path, "16.png", Image.fromarray(sixteen)))
    assert rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])  # scaled, not clipped at 255
    as_i = np.asarray(to_rgb(Image.fromarray(sixteen.astype(np.int32), mode="I")))
    np.testing.assert_array_equal(as_i[0, :, 1], [0, 1, 128, 255])
    grey = np.asarray(_open(tmp_path, "g.png", Image.fromarray(np.array([[10, 200]], np.uint8))))
    np.testing.assert_array_equal(grey[0], [[10, 10, 10], [200, 200, 200]])
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], np.uint8)
    out = np.asarray(_open(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(out[0, :2], [[255, 0, 0], [255, 255, 255]])  # opaque kept, transparent -> white
    assert 120 <= out[0, 2, 0] <= 135  # half-transparent black over white
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    np.testing.assert_array_equal(np.asarray(_open(tmp_path, "c.jpg", cmyk))[0, 0] // 16, [15, 0, 0])


def test_unreadable_images_raise_one_clear_error(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.full((4, 4), np.nan, np.float32), "F").save(tmp_path / "nan.tiff")
    Image.fromarray(np.array([[1, np.inf]], np.float32), "F").save(tmp_path / "inf.tiff")
    for name, match in [
        ("empty.jpg", "empty file"),
        ("junk.png", "cannot read image"),
        ("missing.png", "cannot read image"),
        ("nan.tiff", "NaN or infinite"),
        ("inf.tiff", "NaN or infinite"),
    ]:
        with pytest.raises(ImageReadError, match=match):
            read_image(tmp_path / name)


def test_figure(setup, tmp_path):
    _, pixels, _, explanations = setup
    e = explanations[0]
    examples = {e.insecurities[0].a: pixels[1], e.insecurities[0].name_b: pixels[2]}
    path = save_figure(e, pixels[0], tmp_path / "fig.png", examples=examples)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 2 * image.height
    with pytest.raises(ValueError, match="computed at"):
        save_figure(e, pixels[0, :40], tmp_path / "bad.png")


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    import os

    from delib_jax.explanation import atomic_write

    path = atomic_write(tmp_path / "x.json", lambda f: f.write(b"{}"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".x.json.*"))
