"""Example images of every class from a run's training split, shown beside each insecurity (the paper's Fig. 1, 3).

    examples = class_examples("runs/cub_small", model, config)   # {class index: RUN_DIR/class_examples/00017.jpg}

The rule: for each class c, among its first `PER_CLASS` training images (dataset order), the one to which the model
gives the highest probability of c, i.e. the training image the model finds most typical of c. Computed once per
run and checkpoint (at most ``PER_CLASS`` x C images through the model, with a progress bar) and kept in
RUN_DIR/class_examples/ as 160 px JPEG thumbnails with an ``examples.json`` that says for which checkpoint they
were chosen; a later call reads them from there. When the training data is not reachable (config.json records no
data folder, silently, or it is gone, said in one line) there are no examples: the figures then have no example
row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES_DIR = "class_examples"
INDEX = "examples.json"
PER_CLASS = 16
THUMBNAIL = 160
RULE = "the most probable as its class among its first per_class training images"


def _key(run_dir: Path, config, which: str, per_class: int) -> dict[str, Any]:
    """What the cached examples were chosen for: the checkpoint (which, step), the data folder and the rule."""
    from delib_jax.checkpoint import RunCheckpoints

    with RunCheckpoints(run_dir, create=False, async_save=False) as ckpt:
        step = ckpt.step(which)
    key = {"rule": RULE, "per_class": per_class, "which": which, "step": step, "data_dir": config.data_dir,
           "num_classes": config.num_classes}  # fmt: skip
    options = getattr(config, "data_options", None)
    return key if options is None else {**key, "data_options": options}  # the carved training split


def cached_examples(folder: Path, key: dict[str, Any]) -> dict[int, Path] | None:
    """The examples kept in ``folder`` when they were chosen for ``key`` and all their files are there, else None."""
    try:
        data = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("files"), dict):
        return None
    files = {int(c): folder / str(name) for c, name in data["files"].items() if str(c).isdecimal()}
    if not all(p.is_file() and p.parent == folder for p in files.values()):
        return None
    return files


def _source(config, ds, indices: np.ndarray):
    from delib_jax.data import dataset_source

    return dataset_source(config.dataset, ds, indices=indices)


def choose_examples(
    model, config, ds, *, per_class: int = PER_CLASS, batch_size: int = 32, progress: bool = True
) -> tuple[dict[int, int], dict[int, float], Any]:
    """Apply the rule (module docstring) to dataset ``ds``: (class -> position in the returned source, class -> its
    probability, the source of the candidate images). Classes without training images have none."""
    import jax
    from flax import nnx

    from delib_jax.data.pipeline import eval_pipeline
    from delib_jax.progress import progress_bar

    labels, is_train = np.asarray(ds.labels), np.asarray(ds.is_train, bool)
    candidates = [np.flatnonzero(is_train & (labels == c))[:per_class] for c in range(config.num_classes)]
    indices = np.concatenate(candidates).astype(np.int64) if candidates else np.zeros(0, np.int64)
    if not len(indices):
        return {}, {}, None
    source = _source(config, ds, indices)
    pipe = eval_pipeline(source, batch_size=batch_size, resize=config.resize, crop=config.crop,
                         stats=config.normalization, num_threads=2)  # fmt: skip
    forward = nnx.jit(lambda m, x: jax.nn.softmax(m(x).logits, axis=-1))
    probs = []
    for batch in progress_bar(pipe, desc="class examples", unit="batch", disable=not progress, leave=False):
        probs.append(np.asarray(forward(model, batch["image"])))
    probs = np.concatenate(probs)[: len(indices)]
    own = probs[np.arange(len(indices)), labels[indices]]  # each image's probability of its own class
    chosen, probability, start = {}, {}, 0
    for c, group in enumerate(candidates):
        if len(group):
            best = start + int(np.argmax(own[start : start + len(group)]))
            chosen[c], probability[c] = best, float(own[best])
        start += len(group)
    return chosen, probability, source


def class_examples(
    run_dir: str | Path,
    model,
    config,
    *,
    which: str = "best",
    per_class: int = PER_CLASS,
    report: Callable[[str], None] = print,
    progress: bool = True,
    data: tuple[str, str | Path, dict | None, np.ndarray | None] | None = None,
) -> dict[int, Path | np.ndarray]:
    """Class index -> example image of that class from the run's training split (module docstring), read from
    RUN_DIR/class_examples/ or computed once and kept there; {} when the training data is not reachable. A run
    folder that cannot be written to gives the examples in memory (uint8 thumbnails) without keeping them.
    ``data``: (kind, folder, options, data class -> model class index or None) to take them from the training
    split of other data instead (a run imported from weights has none of its own): the model's classes it holds."""
    import dataclasses

    from delib_jax.data import load_dataset
    from delib_jax.data.pipeline import read_example
    from delib_jax.explanation import atomic_write, write_json
    from delib_jax.visualize import load_example

    run_dir = Path(run_dir)
    folder = run_dir / EXAMPLES_DIR
    mapping = None
    if data is not None:
        kind, data_dir, options, mapping = data
        config = dataclasses.replace(config, dataset=kind, data_dir=str(Path(data_dir).absolute()),
                                     data_options=options)  # fmt: skip
    key = _key(run_dir, config, which, per_class)
    cached = cached_examples(folder, key)
    if cached is not None:
        return cached
    if not config.data_dir:  # a run that records no data folder: nothing to look for, nothing to say
        return {}
    if not Path(config.data_dir).exists():
        report(f"no class examples: the training data ({config.data_dir}) is not reachable; give --examples")
        return {}
    try:
        ds = load_dataset(config.dataset, config.data_dir, options=getattr(config, "data_options", None))
        if mapping is not None:  # the data's labels as the model's class indices
            ds = dataclasses.replace(ds, labels=np.asarray(mapping)[ds.labels])
        chosen, probability, source = choose_examples(model, config, ds, per_class=per_class, progress=progress)
        thumbnails = {c: load_example(np.asarray(read_example(source, pos)[0]), THUMBNAIL) for c, pos in chosen.items()}
    except (OSError, ValueError) as e:  # DatasetError is a ValueError
        report(f"no class examples: cannot read the training data in {config.data_dir}: {e}")
        return {}
    try:
        files = {}
        for c, pixels in thumbnails.items():
            from PIL import Image

            name = f"{c:05d}.jpg"
            atomic_write(folder / name, lambda f, p=pixels: Image.fromarray(p).save(f, format="JPEG", quality=90))
            files[c] = name
        write_json(folder / INDEX, {"key": key, "files": {str(c): n for c, n in files.items()},
                                    "probability": {str(c): p for c, p in probability.items()}})  # fmt: skip
    except OSError as e:
        report(f"class examples not kept in {folder} ({e.strerror or e}): used for this run only")
        return dict(thumbnails)
    report(f"class examples: {len(files)} classes, kept in {folder}")
    return {c: folder / n for c, n in files.items()}


__all__ = ["EXAMPLES_DIR", "PER_CLASS", "cached_examples", "choose_examples", "class_examples"]
