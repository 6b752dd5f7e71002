"""Training: losses (values and where gradients flow), steps lower the loss, exact resume, load_model round trip,
validation split, sharded step == single-device step."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.checkpoint import RunCheckpoints, RunConfig, load_model, load_run_config
from delib_jax.data import load_cub
from delib_jax.data.synthetic import make_cub
from delib_jax.train import (
    compile_steps,
    create_train_state,
    fit,
    hardness_bce,
    joint_loss,
    load_splits,
    make_mesh,
    shard_batch,
    split_validation,
)
from delib_jax.train.run import TrainingDiverged, _is_better

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------ losses


def test_hardness_bce_hand_values():
    # s = sigmoid(0) = 1/2: -(p log 1/2 + (1 - p) log 1/2) = log 2 for any p
    np.testing.assert_allclose(hardness_bce(jnp.zeros(3), jnp.array([0.0, 0.3, 1.0])), np.log(2.0) * np.ones(3), 1e-6)
    # z = log 3 -> s = 3/4; p = 1/4: -(1/4 log 1/4 + 3/4 log 3/4)
    expected = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    np.testing.assert_allclose(hardness_bce(jnp.array([np.log(3.0)]), jnp.array([0.25])), [expected], 1e-6)
    # finite for extreme logits
    assert np.isfinite(hardness_bce(jnp.array([-200.0, 200.0]), jnp.array([1.0, 0.0]))).all()


def test_hardness_bce_minimiser_is_one_minus_p():
    p = jnp.array([0.1, 0.5, 0.9])
    grad = jax.grad(lambda z: jnp.sum(hardness_bce(z, p)))
    z = jax.jit(lambda z: jax.lax.fori_loop(0, 2000, lambda _, z: z - grad(z), z))(jnp.zeros(3))  # descent on z alone
    np.testing.assert_allclose(jax.nn.sigmoid(z), 1.0 - p, atol=1e-4)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_joint_loss_values_and_stop_gradients():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = jnp.array([0, 2])
    z = jnp.array([-1.0, 1.0])
    ce = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
    s = jax.nn.sigmoid(z)
    p = jnp.exp(-ce)
    loss, m = joint_loss(logits, z, labels)
    np.testing.assert_allclose(m["cls_loss"], jnp.mean(s / s.mean() * ce), rtol=1e-6)
    np.testing.assert_allclose(m["hardness_loss"], jnp.mean(hardness_bce(z, p)), rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], 0.5)
    raw, m_raw = joint_loss(logits, z, labels, normalize=False)
    np.testing.assert_allclose(m_raw["cls_loss"], jnp.mean(s * ce), rtol=1e-6)
    # the classifier loss sends nothing to the hardness logit, the hardness loss nothing to the class logits
    g_z = jax.grad(lambda z: joint_loss(logits, z, labels)[1]["cls_loss"])(z)
    g_logits = jax.grad(lambda lg: joint_loss(lg, z, labels)[1]["hardness_loss"])(logits)
    np.testing.assert_array_equal(g_z, 0.0)
    np.testing.assert_array_equal(g_logits, 0.0)
    # but each loss trains its own predictor
    assert np.abs(jax.grad(lambda lg: joint_loss(lg, z, labels)[0])(logits)).sum() > 0
    assert np.abs(jax.grad(lambda z: joint_loss(logits, z, labels)[0])(z)).sum() > 0
    plain, m_plain = joint_loss(logits, None, labels)
    np.testing.assert_allclose(plain, ce.mean(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ fixtures


def _config(data_dir, **kw) -> RunConfig:
    ds = load_cub(data_dir)
    base = dict(
        arch="small", num_classes=ds.num_classes, class_names=list(ds.class_names), crop=32, resize=36,
        data_dir=str(data_dir), optimizer="adamw", lr=3e-3, schedule="cosine", warmup_steps=2, batch_size=4,
        steps=6, checkpoint_every=3, eval_every=2, synthetic=True, seed=1,
    )  # fmt: skip
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_cub(tmp_path_factory) -> Path:
    return make_cub(tmp_path_factory.mktemp("data"), classes=3, images_per_class=8, size=48)


# ---------------------------------------------------------------------------------------------------- steps


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(tiny_cub):
    config = _config(tiny_cub, steps=8, warmup_steps=0, schedule="step", lr=2e-3)
    mesh = make_mesh()
    state = create_train_state(config, total_steps=8, mesh=mesh)
    step_fn, _ = compile_steps(mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32), "label": np.array([0, 1, 2, 1])}
    losses = []
    for _ in range(8):
        state, metrics = step_fn(state, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_uint8_batches_train_as_their_host_normalised_floats(tiny_cub):
    """The steps normalise uint8 images on the device with the run's statistics: the same update and evaluation sums
    as the float32 batch normalised on the host (what the pipelines gave before)."""
    from delib_jax.data.transforms import CUB_STATS, normalize

    config = _config(tiny_cub, steps=2, warmup_steps=0, schedule="step", lr=2e-3)
    mesh = make_mesh()
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1])
    results = []
    for images, stats in ((normalize(pixels, CUB_STATS), None), (pixels, CUB_STATS)):
        state = create_train_state(config, total_steps=2, mesh=mesh)
        step_fn, eval_fn = compile_steps(mesh, pixel_stats=stats)
        batch = {"image": images, "label": labels, "mask": np.ones(4, bool)}
        state, metrics = step_fn(state, shard_batch(batch, mesh))
        sums = eval_fn(state, shard_batch(batch, mesh, keys=("image", "label", "mask")))
        results.append((jax.device_get(metrics), jax.device_get(sums), jax.device_get(state.params)))
    (m1, s1, p1), (m2, s2, p2) = results
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(s2["ce"], s1["ce"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p2, p1)
    state = create_train_state(config, total_steps=2, mesh=mesh)
    with pytest.raises(ValueError, match="statistics"):  # uint8 without statistics is refused, not trained on
        compile_steps(mesh)[0](state, shard_batch({"image": pixels, "label": labels}, mesh))


def test_validation_split_is_deterministic_disjoint_and_from_train():
    train = np.arange(10, 60)
    a_train, a_val = split_validation(train, 0.1, seed=3)
    b_train, b_val = split_validation(train, 0.1, seed=3)
    np.testing.assert_array_equal(a_val, b_val)
    assert len(a_val) == 5 and len(a_train) == 45
    assert set(a_train) | set(a_val) == set(train) and not set(a_train) & set(a_val)
    assert not np.array_equal(split_validation(train, 0.1, seed=4)[1], a_val)
    with pytest.raises(ValueError, match="validation"):
        split_validation(np.array([3]), 0.1, seed=0)


class _Killed(Exception):
    pass


def _kill_at(k):
    def hook(step, state):
        if step == k:
            raise _Killed

    return hook


def _leaves(model) -> list[np.ndarray]:
    keys_as_data = jax.tree.map(
        lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        nnx.state(model),
    )
    return [np.asarray(x) for x in jax.tree.leaves(keys_as_data)]


@pytest.mark.slow
def test_decoding_processes_train_the_same_model(tiny_cub, tmp_path, capsys):
    """--workers: the training input decoded by grain worker processes gives the same run (the same batches); a
    negative count is one clear error."""
    from delib_jax.train.cli import main

    config = _config(tiny_cub, steps=4, checkpoint_every=4, eval_every=4)
    fit(tmp_path / "threads", config, progress=False, num_threads=2)
    fit(tmp_path / "processes", config, progress=False, num_threads=1, num_workers=2)
    a, _ = load_model(tmp_path / "threads", which="latest")
    b, _ = load_model(tmp_path / "processes", which="latest")
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    argv = ["--synthetic", "--data-dir", str(tiny_cub.parent), "--out", str(tmp_path / "cli"), "--workers", "-1"]
    assert main("cub", argv) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tiny_cub, tmp_path):
    config = _config(tiny_cub)
    final = {}
    straight = fit(tmp_path / "straight", config, progress=False, on_step=lambda s, st: final.update(state=st))

    # killed after step 4: the checkpoint of step 3 survives, step 4 is lost
    with pytest.raises(_Killed):
        fit(tmp_path / "killed", config, progress=False, on_step=_kill_at(4))
    assert load_run_config(tmp_path / "killed") == config
    resumed = fit(tmp_path / "killed", resume=True, progress=False)

    for which in ("latest", "best"):
        a, _ = load_model(tmp_path / "straight", which=which)
        b, _ = load_model(tmp_path / "killed", which=which)
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    assert straight == {**resumed, "wall_s": straight["wall_s"]}

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in lines]

    assert records("straight") == records("killed")  # the records of the lost step 4 were dropped on resume
    assert [r["step"] for r in records("straight") if r["split"] == "val"] == [2, 4, 6]

    # load_model round trip: the restored latest model computes exactly what the in-memory final state computes
    state = final["state"]
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    model, loaded_config = load_model(tmp_path / "straight", which="latest")
    assert loaded_config == config
    forward = nnx.jit(lambda m, x: m(x))
    expected = forward(state.model(), x)
    out = forward(model, x)
    np.testing.assert_array_equal(out.logits, expected.logits)
    np.testing.assert_array_equal(out.hardness_logit, expected.hardness_logit)


@pytest.mark.slow
def test_resume_rejects_other_config_and_new_run_over_old(tiny_cub, tmp_path):
    config = _config(tiny_cub, steps=1, checkpoint_every=1, eval_every=1)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(tmp_path / "run", config, resume=True, progress=False)
    fit(tmp_path / "run", config, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        fit(tmp_path / "run", config, progress=False)
    with pytest.raises(ValueError, match="lr=0.5"):
        fit(tmp_path / "run", _config(tiny_cub, steps=1, checkpoint_every=1, eval_every=1, lr=0.5), resume=True)


@pytest.mark.slow
def test_class_without_training_images_is_refused(tiny_cub, tmp_path):
    shutil.copytree(tiny_cub.parent, tmp_path / "copy")  # attributes.txt sits beside the CUB_200_2011 folder
    data = tmp_path / "copy" / tiny_cub.name
    root = next(data.rglob("train_test_split.txt")).parent
    ds = load_cub(data)
    third = {i + 1 for i in np.flatnonzero(ds.labels == 2)}  # image ids (1-based, in images.txt order) of class 3
    ids = [int(line.split()[0]) for line in (root / "images.txt").read_text().splitlines()]
    lines = [f"{i} {0 if i in third else 1}" for i in ids]
    (root / "train_test_split.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"no training images for class {ds.class_names[2]}"):
        load_splits("cub", data, val_fraction=0.1, seed=0)


@pytest.mark.slow
def test_empty_test_split_is_named_with_its_cause(tiny_cub, tmp_path):
    shutil.copytree(tiny_cub.parent, tmp_path / "copy")
    data = tmp_path / "copy" / tiny_cub.name
    root = next(data.rglob("train_test_split.txt")).parent
    ids = [int(line.split()[0]) for line in (root / "images.txt").read_text().splitlines()]
    (root / "train_test_split.txt").write_text("".join(f"{i} 1\n" for i in ids))  # every image a training image
    from delib_jax.data.pipeline import Pipeline, PipelineConfig

    splits = load_splits("cub", data, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match=r"the CUB test split of .* has no examples \(train_test_split.txt marks no "):
        Pipeline(splits.test, PipelineConfig(batch_size=2, train=False))


def _finite_leaves(model) -> bool:
    return all(np.all(np.isfinite(x)) for x in _leaves(model) if np.issubdtype(x.dtype, np.floating))


def _diverging(data_dir, **kw) -> RunConfig:
    """SGD at lr 1000 on this seed: finite but huge losses for 5 steps, an infinite validation loss at step 6."""
    return _config(data_dir, optimizer="sgd", schedule="step", lr=1000.0, eval_every=1, **kw)


@pytest.mark.slow
def test_diverged_run_stops_and_keeps_the_last_finite_checkpoint(tiny_cub, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 2 step 6 \(validation loss inf\); the last finite "
                                               r"checkpoint \(step 5\) is kept .*lower --lr"):  # fmt: skip
        fit(tmp_path / "run", _diverging(tiny_cub, checkpoint_every=1), progress=False, log_every=1)
    for which in ("latest", "best"):
        model, _ = load_model(tmp_path / "run", which=which)
        assert _finite_leaves(model)
    assert (tmp_path / "run" / "config.json").is_file()  # a run with checkpoints stays for inspection


def test_nan_validation_loss_is_never_the_best():
    nan = {"accuracy": 0.9, "loss": float("nan")}
    assert not _is_better(nan, None) and not _is_better(nan, {"accuracy": 0.1, "loss": 5.0})
    assert _is_better({"accuracy": 0.5, "loss": 5.0}, {"accuracy": 0.5, "loss": 6.0})


@pytest.mark.slow
def test_failed_first_start_leaves_nothing_that_blocks_a_retry(tiny_cub, tmp_path):
    run = tmp_path / "run"
    np.savez(tmp_path / "w.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="no torchvision weights"):  # the weights are read before config.json
        fit(run, _config(tiny_cub, weights=str(tmp_path / "w.npz")), progress=False)
    assert not (run / "config.json").exists()
    # diverged before the first training checkpoint (step 6): nothing to resume, so the start is undone
    config = _diverging(tiny_cub, checkpoint_every=6)
    with pytest.raises(TrainingDiverged, match="step 6 .*no training checkpoint was saved.*run again"):
        fit(run, config, progress=False)
    assert not run.exists()
    with pytest.raises(_Killed):  # the same start again trains (is not refused as "already holds a run")
        fit(run, config, progress=False, on_step=_kill_at(1))


# -------------------------------------------------------------------------------------------------- sharding

_SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from delib_jax.checkpoint import RunConfig
    from delib_jax.train import compile_steps, create_train_state, make_mesh, shard_batch
    assert jax.device_count() == 4, jax.devices()
    config = RunConfig(arch="small", num_classes=3, class_names=list("abc"), crop=32, resize=36, hardness="{hardness}",
                       optimizer="sgd", lr=0.05, batch_size=8, steps=2)
    rng = np.random.default_rng(0)
    batches = [{{"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32), "label": rng.integers(0, 3, 8)}}
               for _ in range(2)]
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = make_mesh(devices)
        state = create_train_state(config, total_steps=2, mesh=mesh)
        step_fn, _ = compile_steps(mesh)
        for b in batches:
            sharded = shard_batch(b, mesh)
            assert len(sharded["image"].sharding.device_set) == len(devices)
            state, metrics = step_fn(state, sharded)
        assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == len(devices)
        results.append((jax.device_get(state.params), jax.device_get(state.model_state), jax.device_get(metrics)))
    (p1, s1, m1), (p4, s4, m4) = results
    for a, b in zip(jax.tree.leaves((p1, s1, m1)), jax.tree.leaves((p4, s4, m4)), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    print("OK", float(m1["loss"]), float(m4["loss"]))
    """
)


