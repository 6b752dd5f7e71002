"""Input pipelines: shapes, determinism by seed across thread counts, resuming, epochs, annotations, corrupt files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from delib_jax.data import DatasetError, load_ade20k, load_cub
from delib_jax.data import transforms as T
from delib_jax.data.pipeline import (
    Pipeline,
    PipelineConfig,
    ade20k_source,
    cub_source,
    eval_pipeline,
    train_pipeline,
)
from delib_jax.data.synthetic import make_ade20k, make_cub


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    out = tmp_path_factory.mktemp("cub")
    make_cub(out, classes=3, images_per_class=6, size=48, seed=2, train_fraction=0.5)
    return load_cub(out)


def _train(cub, **kw):
    opts = dict(batch_size=4, seed=0, num_epochs=2, crop=32, drop_remainder=False, num_threads=1)
    return train_pipeline(cub_source(cub, "train"), **(opts | kw))


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_eval_batches(cub):
    p = eval_pipeline(cub_source(cub, "test"), batch_size=4, resize=40, crop=32, num_threads=2)
    batches = list(p)
    assert len(p) == 3 and [b["image"].shape for b in batches] == [(4, 32, 32, 3)] * 2 + [(1, 32, 32, 3)]
    b = batches[0]
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int64
    assert b["parts"].shape == (4, 15, 2) and b["part_visible"].shape == (4, 15) and b["part_visible"].dtype == bool
    assert "mask" not in b
    test = np.flatnonzero(~cub.is_train)
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), test)  # source order
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), cub.labels[test])
    i = test[1]
    with Image.open(cub.image_paths[i]) as im:
        plan = T.eval_plan(*im.size, resize=40, crop=32)
        expected_image = T.normalize(T.apply_to_image(plan, im), T.CUB_STATS)
    pts, vis = T.apply_to_points(plan, cub.parts[i], cub.part_visible[i])
    np.testing.assert_array_equal(b["parts"][1], pts)
    np.testing.assert_array_equal(b["part_visible"][1], vis)
    np.testing.assert_array_equal(b["image"][1], expected_image)


def test_uint8_batches_are_the_same_pixels_before_normalisation(cub):
    host = list(_train(cub))
    raw = list(_train(cub, normalize=False))
    assert raw[0]["image"].dtype == np.uint8 and raw[0]["image"].shape == host[0]["image"].shape
    for a, b in zip(host, raw):
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(T.normalize(b["image"], T.CUB_STATS), a["image"])
        assert all(np.array_equal(a[k], b[k]) for k in a if k != "image")
    p = eval_pipeline(cub_source(cub, "test"), batch_size=4, resize=40, crop=32, num_threads=1, normalize=False)
    assert p.config.normalize is False and next(iter(p))["image"].dtype == np.uint8


def test_same_seed_same_batches_whatever_the_threads(cub):
    one = list(_train(cub, num_threads=1, prefetch=1))
    four = list(_train(cub, num_threads=4, prefetch=3))
    assert _equal(one, four)
    other = list(_train(cub, seed=1))
    assert not _equal(one, other)


def test_epochs_reshuffle_and_cover_the_split(cub):
    p = _train(cub)
    batches = list(p)
    assert p.steps_per_epoch == 3 and len(batches) == 6 and batches[2]["label"].shape == (1,)
    train = np.flatnonzero(cub.is_train)
    epochs = [np.concatenate([b["index"] for b in batches[e * 3 : (e + 1) * 3]]) for e in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == train.tolist()
    assert epochs[0].tolist() != epochs[1].tolist()
    assert all(b["image"].shape[1:] == (32, 32, 3) for b in batches)


@pytest.mark.slow  # grain worker processes, each importing the pipeline
def test_worker_processes_give_the_same_batches_and_resume(cub):
    """Decoding in grain worker processes (spawned) changes nothing: the same batches in the same order, from any
    step, as threads of this process."""
    threads = list(_train(cub, num_threads=2))
    processes = _train(cub, num_threads=1, num_workers=2, normalize=False)
    got = list(processes)
    assert _equal([{**b, "image": T.normalize(b["image"], T.CUB_STATS)} for b in got], threads)
    assert _equal(list(processes.iterate(start_step=3, stop_step=5)), got[3:5])
    with pytest.raises(ValueError, match="num_workers"):
        PipelineConfig(batch_size=4, train=True, num_workers=-1)


def test_resume_from_any_step(cub):
    p = _train(cub, num_threads=2)
    full = list(p)
    for start in (0, 1, 4, 6):
        assert _equal(list(p.iterate(start_step=start)), full[start:])
    assert p.position(4) == (1, 1)
    assert _equal([p.batch(5)], full[5:])
    endless = _train(cub, num_epochs=None)
    it = endless.iterate(start_step=100)
    assert _equal([next(it)], [endless.batch(100)])
    with pytest.raises(TypeError):
        len(endless)


def test_drop_remainder(cub):
    p = _train(cub, drop_remainder=True, batch_size=4)
    batches = list(p)
    assert p.steps_per_epoch == 2 and all(len(b["label"]) == 4 for b in batches) and len(batches) == 4
    with pytest.raises(ValueError, match="no batch"):
        _train(cub, drop_remainder=True, batch_size=100)


def test_augmented_parts_follow_the_image(cub):
    """Every visible augmented keypoint has a visible source keypoint whose mapping it is (after left/right swap)."""
    perm = T.flip_permutation(cub.part_names)
    flipped_seen = False
    for b in _train(cub, num_epochs=3):
        for k, i in enumerate(b["index"]):
            vis = b["part_visible"][k]
            assert (b["parts"][k][~vis] == 0).all()
            assert ((b["parts"][k][vis] >= 0) & (b["parts"][k][vis] < 32)).all()
            src_vis = cub.part_visible[i]
            assert not (vis & ~src_vis & ~src_vis[perm]).any()
            flipped_seen |= bool((vis & ~src_vis).any())
    assert flipped_seen  # some flip made a far-side part the near one


def test_ade20k_masks(tmp_path):
    make_ade20k(tmp_path, scenes=2, images_per_scene=3, size=40, seed=0, unseen_val_images=1)
    ds = load_ade20k(tmp_path)
    p = eval_pipeline(ade20k_source(ds, "test"), batch_size=8, resize=36, crop=32, stats=T.IMAGENET_STATS)
    (b,) = list(p)
    assert b["mask"].shape == (2, 32, 32) and b["mask"].dtype == np.uint8 and "parts" not in b
    i = int(b["index"][0])
    src = np.asarray(Image.open(ds.mask_paths[i]))
    plan = T.eval_plan(src.shape[1], src.shape[0], resize=36, crop=32)
    np.testing.assert_array_equal(b["mask"][0], T.apply_to_mask(plan, src))
    train = list(train_pipeline(ade20k_source(ds, "train"), batch_size=2, num_epochs=1, crop=24, num_threads=2))
    assert all(
        set(np.unique(t["mask"]))
        <= set(np.unique(np.concatenate([np.asarray(Image.open(m)).ravel() for m in ds.mask_paths])))
        for t in train
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_corrupt_jpeg_raises_dataset_error_naming_it(cub, tmp_path, damage):
    source = cub_source(cub, "train")
    victim = tmp_path / "victim.jpg"
    shutil.copy(source.image_paths[2], victim)
    if damage == "garbage":
        victim.write_bytes(b"this is not a jpeg" * 10)
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:300])
    else:
        victim.unlink()
    paths = list(source.image_paths)
    paths[2] = str(victim)
    broken = Pipeline(
        type(source)(**{**source.__dict__, "image_paths": tuple(paths)}),
        PipelineConfig(batch_size=4, train=False, resize=40, crop=32, num_threads=2),
    )
    with pytest.raises(DatasetError, match=str(victim).replace(".", r"\.")):
        list(broken)


def test_config_errors(cub):
    with pytest.raises(ValueError):
        PipelineConfig(batch_size=0, train=True)
    with pytest.raises(ValueError):
        PipelineConfig(batch_size=2, train=False, resize=30, crop=32)
    with pytest.raises(ValueError):
        cub_source(cub, "validation")
    with pytest.raises(ValueError, match="start_step"):
        _train(cub).iterate(start_step=7)


def _odd_images(folder) -> list:
    """16-bit grey, RGBA, palette (with and without a transparent colour), CMYK and 1-bit files."""
    rng = np.random.default_rng(5)
    images = {
        "sixteen.png": Image.fromarray((rng.random((20, 24)) * 65535).astype(np.uint16)),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "RGBA"),
        "palette.png": Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).convert("P"),
        "cmyk.tiff": Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8), "CMYK"),
        "bits.png": Image.fromarray(rng.random((20, 24)) > 0.5),
    }
    transparent = images["palette.png"].copy()
    transparent.info["transparency"] = 0
    images["palette_t.png"] = transparent
    paths = []
    for name, image in images.items():
        image.save(folder / name, **({"transparency": 0} if name == "palette_t.png" else {}))
        paths.append(folder / name)
    return paths


def test_pipeline_decodes_exactly_as_explain(tmp_path):
    """One decoder for training/evaluation and `delib explain`: 16-bit scaled (not clipped white), alpha over white."""
    from delib_jax.data.pipeline import decode_image
    from delib_jax.explanation import read_image

    for path in _odd_images(tmp_path):
        ours, theirs = np.asarray(decode_image(str(path))), np.asarray(read_image(path))
        assert ours.dtype == np.uint8 and ours.shape == (20, 24, 3), path
        np.testing.assert_array_equal(ours, theirs, err_msg=str(path))
    sixteen = np.asarray(decode_image(str(tmp_path / "sixteen.png")))
    assert 100 < sixteen.mean() < 155  # Pillow's convert("RGB") clips 16-bit values: almost all white (254)
    rgba = np.asarray(Image.open(tmp_path / "rgba.png"))
    clear = rgba[..., 3] == 0
    if clear.any():
        assert (np.asarray(decode_image(str(tmp_path / "rgba.png")))[clear] == 255).all()  # over white


def test_nan_float_image_is_a_dataset_error_naming_it(tmp_path):
    bad = tmp_path / "floatnan.tiff"
    Image.fromarray(np.full((8, 8), np.nan, np.float32), "F").save(bad)
    from delib_jax.data.pipeline import decode_image

    with pytest.raises(DatasetError, match=r"floatnan\.tiff: .*NaN"):
        decode_image(str(bad))


def test_empty_split_says_which_and_why(tmp_path):
    make_ade20k(tmp_path / "ade", scenes=2, images_per_scene=3, size=40, seed=0, unseen_val_images=1)
    ds = load_ade20k(tmp_path / "ade")
    no_val = type(ds)(**{**ds.__dict__, "is_train": np.ones_like(ds.is_train)})  # every validation image dropped
    with pytest.raises(ValueError, match=r"the ADE20K validation split of .*ADEChallengeData2016 has no examples \("):
        eval_pipeline(ade20k_source(no_val, "test"), batch_size=2, resize=36, crop=32)
    make_cub(tmp_path / "cub", classes=2, images_per_class=2, size=48, seed=0)
    cub = load_cub(tmp_path / "cub")
    no_test = type(cub)(**{**cub.__dict__, "is_train": np.ones_like(cub.is_train)})
    with pytest.raises(ValueError, match=r"CUB test split of .* no image as a test image"):
        eval_pipeline(cub_source(no_test, "test"), batch_size=2, resize=36, crop=32)


def test_every_thread_gets_a_batch_whatever_the_prefetch(cub, monkeypatch):
    """grain decodes at most prefetch_buffer_size batches at once: with fewer batches ahead than threads the other
    threads idle (on a 16-core GPU host, --threads 16 ran 4 batches at a time)."""
    import threading
    import time

    p = _train(cub, num_threads=6, prefetch=1, batch_size=1, num_epochs=3)
    running, most, lock = [0], [0], threading.Lock()
    batch = p.batch

    def slow_batch(step):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # as if decoding: the GIL is free
        with lock:
            running[0] -= 1
        return batch(step)

    monkeypatch.setattr(p, "batch", slow_batch)
    assert len(list(p.iterate())) == len(p)
    assert most[0] >= 4, most[0]


def test_iterate_stops_at_stop_step(cub):
    p = _train(cub)
    middle = list(p.iterate(start_step=2, stop_step=4))
    assert _equal(middle, list(p)[2:4])
    assert list(p.iterate(start_step=3, stop_step=3)) == []
    with pytest.raises(ValueError, match="stop_step 7 outside"):
        p.iterate(stop_step=7)


@pytest.mark.parametrize("train", [True, False])
def test_shards_are_the_rows_of_the_global_batch(cub, train):
    """n processes with shard (k, n) decode together exactly the global batches; a share of a partial last batch may
    be empty, with the keys, dtypes and trailing shapes of a full one."""
    make = (lambda **kw: _train(cub, **kw)) if train else (
        lambda **kw: eval_pipeline(cub_source(cub, "train"), batch_size=4, crop=32, resize=36, num_threads=1, **kw)
    )  # fmt: skip
    whole = list(make())
    shards = [list(make(shard=(k, 2))) for k in range(2)]
    assert [len(b["label"]) for b in whole][:3] == [4, 4, 1]  # 9 images: the third batch is partial
    assert [len(b["label"]) for b in shards[1]][:3] == [2, 2, 0]
    for full, first, second in zip(whole, *shards, strict=True):
        assert full.keys() == first.keys() == second.keys()
        for k in full:
            assert full[k].dtype == first[k].dtype == second[k].dtype
            assert full[k].shape[1:] == second[k].shape[1:]
            np.testing.assert_array_equal(full[k], np.concatenate([first[k], second[k]]))


def test_shard_must_divide_the_batch(cub):
    with pytest.raises(ValueError, match="shard 2 of 2"):
        _train(cub, shard=(2, 2))
    with pytest.raises(ValueError, match="shard 0 of 2 is not a shard of batches of 3"):
        _train(cub, batch_size=3, shard=(0, 2))
