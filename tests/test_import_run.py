"""`delib import`: a run folder from a torchvision state dict (.npz, .safetensors, .pth), explained like a trained
run; its one-line errors leave nothing behind. A classifier of one's own as a features / head split
(`DeliberativeModel.from_split`) in `delib_jax.explain` and the streaming job."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from delib_jax.checkpoint import RunConfig, imagenet_class_names, load_model, load_run_config
from delib_jax.cli import main
from delib_jax.models import DeliberativeModel, predict

NAMES = ["sparrow", "wren", "finch", "blue jay", "crow"]
SIZE = ["--resize", "64", "--crop", "64"]  # resnet18 at 64 px: fast on the 2-core CPU


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torchvision resnet18 of 5 classes (random weights, randomised batch-norm statistics) saved in the three
    formats, its class names, and a few small images."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    from delib_jax.testing.torchvision import build, state_dict_numpy

    root = tmp_path_factory.mktemp("import")
    model = build("resnet18", num_classes=5, seed=1)
    state = state_dict_numpy(model)
    np.savez(root / "r18.npz", **state)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(root / "r18.safetensors"))
    torch.save(model.state_dict(), root / "r18.pth")
    (root / "names.txt").write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(70, 90), (64, 64), (90, 72)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    return {"root": root, "model": model, "state": state}


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(weights, tmp_path_factory):
    """The resnet18 imported once from .npz (what the explain tests read)."""
    out = tmp_path_factory.mktemp("runs") / "r18"
    root = weights["root"]
    args = ["import", root / "r18.npz", "--arch", "resnet18", "--classes", root / "names.txt", "--out", out, *SIZE]
    assert main([str(a) for a in args]) == 0
    return out


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pth"])
def test_import_gives_the_torchvision_models_logits(weights, fmt, tmp_path, capsys):
    from delib_jax.testing.torchvision import logits

    root = weights["root"]
    out = tmp_path / "runs" / "r18"  # its parent made too
    code, err = _run(
        ["import", root / f"r18.{fmt}", "--arch", "resnet18", "--classes", root / "names.txt", "--out", out, *SIZE],
        capsys,
    )
    assert code == 0, err
    assert "no hardness predictor" in err and f"--checkpoint {out}" in err
    config = load_run_config(out)
    assert config.arch == "resnet18" and config.class_names == NAMES and config.num_classes == 5
    assert config.hardness == "none" and config.dataset is None and config.data_dir is None
    assert config.imported_from == str((root / f"r18.{fmt}").resolve())
    assert (config.resize, config.crop) == (64, 64)
    assert config.mean == pytest.approx((0.485, 0.456, 0.406)) and config.std == pytest.approx((0.229, 0.224, 0.225))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    model, _ = load_model(out)
    assert model.hardness_kind == "none"
    x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(predict(model, x).logits), logits(weights["model"], x), atol=2e-4)


def test_defaults_are_imagenet_names_and_the_archs_preprocessing(weights, tmp_path, capsys):
    state = dict(weights["state"])
    rng = np.random.default_rng(3)
    state["fc.weight"] = rng.standard_normal((1000, 512)).astype(np.float32) * 0.01
    state["fc.bias"] = np.zeros(1000, np.float32)
    np.savez(tmp_path / "in1k.npz", **state)
    out = tmp_path / "run"
    out.mkdir()  # an empty folder is taken
    code, err = _run(["import", tmp_path / "in1k.npz", "--arch", "resnet18", "--out", out], capsys)
    assert code == 0, err
    config = load_run_config(out)
    assert config.class_names == imagenet_class_names() and config.num_classes == 1000
    assert (config.resize, config.crop) == (256, 224)  # torchvision's evaluation of resnet18
    # --crop alone scales the default resize; mean and std overridden; --force replaces a run
    code, err = _run(["import", tmp_path / "in1k.npz", "--arch", "resnet18", "--out", out, "--crop", "112",
                      "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--force"], capsys)  # fmt: skip
    assert code == 0, err
    config = load_run_config(out)
    assert (config.resize, config.crop) == (128, 112)
    assert config.mean == (0.5, 0.5, 0.5) and config.std == (0.25, 0.25, 0.25)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_imagenet_names_ship_with_the_package():
    text = resources.files("delib_jax.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    assert len(names) == 1000 and len(set(names)) == 1000 and all(n and n == n.strip() for n in names)
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet tissue"
    assert imagenet_class_names() == names
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES
    except Exception:  # torchvision needs its operator schemas beside the CPU torch
        from delib_jax.testing.torchvision import torchvision

        torchvision()
        from torchvision.models._meta import _IMAGENET_CATEGORIES
    assert names == list(_IMAGENET_CATEGORIES)


def _write_names(path: Path, names: list[str]) -> Path:
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing weights", ["weights file", "nope.npz", "not found"]),
        ("wrong arch", ["is not a torchvision alexnet state dict", "is --arch right?"]),
        ("another depth", ["is not a torchvision resnet34 state dict", "keys missing"]),
        ("count", ["ten.txt has 10 names, the weights' classifier has 5 outputs"]),
        ("imagenet count", ["5 outputs, not ImageNet-1k's 1000", "--classes FILE"]),
        ("empty names", ["holds no class names"]),
        ("duplicate names", ["names 'wren' twice (lines 2 and 4)"]),
        ("blank line", ["line 2 is empty"]),
        ("unknown arch", ["--arch resnet19 is unknown; choose one of", "resnet18", "vgg16"]),
        ("trained only", ["--arch small has no torchvision counterpart"]),
        ("fixed size", ["--crop 64: vit_b_16 takes only 224 px inputs"]),
        ("crop over resize", ["invalid preprocessing: crop 72 and resize 64"]),
        ("not a state dict", ["unsupported weights format '.txt'"]),
        ("existing run", ["is a run folder", "--force"]),
        ("not empty", ["is a folder that is not empty", "--force"]),
        ("a file", ["exists and is not a folder"]),
    ],
)
def test_errors_are_one_line_and_leave_nothing(weights, case, needles, tmp_path, capsys):
    root = weights["root"]
    npz, names = root / "r18.npz", root / "names.txt"
    out = tmp_path / "run"
    args = {
        "missing weights": [tmp_path / "nope.npz", "--arch", "resnet18", "--classes", names],
        "wrong arch": [npz, "--arch", "alexnet", "--classes", names],
        "another depth": [npz, "--arch", "resnet34", "--classes", names],
        "count": [npz, "--arch", "resnet18", "--classes", _write_names(tmp_path / "ten.txt", list("abcdefghij"))],
        "imagenet count": [npz, "--arch", "resnet18"],
        "empty names": [npz, "--arch", "resnet18", "--classes", _write_names(tmp_path / "e.txt", [""])],
        "duplicate names": [npz, "--arch", "resnet18", "--classes",
                            _write_names(tmp_path / "d.txt", ["sparrow", "wren", "finch", "wren", "crow"])],
        "blank line": [npz, "--arch", "resnet18", "--classes",
                       _write_names(tmp_path / "b.txt", ["sparrow", "", "finch", "jay", "crow"])],
        "unknown arch": [npz, "--arch", "resnet19", "--classes", names],
        "trained only": [npz, "--arch", "small", "--classes", names],
        "fixed size": [npz, "--arch", "vit_b_16", "--classes", names, "--crop", "64"],
        "crop over resize": [npz, "--arch", "resnet18", "--classes", names, "--crop", "72", "--resize", "64"],
        "not a state dict": [names, "--arch", "resnet18", "--classes", names],
        "existing run": [npz, "--arch", "resnet18", "--classes", names],
        "not empty": [npz, "--arch", "resnet18", "--classes", names],
        "a file": [npz, "--arch", "resnet18", "--classes", names],
    }[case]  # fmt: skip
    before = None
    if case == "existing run":
        out.mkdir()
        (out / "config.json").write_text("{}")
    elif case == "not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "a file":
        out.write_text("a file")
    if out.exists():
        before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    code, err = _run(["import", *SIZE, *args, "--out", out], capsys)  # the case's --crop / --resize win
    line = _one_line_error(code, err, *needles)
    assert line.startswith("delib import: error: ")
    if before is None:
        assert not out.exists()
    else:  # left as it was
        assert sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_run_config_of_an_imported_run():
    config = RunConfig(arch="resnet18", num_classes=2, class_names=["a", "b"], hardness="none", dataset=None,
                       imported_from="/w/r18.pth", crop=64, resize=64)  # fmt: skip
    assert RunConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = {k: v for k, v in config.to_json().items() if k != "imported_from"}  # a config.json of before the field
    assert RunConfig.from_json({**old, "dataset": "cub"}).imported_from is None
    with pytest.raises(ValueError, match="'imported_from' must be a string or null"):
        RunConfig.from_json({**config.to_json(), "imported_from": 3})
    with pytest.raises(ValueError, match="dataset 'imagenet' is not one of 'cub', 'ade20k', 'folder', 'tfds' or null"):
        RunConfig.from_json({**config.to_json(), "dataset": "imagenet"})
    with pytest.raises(ValueError, match="vit_b_16 takes only 224 px inputs"):
        RunConfig(arch="vit_b_16", num_classes=2, class_names=["a", "b"], crop=256, resize=288)


def test_score_hardness_on_a_run_without_a_predictor_is_one_line(run, weights, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(
        ["explain", weights["root"] / "photos", "--checkpoint", run, "--out", out, "--score", "hardness"], capsys
    )
    _one_line_error(code, err, "--score hardness needs a hardness predictor", "--score entropy", "--score hesitancy",
                    f"python -m train.hardness --checkpoint {run}")  # fmt: skip
    assert not out.exists()
    code, err = _run(["explain", "--data-dir", tmp_path, "--checkpoint", run, "--out", out], capsys)
    _one_line_error(code, err, "names no dataset", "explain image files or folders instead")
    assert not out.exists()


@pytest.mark.slow
def test_explain_and_figures_on_an_imported_run(run, weights, tmp_path, capsys):
    from delib_jax.store import read_manifest, read_records

    out = tmp_path / "explained"
    photos = weights["root"] / "photos"
    code, err = _run(["explain", photos, "--score", "entropy", "--checkpoint", run, "--out", out, "--no-figures",
                      "--batch-size", "2"], capsys)  # fmt: skip
    assert code == 0, err
    assert "Traceback" not in err
    records = list(read_records(out))
    assert len(records) == 3
    for r in records:
        assert r["prediction_name"] in NAMES
        assert all({q["name_a"], q["name_b"]} <= set(NAMES) for q in r["insecurities"])
    manifest = read_manifest(out)
    assert manifest["class_names"] == NAMES and manifest["settings"]["score"] == "entropy"
    assert manifest["input"]["crop"] == 64 and manifest["model"]["arch"] == "resnet18"
    # the figures and the pages, later: no class examples (an imported run has no training data), no failure
    code, err = _run(["figures", out, "--hardest", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert len(list((out / "figures").glob("*.png"))) == 1 and (out / "index.html").is_file()
    # without --score: entropy, said in one line
    code, err = _run(["explain", photos, "--checkpoint", run, "--out", tmp_path / "default", "--no-figures"], capsys)
    assert code == 0, err
    assert "has no hardness predictor: difficulty scored by entropy" in err
    assert read_manifest(tmp_path / "default")["settings"]["score"] == "entropy"


# ------------------------------------------------------------------------------------------------ own classifier


class Features(nnx.Module):
    """A hand-written backbone: two convolutions, batch norm, ReLU; images -> A (B, H/4, W/4, 16)."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.conv2(nnx.relu(self.norm(self.conv1(x)))))