@pytest.mark.parametrize("hardness", ["head"])
@pytest.mark.slow
def test_sharded_step_equals_single_device_step(hardness):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED.format(hardness=hardness)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


@pytest.mark.parametrize("hardness", ["head", "network"])
@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_each_loss_trains_only_its_own_predictor(hardness):
    """The classifier loss reaches no hardness parameter, the hardness loss no classifier (backbone, class head)."""
    from delib_jax.checkpoint import build_model
    from delib_jax.train import forward

    config = RunConfig(arch="small", num_classes=3, class_names=list("abc"), crop=32, resize=36, hardness=hardness)
    model = build_model(config)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 0])

    @jax.jit
    def grads(params):
        def part(params, name):
            logits, z = forward(nnx.merge(graphdef, params, rest, copy=True), x)
            return joint_loss(logits, z, labels)[1][name]

        return jax.grad(part)(params, "cls_loss"), jax.grad(part)(params, "hardness_loss")

    g_cls, g_hard = grads(params)
    hard_key = "hardness_head" if hardness == "head" else "hardness_network"

    def norm(tree, keys):
        return sum(float(jnp.abs(v).sum()) for k in keys for v in jax.tree.leaves(tree[k]))

    assert norm(g_cls, [hard_key]) == 0.0 and norm(g_cls, ["backbone", "classifier"]) > 0
    assert norm(g_hard, ["backbone", "classifier"]) == 0.0 and norm(g_hard, [hard_key]) > 0


