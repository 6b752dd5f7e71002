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
    st.create_manifest(out, st.sealed_manifest(manifest))
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


# ------------------------------------------------------------------------------------------------ a job without a model


def input_files(folder: str | Path, *, images: int = 10, broken: tuple[int, ...] = (3,)) -> list[Path]:
    """``images`` small input files in ``folder`` (``img_IIIIII.jpg``, each of its own size); those of ``broken``
    ordinals hold b"broken" and are skipped by `synthetic_job` as unreadable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(images):
        path = folder / f"img_{i:06d}.jpg"
        path.write_bytes(b"broken" if i in broken else bytes([i % 251]) * (100 + i))
        files.append(path)
    return files


def job_manifest(crop: int = 32) -> dict:
    """The manifest a `synthetic_job` asks for (before its run id)."""
    from delib_jax import store as st

    return {"format": st.FORMAT, "model": {"arch": "synthetic"}, "settings": SETTINGS,
            "input": {"resize": crop, "crop": crop, "mean": [0.5] * 3, "std": [0.25] * 3}, "figures": False,
            "class_names": NAMES}  # fmt: skip


def synthetic_job(out: str | Path, files, *, shard_size: int = 4, crop: int = 32, report=None):
    """What `delib_jax.stream.explain_files` does to its output folder, with a stand-in for the model: the same
    folder checks (`delib_jax.job.folder.prepare_folder`), the same resume (`plan_resume`), the same writer; the
    image of ordinal i gets the rows `synthetic_rows(1, seed=i)` whenever it is explained (an input holding
    b"broken" is skipped as unreadable). Returns the `JobSummary` with ``explained_sources``: the sources explained
    by this call, in order."""
    from delib_jax import store as st
    from delib_jax.job.folder import JobSummary, PathList, lock_folder, plan_resume, prepare_folder
    from delib_jax.job.writing import host_lists, make_record

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = report or (lambda message: None)
    files = files if isinstance(files, PathList) else PathList(files)
    lock = lock_folder(out, 0)
    try:
        directory, run = prepare_folder(out, job_manifest(crop), figures=False)
        plan = plan_resume(out, directory, files, (0, 1), figures=False, report=report)
        writer = st.ShardWriter(directory, 0, shard_size, next_seq=plan.next_seq, image_size=(crop, crop), run=run)
        explained, skipped = [], []
        for i, path in plan.todo:
            source, stat = str(path), plan.stats[i]
            if stat is None or Path(path).read_bytes() == b"broken":
                reason = f"cannot decode {source}"
                skipped.append((source, reason))
                writer.skip({"i": i, "source": source, "stat": stat, "skipped": reason})
                continue
            row = synthetic_rows(1, crop=crop, seed=i)
            lists = host_lists(row, (crop, crop), from_strength=False)
            writer.add(row, [make_record(i, source, stat, lists, 0, NAMES, None)])
            explained.append(source)
        writer.flush(final=True)
    finally:
        lock.close()
    summary = JobSummary(out=out, total=len(files), explained=len(explained), resumed=plan.resumed,
                         skipped=[*plan.skipped, *skipped], bytes_written=writer.bytes_written)  # fmt: skip
    summary.explained_sources = explained
    return summary


def stored(out: str | Path) -> dict:
    """What a folder serves, to compare folders: source -> (its index record less where it is stored (row, shard,
    digest, figure), the arrays of its `Explanation`) for every explained image, and source -> record for every
    skipped one. Raises `delib_jax.store.StoreDamage` for a damaged folder."""
    from delib_jax import store as st

    served, skipped = {}, {}
    for r, e in st.iter_explanations(out):
        content = {k: v for k, v in r.items() if k not in ("row", "shard", "digest", "figure")}
        served[r["source"]] = (json.dumps(content, sort_keys=True), explanation_digest(e))
    for r in st.read_records(out, skipped=True):
        if "skipped" in r:
            skipped[r["source"]] = json.dumps(r, sort_keys=True)
    assert len(served) == sum(1 for _ in st.read_records(out)), "records the reader does not serve"
    return {"explained": served, "skipped": skipped}


def explanation_digest(e) -> str:
    """A digest of every value of an `Explanation` (arrays bit for bit, its insecurities, names and settings)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for v in (e.probs, e.classes, e.maps, e.grad_cam, np.float32(e.difficulty)):
        h.update(np.ascontiguousarray(v).tobytes())
    for q in e.insecurities:
        h.update(np.packbits(q.mask).tobytes())
        h.update(repr((q.a, q.b, q.name_a, q.name_b, float(q.strength), float(q.coverage),
                       float(q.threshold))).encode())  # fmt: skip
    h.update(repr((e.prediction, e.prediction_name, e.class_names, e.score, e.method, e.image_size,
                   e.source)).encode())  # fmt: skip
    return h.hexdigest()
