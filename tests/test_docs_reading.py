"""docs/reading-explanations.md, run as written: its python blocks in order, in one namespace. Stand-ins only for
what the user brings: ``runs/cub`` (a small 6-class run written here), ``photo.jpg`` and ``blank.png``; the
explanations read back also hold one without any insecurity, which the loop must take."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import delib_jax
from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "reading-explanations.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.mark.slow
def test_reading_explanations_doc_runs(tmp_path, monkeypatch, capsys):
    config = RunConfig(arch="small", num_classes=6, class_names=[f"bird_{i}" for i in range(6)], crop=32, resize=36)
    save_run_config(tmp_path / "runs" / "cub", config)
    _, params, rest = nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    with RunCheckpoints(tmp_path / "runs" / "cub") as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(tmp_path / "blank.png")

    real = delib_jax.load_explanations

    def with_an_image_without_insecurities(out, **kw):
        found = list(real(out, **kw))
        yield from found
        yield dataclasses.replace(found[0], insecurities=(), source="empty.png")

    monkeypatch.setattr(delib_jax, "load_explanations", with_an_image_without_insecurities)
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks()
    assert len(blocks) == 2
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} (block {i + 1})", "exec"), namespace)
    out = capsys.readouterr().out
    assert "of the ambiguity" in out or "nothing competes" in out
    assert "empty.png: bird_" in out and "nothing competes" in out
    assert (tmp_path / "figure.png").is_file() and (tmp_path / "explained" / "index.html").is_file()
    assert "e-" not in out  # no raw strengths
