"""Class examples by default: the training image the model finds most typical of each class, kept in the run."""

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config
from delib_jax.class_examples import EXAMPLES_DIR, class_examples
from delib_jax.data.cub import load_cub
from delib_jax.data.synthetic import make_cub
from delib_jax.explanation import preprocess, read_image


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    data = make_cub(root / "data", classes=3, images_per_class=6, size=48)
    ds = load_cub(data)
    config = RunConfig(arch="small", num_classes=3, class_names=list(ds.class_names), crop=32, resize=36,
                       data_dir=str(data), synthetic=True)  # fmt: skip
    save_run_config(root / "run", config)
    model = build_model(config, rngs=nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(root / "run") as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    model.eval()
    return root, model, config, ds


def _own_probability(model, config, path, label) -> float:
    """The model's probability of ``label`` for one image file, computed apart from the module (one image at a time)."""
    import jax

    _, x = preprocess(read_image(path), resize=config.resize, crop=config.crop, normalization=config.normalization)
    return float(jax.nn.softmax(model(x[None]).logits, axis=-1)[0, label])


def test_examples_follow_the_rule_and_are_kept_in_the_run(run, monkeypatch):
    root, model, config, ds = run
    lines = []
    examples = class_examples(root / "run", model, config, report=lines.append, progress=False)
    assert sorted(examples) == [0, 1, 2]
    for c, path in examples.items():
        assert path.parent == root / "run" / EXAMPLES_DIR and Image.open(path).size == (160, 160)
        candidates = np.flatnonzero(ds.is_train & (ds.labels == c))[:16]
        probs = [_own_probability(model, config, ds.image_paths[i], c) for i in candidates]
        best = ds.image_paths[candidates[int(np.argmax(probs))]]
        thumb = np.asarray(Image.open(path), np.float32)
        from delib_jax.visualize import load_example

        expected = load_example(best, 160).astype(np.float32)
        assert np.abs(thumb - expected).mean() < 6  # the same picture (JPEG-compressed)
    index = json.loads((root / "run" / EXAMPLES_DIR / "examples.json").read_text())
    assert index["key"]["step"] == 1 and set(index["probability"]) == {"0", "1", "2"}
    assert any("class examples: 3 classes" in line for line in lines)

    # a second call reads them back without touching the data
    import delib_jax.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "eval_pipeline", lambda *a, **k: pytest.fail("recomputed"))
    assert class_examples(root / "run", model, config, report=lines.append, progress=False) == examples


def test_no_reachable_data_no_examples(run, tmp_path):
    root, model, config, _ = run
    import dataclasses

    gone = dataclasses.replace(config, data_dir=str(tmp_path / "nowhere"))
    save_run_config(tmp_path / "run", gone)
    (tmp_path / "run" / "checkpoints").mkdir()
    lines = []
    assert class_examples(tmp_path / "run", model, gone, report=lines.append, progress=False) == {}
    assert len(lines) == 1 and "not reachable" in lines[0] and "--examples" in lines[0]


@pytest.mark.slow
def test_delib_explain_shows_class_examples_by_default(run, capsys):
    from delib_jax.cli import main

    root, _, _, ds = run
    image = ds.image_paths[int(np.flatnonzero(~ds.is_train)[0])]
    out = root / "out"
    code = main(["explain", str(image), "--checkpoint", str(root / "run"), "--out", str(out), "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    (figure,) = (out / "figures").glob("*.png")
    with_examples = Image.open(figure).size
    out2 = root / "out2"
    args = ["explain", str(image), "--checkpoint", str(root / "run"), "--out", str(out2), "--workers", "0"]
    assert main([*args, "--no-examples"]) == 0
    (plain,) = (out2 / "figures").glob("*.png")
    assert with_examples[1] > Image.open(plain).size[1]  # the examples' row
