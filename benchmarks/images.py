"""Your own images: the training pipeline's images/s on class folders and on a TFDS catalog dataset against the CUB
reader, on the same image files, in one process; and the listing and splitting of a large class-folder dataset.

    python -m benchmarks.images --synthetic --size 500                  # CUB release vs class folders vs catalog
    python -m benchmarks.images --data-dir /data/CUB_200_2011 --images 2000
    python -m benchmarks.images --listing 100000                        # 100,000 files: listed and split

The sources hold the same encoded images: the CUB release folder (`load_dataset("cub", ...)`), class folders made of
hard links to its training images (``DIR/CLASS/NAME``: `load_dataset("folder", ...)`), and a TFDS catalog dataset
prepared from their bytes (ArrayRecord, `delib_jax.testing.catalog`: `load_dataset("tfds", ...)`). The CUB reader's
training split is timed against the class folders' and the catalog's training splits (the same number of images:
every example of the folders is in their train split here, --val-fraction is tiny), interleaved, --rounds times,
each round --steps batches of a fresh iterator at new steps (`benchmarks.pipeline.images_per_s`). One JSON line per
source: the median images/s, the median ratio to the CUB reader in the same round, the same per CPU second.

--listing N makes N empty ``.jpg`` files in --classes class folders (no image is opened to list or split) and times
`load_folders` (listing, class names, the carved splits) --rounds times: the median and best seconds, the peak of the
Python heap while listing (tracemalloc), what the dataset keeps (its names in flat memory, labels, splits), and the
time to stat every test file (what a resume's plan compares; no image is read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.pipeline import images_per_s
from delib_jax.data import DatasetError, dataset_source, load_dataset
from delib_jax.data.pipeline import train_pipeline


def class_folders(cub_root: Path, out: Path, images: int | None) -> Path:
    """The CUB release's training images (the first ``images``) as class folders of hard links (copies where links
    cannot be made): ``out/CLASS/NAME``."""
    ds = load_dataset("cub", cub_root)
    train = np.flatnonzero(ds.is_train)[:images]
    for i in train.tolist():
        source = Path(ds.image_paths[i])
        target = out / ds.class_names[ds.labels[i]] / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    return out


def catalog(folders: Path, data_dir: Path) -> str:
    """The class folders' images (their bytes, unchanged) as the TFDS catalog dataset ``my_images`` in ``data_dir``."""
    from delib_jax.testing.catalog import prepare

    ds = load_dataset("folder", folders, options={"val_fraction": 1e-9, "test_fraction": 1e-9})
    examples = [(Path(ds.image_paths[i]).read_bytes(), int(ds.labels[i])) for i in range(len(ds))]
    prepare("my_images", data_dir, {"train": examples}, list(ds.class_names))
    return "my_images"


def compare(sources: dict[str, tuple], *, batch: int, steps: int, warmup: int, rounds: int, threads: int,
            crop: int) -> list[dict]:  # fmt: skip
    """Interleaved rounds over ``sources`` (name -> (kind, path, options, example indices or None for the train
    split); the first is the reference)."""
    pipes = {}
    for name, (kind, path, options, indices) in sources.items():
        ds = load_dataset(kind, path, options=options)
        source = dataset_source(kind, ds, "train", indices=indices)
        pipes[name] = train_pipeline(source, batch_size=batch, num_epochs=None, crop=crop, num_threads=threads,
                                     normalize=False)  # fmt: skip
    for p in pipes.values():
        images_per_s(p, 0, max(warmup, 1))
    wall: dict[str, list[float]] = {n: [] for n in pipes}
    cpu: dict[str, list[float]] = {n: [] for n in pipes}
    for r in range(rounds):
        for name, p in pipes.items():
            w, c = images_per_s(p, max(warmup, 1) + r * steps, steps)
            wall[name].append(w)
            cpu[name].append(c)
    reference = next(iter(pipes))

    def ratio(values: dict[str, list[float]], name: str) -> float:
        return round(statistics.median([v / ref for v, ref in zip(values[name], values[reference])]), 3)

    return [{
        "benchmark": "images", "source": name, "kind": sources[name][0],
        "images_per_s": round(statistics.median(wall[name]), 1), "ratio_to_cub": ratio(wall, name),
        "images_per_cpu_s": round(statistics.median(cpu[name]), 1), "cpu_ratio_to_cub": ratio(cpu, name),
        "rounds_images_per_s": [round(v, 1) for v in wall[name]], "train_images": len(pipes[name].source),
        "batch": batch, "steps": steps, "rounds": rounds, "threads": threads, "crop": crop, "cpus": os.cpu_count(),
    } for name in pipes]  # fmt: skip