class Head(nnx.Module):
    """Global average pooling and a Linear; no ``out_features`` of its own."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, a):
        return self.linear(a.mean(axis=(1, 2)))


def test_explain_takes_a_features_head_split():
    import delib_jax
    from delib_jax.attribution import attribute

    rngs = nnx.Rngs(0)
    features, head = Features(rngs), Head(rngs)
    features.eval()  # running batch-norm statistics, as inference uses them
    model = DeliberativeModel.from_split(features, head)
    assert model.num_classes == 4 and model.hardness_kind == "none" and model.arch == "custom"
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float32)
    np.testing.assert_allclose(predict(model, images).logits, head(features(images)), rtol=1e-5, atol=1e-5)
    names = ["a", "b", "c", "d"]
    for m in (model, (features, head)):  # the wrapped model, or simply the pair
        found = delib_jax.explain(m, images, score="entropy", top_n=4, class_names=names)
        ref = attribute(head, features(images), score="entropy", top_n=4, method="gradient_hessian")
        np.testing.assert_allclose(np.stack([e.maps for e in found]), ref.maps, rtol=1e-4, atol=1e-6)
        assert all(e.prediction_name in names and e.score == "entropy" for e in found)
    with pytest.raises(ValueError, match="score='entropy' or 'hesitancy'"):
        delib_jax.explain(model, images)
    assert DeliberativeModel.from_split(features, head, num_classes=4).num_classes == 4
    with pytest.raises(TypeError, match="features must be a flax.nnx.Module"):
        DeliberativeModel.from_split(lambda x: x, head)


def test_the_streaming_job_takes_a_features_head_split(weights, tmp_path):
    from delib_jax.store import load_explanations, read_manifest
    from delib_jax.stream import JobOptions, ModelConfig, explain_files

    rngs = nnx.Rngs(0)
    features, head = Features(rngs), Head(rngs)
    names = ["a", "b", "c", "d"]
    config = ModelConfig(class_names=names, resize=36, crop=32)
    files = sorted((weights["root"] / "photos").iterdir())
    summary = explain_files((features, head), config, files, tmp_path / "out", score="entropy", top_n=4,
                            options=JobOptions(batch_size=2, figures=False, progress=False),
                            report=lambda m: None)  # fmt: skip
    assert summary.explained == 3
    found = list(load_explanations(tmp_path / "out"))
    assert [Path(e.source).name for e in found] == ["0.png", "1.png", "2.png"]
    assert all(e.prediction_name in names and e.image_size == (32, 32) for e in found)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["model"]["arch"] == "custom" and manifest["class_names"] == names
    with pytest.raises(ValueError, match="model and run configuration disagree"):
        explain_files((features, head), ModelConfig(class_names=[*names, "e"]), files, tmp_path / "other")


@pytest.mark.slow
def test_faithfulness_on_an_imported_run_reads_a_folder_of_images(run, weights, tmp_path, capsys):
    """An imported run has no dataset: eval.faithfulness samples the image files of --data-dir, preprocessed as the
    run says; a folder without images and an unreadable image are one line each."""
    from delib_jax.evaluation.faithfulness_job import main as faithfulness

    out = tmp_path / "faith"
    photos = weights["root"] / "photos"
    argv = ["--checkpoint", run, "--data-dir", photos, "--out", out, "--num-images", "2", "--methods", "gradient",
            "grad_cam", "--levels", "A", "--steps", "4", "--samples", "4", "--batch-size", "2"]  # fmt: skip
    code = faithfulness([str(a) for a in argv])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert "2" in (out / "table.md").read_text() and results
    empty = tmp_path / "empty"
    empty.mkdir()
    argv[argv.index(photos)] = empty
    assert faithfulness([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no images" in err[0] and "Traceback" not in err[0], err
    (empty / "broken.png").write_bytes(b"not a png")
    assert faithfulness([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err.strip().splitlines()[-1] and "Traceback" not in err, err
