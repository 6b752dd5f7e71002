"""Synthetic output folders of the explanation store, written with the job's own writer but no model: random arrays
of the right shapes, for tests, benchmarks and the documentation.

    from delib_jax.testing.store import synthetic_folder
    synthetic_folder("explained/", images=1000, shard_size=256)   # manifest, index, shards, as `delib explain` writes
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NAMES = ["sparrow", "wren", "tern", "finch"]
INSECURITIES = 3
SETTINGS = {"method": "gradient_hessian", "score": "hardness", "top_n": None, "k": 2, "coverage": 0.1,
            "threshold": None, "max_insecurities": INSECURITIES, "positive": True}  # fmt: skip


def synthetic_rows(n: int, *, crop: int = 32, maps: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """n rows as the job's device stage hands them to the writer (``mask_bits`` packed), maps of maps x maps."""
    from delib_jax.store import pack_bits

    rng = np.random.default_rng(seed)
    c, q = len(NAMES), INSECURITIES
    probs = rng.dirichlet(np.ones(c), n).astype(np.float32)
    return {
        "probs": probs, "difficulty": rng.random(n, dtype=np.float32),
        "classes": np.argsort(-probs, axis=1).astype(np.int32),
        "maps": rng.standard_normal((n, c + 1, maps, maps), dtype=np.float32),
        "grad_cam": rng.random((n, maps, maps), dtype=np.float32),
        "pairs": np.tile(np.asarray([[0, 1], [0, 2], [1, 2]], np.int32), (n, 1, 1)),
        "strength": rng.random((n, q), dtype=np.float32), "coverage": np.full((n, q), 0.1, np.float32),
        "threshold": rng.random((n, q), dtype=np.float32), "valid": rng.random((n, q)) < 0.8,
        "mask_bits": pack_bits(rng.random((n, q, crop, crop)) < 0.1),
    }  # fmt: skip


def synthetic_folder(
    out: str | Path, *, images: int = 10, shard_size: int = 4, crop: int = 32, seed: int = 0, prefix: str = "/data"
) -> dict[str, np.ndarray]:
    """Write an output folder of ``images`` explained images (sources ``PREFIX/img_IIIIII.jpg``) with
    `delib_jax.store.ShardWriter`; returns the rows written (as `synthetic_rows`)."""
    from delib_jax import store as st
    from delib_jax.job.writing import host_lists, make_record

    out = Path(out)
    directory = out / st.DIRECTORY
    directory.mkdir(parents=True)
    run = st.new_run_id()
    manifest = {"format": st.FORMAT, "model": {"arch": "synthetic"}, "settings": SETTINGS,
                "input": {"resize": crop, "crop": crop, "mean": [0.5] * 3, "std": [0.25] * 3}, "figures": False,
                "class_names": NAMES, "run": run}  # fmt: skip
    (out / st.MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    writer = st.ShardWriter(directory, 0, shard_size, image_size=(crop, crop), run=run)
    parts = []
    for start in range(0, images, shard_size):  # a shard at a time: 100,000 images in little memory
        part = synthetic_rows(min(shard_size, images - start), crop=crop, seed=seed * 1_000_003 + start)
        parts.append({k: v.copy() for k, v in part.items()})
        lists = host_lists(part, (crop, crop), from_strength=False)  # random strengths
        records = [make_record(start + j, f"{prefix}/img_{start + j:06d}.jpg", [1000 + start + j, 7], lists, j, NAMES,
                           None) for j in range(len(part["probs"]))]  # fmt: skip
        writer.add(part, records)
    writer.flush(final=True)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