# ------------------------------------------------------------------------------------------------- full disk

_ORBAX_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database at local file "{path}": '
    "Failed to write 113690 bytes to file 4: No space left on device [os_error_code='28']"
)


def _full_disk_at(monkeypatch, step, which="latest", error=None):
    """Make RunCheckpoints.save fail as a full disk does, at ``step`` of the ``which`` checkpoint."""
    from delib_jax.checkpoint import RunCheckpoints

    save = RunCheckpoints.save

    def failing(self, kind, at, **kw):
        if kind == which and at == step:
            raise error or ValueError(_ORBAX_FULL.format(path=self.directory / kind))
        return save(self, kind, at, **kw)

    monkeypatch.setattr(RunCheckpoints, "save", failing)


@pytest.mark.slow
def test_full_disk_is_one_line_and_the_retry_resumes_exactly(tiny_cub, tmp_path, monkeypatch):
    """A checkpoint save that finds the disk full: DiskFull naming the folder, the free space and the space needed,
    and --resume; the checkpoints before it stay, and resuming (space freed) reaches the uninterrupted run's state."""
    from delib_jax.train.run import DiskFull, checkpoint_bytes

    config = _config(tiny_cub)
    fit(tmp_path / "straight", config, progress=False)
    with monkeypatch.context() as m:
        _full_disk_at(m, 6)
        with pytest.raises(DiskFull) as e:
            fit(tmp_path / "full", config, progress=False)
    message = str(e.value)
    latest, best = checkpoint_bytes(config)
    assert f"{(tmp_path / 'full').absolute()}" in message and "MB free" in message and "\n" not in message
    assert f"latest {latest / 1e6:.1f} MB, best {best / 1e6:.1f} MB" in message and "plus --resume" in message
    assert e.value.errno == 28
    assert (tmp_path / "full" / "checkpoints" / "latest" / "3").is_dir()
    fit(tmp_path / "full", resume=True, progress=False)
    for which in ("latest", "best"):
        a, _ = load_model(tmp_path / "straight", which=which)
        b, _ = load_model(tmp_path / "full", which=which)
        for x, y in zip(_leaves(a), _leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_full_disk_before_the_first_checkpoint_says_to_run_again(tiny_cub, tmp_path, monkeypatch, capsys):
    """Nothing to resume yet: the start is undone and the message says to run the same command again (a metrics
    record that cannot be written counts as a full disk too); the CLI prints it as one line, exit 2."""
    import errno

    from delib_jax.train.cli import main

    run = tmp_path / "run"
    argv = [
        "--synthetic",
        "--data-dir",
        str(tiny_cub.parent),
        "--out",
        str(run),
        "--no-progress",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--crop",
        "32",
        "--checkpoint-every",
        "2",
        "--threads",
        "2",
    ]
    with monkeypatch.context() as m:
        _full_disk_at(m, 2, error=OSError(errno.ENOSPC, "No space left on device"))
        assert main("cub", argv) == 2
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("data: "))
    assert len(err.splitlines()) == 1 and "no space left on the disk of" in err and "run the same command again" in err
    assert not run.exists()
    assert main("cub", argv) == 0  # space freed: the same command trains


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts a small tmpfs (Linux, root)")
@pytest.mark.slow
def test_real_full_disk_in_the_command(tiny_cub, tmp_path):
    """On a 6 MB tmpfs the step-4 checkpoints do not fit (orbax's RESOURCE_EXHAUSTED from tensorstore threads): one
    line, no traceback from orbax's threads; after the disk grows, the suggested command finishes the run."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "6m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }  # the second command reuses the compilations
        run = disk / "run"
        cmd = [
            sys.executable,
            "-m",
            "train.cub",
            "--synthetic",
            "--data-dir",
            str(tiny_cub.parent),
            "--out",
            str(run),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--crop",
            "32",
            "--checkpoint-every",
            "2",
            "--no-progress",
            "--threads",
            "2",
        ]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if not line.startswith(("step ", "data: "))]
        assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert errors[0].startswith(f"error: no space left on the disk of {run}") and "--resume" in errors[0]
        subprocess.run(["mount", "-o", "remount,size=40m", str(disk)], check=True)
        again = subprocess.run(
            [sys.executable, "-m", "train.cub", "--out", str(run), "--resume", "--no-progress"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0 and "done: 4 steps" in again.stdout, again.stderr[-3000:]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_damaged_latest_metadata_is_one_line_on_resume(tiny_cub, tmp_path):
    from delib_jax.checkpoint import CheckpointError

    config = _config(tiny_cub)
    with pytest.raises(_Killed):
        fit(tmp_path / "run", config, progress=False, on_step=_kill_at(4))
    meta = next((tmp_path / "run" / "checkpoints" / "latest" / "3").rglob("meta*/metadata"))
    good = meta.read_text()
    for bad, match in [
        ({"step": 2**80}, "field 'step'"),
        ({"step": 3, "best": "x"}, "field 'best'"),
        ({"step": 3, "best": {"accuracy": 0.5, "loss": 1.0, "step": 99}}, "out of range"),
        ([], "JSON"),
    ]:
        meta.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=match) as e:
            fit(tmp_path / "run", resume=True, progress=False)
        assert "latest" in str(e.value) and "\n" not in str(e.value)
    meta.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="latest"):
        fit(tmp_path / "run", resume=True, progress=False)
    meta.write_text(good)
    fit(tmp_path / "run", resume=True, progress=False)


def _interrupt_at(k):
    def hook(step, state):
        if step == k:
            raise KeyboardInterrupt

    return hook


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_resume_says_where_it_goes_on(tiny_cub, tmp_path, capsys):
    """Ctrl-C after step 4 (checkpoints every 3): step 4 is saved, not lost, and --resume continues from it."""
    config = _config(tiny_cub)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", config, progress=False, on_step=_interrupt_at(4))
    assert "step 4 saved: --resume continues from step 4" in capsys.readouterr().err
    with RunCheckpoints(tmp_path / "run", create=False) as ckpt:
        assert ckpt.step("latest") == 4
    summary = fit(tmp_path / "run", resume=True, progress=False)
    assert f"resuming {tmp_path / 'run'} from step 4 of 6" in capsys.readouterr().err
    assert summary["steps"] == 6