def listing(n: int, classes: int, rounds: int, root: Path) -> dict:
    """Time `load_folders` on ``n`` empty files in ``classes`` class folders (made under ``root``)."""
    from delib_jax.data.folders import load_folders
    from delib_jax.job.inputs import DatasetInputs

    t = time.perf_counter()
    for c in range(classes):
        folder = root / f"class_{c:04d}"
        folder.mkdir(parents=True)
        for k in range(c, n, classes):
            (folder / f"image_{k:07d}.jpg").touch()
    made = time.perf_counter() - t
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        ds = load_folders(root)
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    load_folders(root)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    inputs = DatasetInputs(ds, "folder", "test", root, ds.options)
    t = time.perf_counter()
    stats = [inputs.fingerprint(k) for k in range(len(inputs))]
    stat_s = time.perf_counter() - t
    assert all(s is not None for s in stats)
    names = ds.image_paths
    kept = len(names._blob) + names._ends.nbytes + ds.labels.nbytes + ds.split.nbytes  # what the dataset holds
    return {
        "benchmark": "images-listing", "files": len(ds), "classes": ds.num_classes, "splits": ds.counts(),
        "made_s": round(made, 2), "list_and_split_s": round(statistics.median(times), 3),
        "best_s": round(min(times), 3), "rounds": rounds, "peak_python_heap_mb": round(peak / 1e6, 1),
        "dataset_mb": round(kept / 1e6, 2),
        "stat_test_files_s": round(stat_s, 3), "cpus": os.cpu_count(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", action="store_true", help="generate a synthetic CUB in a temporary folder")
    data.add_argument("--data-dir", "--cub", type=Path, help="a CUB_200_2011 release folder (or its parent)")
    data.add_argument("--listing", type=int, metavar="N", help="time listing and splitting N files instead")
    parser.add_argument("--size", type=int, default=500, help="--synthetic: image width in pixels (CUB's are ~500)")
    parser.add_argument("--images-per-class", type=int, default=40, help="--synthetic: images of each of 10 classes")
    parser.add_argument("--images", type=int, help="the first N training images only (default: all)")
    parser.add_argument("--classes", type=int, default=200, help="--listing: class folders (default 200)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.listing:
                print(json.dumps(listing(args.listing, args.classes, args.rounds, Path(tmp) / "folders")))
                return 0
            root = args.data_dir
            if args.synthetic:
                from delib_jax.data.synthetic import make_cub

                root = make_cub(Path(tmp) / "release", size=args.size, images_per_class=args.images_per_class)
            folders = class_folders(root, Path(tmp) / "folders", args.images)
            name = catalog(folders, Path(tmp) / "tfds")
            tiny = {"val_fraction": 1e-9, "test_fraction": 1e-9}  # every image in train: the CUB split's size
            cub_train = np.flatnonzero(load_dataset("cub", root).is_train)[: args.images]
            sources = {
                "cub": ("cub", root, None, cub_train),  # the images the class folders hold
                "folder": ("folder", folders, tiny, None),
                "tfds": ("tfds", Path(tmp) / "tfds", {"name": name, **tiny}, None),
            }
            records = compare(sources, batch=args.batch, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                              threads=args.threads, crop=args.crop)  # fmt: skip
            for record in records:
                record["data"] = f"synthetic-cub ({args.size} px)" if args.synthetic else str(root)
                print(json.dumps(record))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
