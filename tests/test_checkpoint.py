"""Run directories: config round trip, checkpoint round trip, load_model errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from delib_jax.checkpoint import (
    CheckpointError,
    RunCheckpoints,
    RunConfig,
    build_model,
    load_model,
    load_run_config,
    save_run_config,
)


def _config(**kw) -> RunConfig:
    base = dict(arch="small", num_classes=3, class_names=["a", "b", "c"], crop=32, resize=36, seed=3)
    return RunConfig(**{**base, **kw})


def test_config_round_trip(tmp_path):
    config = _config(hardness="network", mean=(0.1, 0.2, 0.3), steps=7)
    save_run_config(tmp_path, config)
    loaded = load_run_config(tmp_path)
    assert loaded == config
    assert loaded.class_names == ["a", "b", "c"] and loaded.mean == (0.1, 0.2, 0.3)
    assert json.loads((tmp_path / "config.json").read_text())["arch"] == "small"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(arch="resnet9"), "arch"),
        (dict(class_names=["a", "b"]), "class names"),
        (dict(hardness="both"), "hardness"),
        (dict(crop=64, resize=36), "crop"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(std=(float("nan"), 0.2, 0.2)), "finite"),
        (dict(mean=(0.5, float("inf"), 0.5)), "finite"),
        (dict(std=(0.2, 0.0, 0.2)), "std must be positive"),
        (dict(crop=4), "minimum crop for small is 8"),  # stride 8: a 0x0 feature grid
        (dict(arch="vgg16", crop=31), "minimum crop for vgg16 is 32"),  # the head's 2x2 max pool needs a 2x2 grid
    ],
)
def test_config_rejects_invalid(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_config_json_with_nan_std_is_refused_naming_the_file(tmp_path):
    save_run_config(tmp_path, _config())
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace("0.2667", "NaN"))
    with pytest.raises(ValueError, match=f"{path}.*finite"):
        load_run_config(tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"arch": "small", "colour": "red"}))
    with pytest.raises(ValueError, match="unknown fields colour"):
        load_run_config(tmp_path)
    save_run_config(tmp_path, _config())
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="which"):
        load_model(tmp_path, which="first")


@pytest.mark.slow
def test_save_restore_round_trip_gives_identical_logits(tmp_path):
    config = _config(hardness="head")
    save_run_config(tmp_path, config)
    model = build_model(config, rngs=nnx.Rngs(11))  # not the config's seed: load_model must not re-initialise
    model.train()
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    forward = nnx.jit(lambda m, x: m(x))  # compiled: eager ops would each compile on their own
    forward(model, x)  # move the batch statistics away from their initial values
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save("best", 5, params=params, model_state=rest, meta={"val_accuracy": 0.5})
        ckpt.save("latest", 6, params=params, model_state=rest, meta={})
    model.eval()
    expected = forward(model, x)
    for which in ("best", "latest"):
        loaded, loaded_config = load_model(tmp_path, which=which)
        assert loaded_config == config
        out = forward(loaded, x)
        np.testing.assert_array_equal(out.logits, expected.logits)
        np.testing.assert_array_equal(out.hardness_logit, expected.hardness_logit)
    # eval mode: a second call does not change anything (running statistics are used, not updated)
    np.testing.assert_array_equal(forward(loaded, x).logits, expected.logits)
    # the dropout streams (typed PRNG keys) survive the round trip
    key = nnx.state(loaded, nnx.RngKey)
    assert all(jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key) for k in jax.tree.leaves(key))


def _saved_run(tmp_path, config):
    save_run_config(tmp_path, config)
    model = build_model(config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})


def test_corrupt_checkpoint_is_one_checkpoint_error(tmp_path):
    _saved_run(tmp_path, _config())
    chunks = [f for f in (tmp_path / "checkpoints" / "best").rglob("*") if f.is_file() and "/params/" in str(f)]
    for f in chunks:
        if f.parent.name == "d":  # the array data files
            f.write_bytes(f.read_bytes()[:20])
    message = r"checkpoints/best is unreadable \(cannot read the array .*--which latest"
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value) and "TensorStore" not in str(e.value)


def test_checkpoint_of_another_model_says_config_json_was_edited(tmp_path):
    _saved_run(tmp_path, _config())
    save_run_config(tmp_path, _config(num_classes=4, class_names=list("abcd")))  # num_classes edited afterwards
    with pytest.raises(CheckpointError, match=r"does not fit the model its run's config.json describes") as e:
        load_model(tmp_path)
    assert "strict" not in str(e.value) and "ArrayRestoreArgs" not in str(e.value)


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's json parser recurses


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_classes", 3.0, "'num_classes' must be an integer"),  # a float where an integer belongs
        ("class_names", "abc", "'class_names' must be a list of strings"),  # not 3 one-letter names
        ("class_names", ["a", 2, "c"], "'class_names' must be a list of strings"),
        ("crop", -5, "crop -5"),
        ("crop", 10**9, "crop 1000000000"),
        ("resize", 36.5, "'resize' must be an integer"),
        ("seed", 2**80, "seed must lie in"),
        ("seed", -1, "seed must lie in"),
        ("hardness_hidden", 10**7, "hardness_hidden must lie in"),
        ("batch_size", True, "'batch_size' must be an integer"),
        ("epochs", 0, "epochs must lie in"),
        ("steps", 1.5, "'steps' must be an integer or null"),
        ("steps", 2**40, "steps must lie in"),
        ("warmup_steps", -3, "warmup_steps must lie in"),
        ("lr", "0.1", "'lr' must be a number"),
        ("val_fraction", None, "'val_fraction' must be a number"),
        ("synthetic", "yes", "'synthetic' must be true or false"),
        ("arch", ["small"], "'arch' must be a string"),
        ("data_dir", 5, "'data_dir' must be a string or null"),
        ("mean", [[0.1], 0.2, 0.3], "'mean' must be a list of 3 numbers"),
        ("std", [0.2, 0.2], "'std' must be a list of 3 numbers"),
        ("mean", DEEP, "nested too deeply"),
    ],
)
def test_tampered_config_json_is_one_line_naming_the_file_and_field(tmp_path, field, value, match):
    save_run_config(tmp_path, _config())
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    if value is DEEP:
        path.write_text(json.dumps({**data, field: None}).replace("null", DEEP))
    else:
        data[field] = value
        path.write_text(json.dumps(data))
    for load in (load_run_config, load_model):
        with pytest.raises(ValueError, match=match) as e:
            load(tmp_path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        assert len(str(e.value)) < 500  # a huge value is not echoed in full


def test_tampered_config_json_in_every_command_is_one_line(tmp_path, capsys):
    """train --resume, delib explain and eval read config.json: each prints one line naming the file, exit 2."""
    from delib_jax.cli import main as delib
    from delib_jax.evaluation.run import main as evaluate
    from delib_jax.train.cli import main as train

    save_run_config(tmp_path, _config())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "class_names": "abc"}))
    commands = [
        lambda: train("cub", ["--out", str(tmp_path), "--resume", "--no-progress"]),
        lambda: delib(["explain", str(tmp_path), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]),
        lambda: evaluate(
            "cub", ["--checkpoint", str(tmp_path), "--data-dir", str(tmp_path), "--out", str(tmp_path / "e")]
        ),
    ]
    for run in commands:
        assert run() == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(path) in err and "class_names" in err and "Traceback" not in err, err
