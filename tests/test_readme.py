"""The README's library snippet, run as written: the code block of its "Library" section is read from README.md and
executed, so the documentation and the code cannot drift apart.

Stand-ins where the snippet names things this test cannot hold: ``runs/cub`` is a run folder written here (a small
CNN with 6 classes), ``vgg16.safetensors`` a torchvision-format state dict written here for a VGG16 of the same
layout but narrow layers (`delib_jax.models.ARCHS["vgg16"]` swapped for the test), and ``images`` a random batch.
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from delib_jax import models
from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config
from delib_jax.models import backbones
from delib_jax.models.weights import torchvision_entries

ROOT = Path(__file__).resolve().parents[1]
TINY_VGG = (8, "M", 8, "M", 16, "M", 16, "M", 16)  # VGG16's layout (conv blocks, 4 pools in the backbone), narrow


def readme_library_code() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Library\n", 1)[1]
    match = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert match, "README.md's Library section has no python code block"
    return match.group(1)


def _tiny_vgg_spec():
    def head(d, c, *, rngs):
        return models.PoolMLPHead(
            d,
            c,
            hidden=(32, 32),
            pooled_size=(7, 7),
            pool_window=2,
            pool_stride=2,
            dropout=0.5,
            dropout_before=(1, 2),
            rngs=rngs,
        )

    return models.ArchSpec(lambda **kw: backbones.VGG(TINY_VGG, batch_norm=False, **kw), head, 32)


def _torchvision_state_dict(model) -> dict[str, np.ndarray]:
    """``model``'s backbone and hidden class-head layers under torchvision's names and layouts (the inverse of the
    import's conversions; the last class layer left out, as classifier_output=False allows)."""
    last = len(model.classifier.linears) - 1
    out = {}
    for key, path, kind in torchvision_entries(model):
        if path[:3] == ("classifier", "linears", last):
            continue
        node = model
        for p in path:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        w = np.asarray(node[...], np.float32)
        if kind == "conv":
            w = w.transpose(3, 2, 0, 1)
        elif kind == "linear":
            w = w.T
        elif kind == "linear_nchw":  # ours (h*w*D, O) in NHWC order -> torch (O, D*h*w)
            d = model.backbone.out_channels
            side = int(round((w.shape[0] // d) ** 0.5))
            w = w.reshape(side, side, d, -1).transpose(3, 2, 0, 1).reshape(w.shape[1], -1)
        out[key] = np.ascontiguousarray(w)
    return out


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    names = [f"bird {i}" for i in range(6)]
    config = RunConfig(arch="small", num_classes=6, class_names=names, crop=32, resize=36, seed=0)
    run = tmp_path / "runs" / "cub"
    save_run_config(run, config)
    _, params, rest = nnx.split(build_model(config), nnx.Param, ...)
    with RunCheckpoints(run) as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})

    monkeypatch.setitem(models.ARCHS, "vgg16", _tiny_vgg_spec())
    source = models.create_model("vgg16", 1000, hardness="none", rngs=nnx.Rngs(7))  # "ImageNet" weights
    save_file(_torchvision_state_dict(source), str(tmp_path / "vgg16.safetensors"))

    monkeypatch.chdir(tmp_path)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3), jnp.float32)
    namespace = {"images": images}
    exec(compile(readme_library_code(), "README.md (Library)", "exec"), namespace)

    assert len(namespace["explanations"]) == 2
    assert {n for e in namespace["explanations"] for n in e.class_names} <= set(names)
    model, a, attr = namespace["model"], namespace["a"], namespace["attr"]
    # the imported weights are in the model, and A was computed with them (eval mode: per-image results)
    np.testing.assert_array_equal(model.backbone.convs[0].kernel[...], source.backbone.convs[0].kernel[...])
    np.testing.assert_array_equal(model.features(images[:1]), a[:1])
    assert attr.maps.shape == (2, 201, *a.shape[1:3])
    assert namespace["cams"].shape == (2, 200, *a.shape[1:3])
    maps = namespace["explain_fn"](images).maps
    np.testing.assert_allclose(maps, attr.maps, rtol=1e-4, atol=1e-6 * float(np.abs(attr.maps).max()))
