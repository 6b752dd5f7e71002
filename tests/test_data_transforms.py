"""Geometric transforms against hand-computed cases; images, keypoints and masks moved together."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from delib_jax.data import cub
from delib_jax.data import transforms as T

CUB_FLIP = [0, 1, 2, 3, 4, 5, 10, 11, 12, 9, 6, 7, 8, 13, 14]


def test_flip_permutation_swaps_left_and_right_cub_parts():
    assert T.flip_permutation(cub.PART_NAMES).tolist() == CUB_FLIP
    names = [cub.PART_NAMES[i] for i in CUB_FLIP]
    assert names[6:9] == ["right eye", "right leg", "right wing"] and names[10:13] == [
        "left eye",
        "left leg",
        "left wing",
    ]


def test_eval_plan_landscape_by_hand():
    # 512x300: shorter side 300 -> 256, long side int(256 * 512 / 300) = 436; crop offsets round(212/2)=106, 16.
    plan = T.eval_plan(512, 300)
    s = 512 / 436
    assert plan.size == (224, 224) and not plan.flip
    np.testing.assert_allclose(plan.box, (106 * s, 16 * 300 / 256, 330 * s, 240 * 300 / 256))
    # The source centre lands on the output centre; (106, 16) of the resized image is the output origin.
    pts, vis = T.apply_to_points(plan, np.array([[256.0, 150.0], [106 * s, 16 * 300 / 256]]), np.array([True, True]))
    np.testing.assert_allclose(pts, [[112, 112], [0, 0]], atol=1e-4)
    assert vis.tolist() == [True, True]


def test_eval_plan_portrait_and_odd_margin():
    # 300x401: long side int(256 * 401 / 300) = 342, top = round((342 - 224) / 2) = 59, left 16.
    plan = T.eval_plan(300, 401)
    sy = 401 / 342
    np.testing.assert_allclose(plan.box, (16 * 300 / 256, 59 * sy, 240 * 300 / 256, 283 * sy))
    # torchvision rounds half to even: (259 - 224) / 2 = 17.5 -> 18.
    plan = T.eval_plan(259, 256, resize=256, crop=224)
    assert plan.box[0] == pytest.approx(18.0) and plan.box[1] == pytest.approx(16.0)


def test_eval_plan_image_equals_resize_then_center_crop():
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    plan = T.eval_plan(200, 150, resize=64, crop=56)
    two_step = np.asarray(src.resize((85, 64), Image.Resampling.BILINEAR))[4:60, 14:70]  # int(64*200/150)=85
    out = T.apply_to_image(plan, src)
    assert out.shape == (56, 56, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - two_step.astype(int)).max() <= 1


def test_points_inside_and_leaving_the_crop():
    plan = T.Plan(box=(10.0, 20.0, 50.0, 60.0), size=(20, 20))  # scale 1/2
    points = np.array([[30, 40], [9, 30], [50, 30], [49.9, 59.9], [10, 20], [30, 40]], dtype=float)
    visible = np.array([True, True, True, True, True, False])
    out, vis = T.apply_to_points(plan, points, visible)
    assert vis.tolist() == [True, False, False, True, True, False]
    np.testing.assert_allclose(out, [[10, 10], [0, 0], [0, 0], [19.95, 19.95], [0, 0], [0, 0]], atol=1e-5)
    assert out.dtype == np.float32


def test_flip_mirrors_points_and_swaps_left_right_parts():
    plan = T.Plan(box=(10.0, 20.0, 50.0, 60.0), size=(20, 20), flip=True)
    points = np.zeros((15, 2))
    visible = np.zeros(15, bool)
    points[6], visible[6] = (20.0, 40.0), True  # left eye -> output (5, 10), mirrored to x = 15
    points[13], visible[13] = (46.0, 22.0), True  # tail -> (18, 1) -> (2, 1)
    points[11], visible[11] = (100.0, 22.0), True  # right leg, outside the crop
    out, vis = T.apply_to_points(plan, points, visible, flip_perm=np.array(CUB_FLIP))
    assert np.flatnonzero(vis).tolist() == [10, 13]  # now the right eye (and the tail); the leg left the crop
    np.testing.assert_allclose(out[10], [15, 10])
    np.testing.assert_allclose(out[13], [2, 1])
    with pytest.raises(ValueError, match="flip_perm"):
        T.apply_to_points(plan, points, visible)


def test_mask_nearest_neighbour_by_hand():
    src = np.arange(64, dtype=np.uint8).reshape(8, 8)
    down = T.apply_to_mask(T.Plan(box=(0.0, 0.0, 8.0, 8.0), size=(4, 4)), src)
    np.testing.assert_array_equal(down, src[1::2, 1::2])  # centre j + 0.5 -> source 2j + 1
    up = T.apply_to_mask(T.Plan(box=(2.0, 2.0, 6.0, 6.0), size=(8, 8)), src)
    np.testing.assert_array_equal(up, np.repeat(np.repeat(src[2:6, 2:6], 2, 0), 2, 1))
    flipped = T.apply_to_mask(T.Plan(box=(2.0, 2.0, 6.0, 6.0), size=(8, 8), flip=True), src)
    np.testing.assert_array_equal(flipped, up[:, ::-1])
    rect = T.apply_to_mask(T.Plan(box=(0.0, 0.0, 8.0, 4.0), size=(2, 4)), src)  # x step 4, y step 1
    np.testing.assert_array_equal(rect, src[0:4][:, [2, 6]])
    assert set(np.unique(T.apply_to_mask(T.eval_plan(8, 8, resize=30, crop=20), src))) <= set(range(64))


def test_mask_pixel_and_point_stay_together_under_random_plans():
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = rng.integers(5, 20, 2)
        r, c = rng.integers(0, h), rng.integers(0, w)
        mask = np.zeros((h, w), np.uint8)
        mask[r, c] = 7
        plan = T.train_plan(int(w), int(h), rng, crop=64)  # crops are upscaled: every source pixel covers >= 1 output
        pts, vis = T.apply_to_points(plan, np.array([[c + 0.5, r + 0.5]]), np.array([True]), flip_perm=np.array([0]))
        out = T.apply_to_mask(plan, mask)
        x0, y0, x1, y1 = plan.box
        inside = x0 <= c + 0.5 < x1 and y0 <= r + 0.5 < y1
        assert vis[0] == inside
        if vis[0]:
            assert out[int(pts[0, 1]), int(pts[0, 0])] == 7


def test_random_resized_crop_fallback_by_hand():
    # A 1000x10 strip: every try needs h >= sqrt(0.08 * 10000 * 3/4) > 10, so all 10 fail; the fallback clamps the
    # aspect to 4/3: h = 10, w = round(13.33) = 13, centred: left = (1000 - 13) // 2 = 493.
    assert T.random_resized_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)
    # The 10x1000 strip clamps to 3/4: w = 10, h = round(10 / 0.75) = 13, top = (1000 - 13) // 2 = 493.
    assert T.random_resized_crop_box(10, 1000, np.random.default_rng(0)) == (0, 493, 10, 13)


def test_random_resized_crop_boxes_are_valid_and_seeded():
    rng = np.random.default_rng(2)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(20, 400, 2))
        left, top, cw, ch = T.random_resized_crop_box(w, h, rng)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
    a = T.train_plan(300, 200, np.random.default_rng(5))
    assert a == T.train_plan(300, 200, np.random.default_rng(5)) and a.size == (224, 224)
    flips = [T.train_plan(50, 50, np.random.default_rng(i)).flip for i in range(200)]
    assert 60 < sum(flips) < 140


def test_flipped_image_is_mirrored():
    src = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    plain = T.apply_to_image(T.Plan((0.0, 0.0, 16.0, 16.0), (16, 16)), src)
    np.testing.assert_array_equal(plain, np.asarray(src))
    np.testing.assert_array_equal(T.apply_to_image(T.Plan((0.0, 0.0, 16.0, 16.0), (16, 16), True), src), plain[:, ::-1])


def test_normalize_statistics():
    image = np.array([[[255, 0, 128]]], dtype=np.uint8)
    out = T.normalize(image, T.CUB_STATS)
    np.testing.assert_allclose(
        out[0, 0], [(1 - 0.4706) / 0.2667, (0 - 0.4600) / 0.2658, (128 / 255 - 0.4548) / 0.2706], rtol=1e-5
    )
    np.testing.assert_allclose(T.normalize(image, T.IMAGENET_STATS)[0, 0, 0], (1 - 0.485) / 0.229, rtol=1e-5)
    assert out.dtype == np.float32


def test_model_input_normalises_uint8_on_the_device_as_the_host_does():
    import jax
    import jax.numpy as jnp

    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    host = T.normalize(pixels, T.CUB_STATS)
    on_device = jax.jit(lambda x: T.model_input(x, T.CUB_STATS))(jnp.asarray(pixels))
    assert isinstance(on_device, jax.Array) and on_device.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(on_device), host, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(T.model_input(pixels, T.CUB_STATS)), host, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(T.model_input(pixels, T.IMAGENET_STATS)), host)  # the statistics are used
    assert T.model_input(host, None) is host  # float images are already model input
    with pytest.raises(ValueError, match="statistics"):
        T.model_input(pixels, None)


def test_plan_validation():
    with pytest.raises(ValueError):
        T.eval_plan(0, 10)
    with pytest.raises(ValueError):
        T.eval_plan(10, 10, resize=100, crop=120)
    with pytest.raises(ValueError):
        T.apply_to_mask(T.Plan((0.0, 0.0, 2.0, 2.0), (2, 2)), np.zeros((2, 2, 1)))


def test_resize_plan_by_hand():
    # 500x375 -> shorter side 256: 341x256 (int(256 * 500 / 375) = 341), the whole image, no flip.
    plan = T.resize_plan(500, 375, 256)
    assert plan == T.Plan(box=(0.0, 0.0, 500.0, 375.0), size=(341, 256))
    assert T.resize_plan(300, 401, 256).size == (256, 342)  # portrait: the long side as in eval_plan
    assert T.resized_size(640, 640, 256) == (256, 256)


@pytest.mark.parametrize("flip", [False, True])
def test_apply_to_box_moves_the_corners_as_points(flip):
    plan = T.Plan(box=(10.0, 20.0, 110.0, 70.0), size=(50, 100), flip=flip)
    box = np.array([30.0, 25.0, 40.0, 30.0])  # (x, y, w, h)
    got = T.apply_to_box(plan, box)
    corners = np.array([[30.0, 25.0], [70.0, 55.0]])  # top-left and bottom-right in source pixels
    # keypoints map the corners; a mirrored box's left edge is the mirrored right corner
    x = (corners[:, 0] - 10.0) * 0.5
    y = (corners[:, 1] - 20.0) * 2.0
    if flip:
        x = 50 - x
    np.testing.assert_allclose(got, [x.min(), y.min(), abs(x[1] - x[0]), y[1] - y[0]], rtol=1e-6)
    assert got.dtype == np.float32


def test_decode_rgb_from_bytes_equals_read_rgb(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (9, 7, 4), dtype=np.uint8), "RGBA").save(path)  # alpha over white
    ours = T.decode_rgb(path.read_bytes(), "named.png", exif_orientation=False)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(T.read_rgb(path, exif_orientation=False)))
    with pytest.raises(T.ImageReadError, match=r"^named\.jpg: cannot read image \(cannot identify image file 'named"):
        T.decode_rgb(b"not an image", "named.jpg")
    with pytest.raises(T.ImageReadError, match="named.jpg: empty file"):
        T.decode_rgb(b"", "named.jpg")
