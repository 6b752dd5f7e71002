"""A figure is a pure function of its inputs: the same explanation, pixels and examples give the same PNG bytes in
every process (issue 33: two runs of the same `delib explain` drew figures that differed by one colour level in
some pixels of the insecurities' outlines: the constrained layout's answer varied in its last bits from one
process to another, and `delib_jax.visualize` now fixes the axes where the layout put them, rounded)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # eight fresh processes, each importing JAX and matplotlib

DRAW = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    import numpy as np
    from delib_jax.explanation import Explanation, Insecurity
    from delib_jax.visualize import figure_png

    names = ["001.Pink_Winged_Finch", "002.Yellow_Winged_Warbler", "003.Green_Winged_Sparrow",
             "004.Olive_Winged_Vireo", "005.Iridescent_Winged_Tanager", "006.Black_Winged_Bunting",
             "007.Orange_Winged_Flycatcher", "008.Green_Winged_Grosbeak", "009.Blue_Winged_Wren",
             "010.Red_Winged_Oriole"]
    folder, crop = Path(sys.argv[1]), 64
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(10) * 0.5).astype(np.float32)
    classes = np.argsort(-probs)[:5]
    maps = rng.standard_normal((6, 8, 8)).astype(np.float32)
    items = []
    for q, (a, b) in enumerate([(0, 1), (0, 2), (1, 2), (1, 4)]):  # four insecurities and their examples
        yy, xx = np.mgrid[:crop, :crop]
        cy, cx, r = rng.integers(10, 54, 2).tolist() + [rng.integers(5, 20)]
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) | (rng.random((crop, crop)) < 0.01)
        ca, cb = int(classes[a]), int(classes[b])
        items.append(Insecurity(mask=mask, strength=np.float32(0.1 * (4 - q)), coverage=np.float32(0.1),
                                threshold=np.float32(0.5), a=ca, b=cb, name_a=names[ca], name_b=names[cb]))
    p = int(np.argmax(probs))
    e = Explanation(probs=probs, difficulty=np.float32(rng.random()), classes=classes, maps=maps,
                    grad_cam=rng.random((8, 8)).astype(np.float32), insecurities=tuple(items), prediction=p,
                    prediction_name=names[p], class_names=tuple(names[int(c)] for c in classes), score="hardness",
                    method="gradient_hessian", image_size=(crop, crop), source="/data/bird.jpg")
    pixels = np.random.default_rng(1).integers(0, 256, (crop, crop, 3), dtype=np.uint8)
    examples = {c: folder / f"example{c}.jpg" for c in range(10)}  # as the job has them: JPEG thumbnails
    print(hashlib.sha256(figure_png(e, pixels, examples=examples)).hexdigest())
""")


def test_the_same_figure_in_fresh_processes_is_the_same_bytes(tmp_path):
    """Eight fresh processes draw one figure (one whose layout varied in about a third of the processes before the
    fix): the same bytes every time."""
    rng = np.random.default_rng(0)
    for c in range(10):
        Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(tmp_path / f"example{c}.jpg")
    env = {**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"}
    digests = []
    for start in range(0, 8, 2):  # two at a time (two cores)
        runs = [subprocess.Popen([sys.executable, "-c", DRAW, str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**env, "PYTHONHASHSEED": str(start + k)})
                for k in range(2)]  # fmt: skip
        for run in runs:
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-3000:]
            digests.append(out.split()[-1])
    assert len(set(digests)) == 1, digests
