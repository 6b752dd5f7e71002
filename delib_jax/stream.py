"""Explanations of many image files at accelerator speed: reader -> device -> writer, overlapped.

    from delib_jax.stream import JobOptions, explain_files
    summary = explain_files(model, config, files, "explained/", options=JobOptions(batch_size=64))
    for e in delib_jax.load_explanations("explained/"): ...

Stages: reader processes decode, resize, crop and normalise files straight into shared batch buffers
(`delib_jax._reader`), several batches ahead; the main thread puts each batch on the devices (sharded over all local
devices) and dispatches the compiled explanation without waiting for it, so the next batch is on its way while one
computes; a writer thread fetches finished batches, packs them into the compact store (`delib_jax.store`) and hands
figures, when asked for, to a pool of processes. Every batch has one shape (the last one padded), so there is one
compilation per run, which the persistent compilation cache (`delib_jax._xla.compilation_cache`) keeps for the
next run.

The output folder is safe to reuse: a lock refuses a second job on the same folder (per process share), resume
skips the files whose explanation is recorded (re-explaining any whose size or modification time changed), another
model or other settings are refused rather than mixed, temporary files of a killed run are removed, nothing is
written through a symbolic link, and the job's own outputs inside an input folder are never read as inputs.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import hashlib
import heapq
import json
import math
import os
import queue
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax import _multihost, _reader
from delib_jax import store as st


class JobError(Exception):
    """A job that cannot go on (folder locked or foreign, disk full, a model with NaN outputs): one line."""


@dataclass(frozen=True)
class JobOptions:
    """How the job runs (not what it computes: that is ``explain_options``, see `explain_files`).

    batch_size: images per device step, over all local devices; workers: reader processes (None: one per core but
    one; 0: threads in this process); prefetch: batches decoded ahead; shard_size / shard_seconds: a shard is
    written when it holds this many images or is this old (what a kill can lose); figures: a PNG per image, drawn by
    ``figure_workers`` processes (None: one per core but one); share: (index, count) of this process among
    ``count`` processes that split the files (None: ``jax.process_index()``, ``jax.process_count()``);
    json_limit: also write OUT/insecurities.json (every explanation in one JSON file) up to this many images;
    report_limit: index.html lists the hardest this many images.
    """

    batch_size: int = 32
    workers: int | None = None
    prefetch: int = 2
    shard_size: int = 256
    shard_seconds: float = 10.0
    figures: bool = False
    figure_workers: int | None = None
    share: tuple[int, int] | None = None
    json_limit: int = 1000
    report_limit: int = 1000
    progress: bool = True


@dataclass
class JobSummary:
    """What a job did: images explained now and before (resumed), skipped files with reasons, where it wrote."""

    out: Path
    total: int
    explained: int
    resumed: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    compile_s: float = 0.0
    run_s: float = 0.0
    bytes_written: int = 0
    json_written: bool = False


# ------------------------------------------------------------------------------------------------ folder safety


def lock_folder(out: Path, process: int):
    """An exclusive lock on OUT for this process share (released when the returned file is closed or the process
    dies); `JobError` naming the folder if another job holds it."""
    path = out / f".lock-{process:05d}"
    if path.is_symlink():
        raise JobError(f"{path} is a symbolic link: refusing to use it (remove it)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise JobError(
            f"another delib explain (pid {pid}) is writing to {out}; wait for it or choose another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def weights_digest(leaves: Sequence[Any]) -> str:
    """A hash of a model's weights: a run folder retrained in place gives another digest."""
    import jax

    crc, shapes = 0, []
    for leaf in leaves:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            continue  # random-number state: no part of what an eval-mode model computes
        a = np.ascontiguousarray(np.asarray(leaf))
        shapes.append((a.shape, a.dtype.str))
        crc = zlib.crc32(memoryview(a).cast("B"), crc)  # ~1 GB/s: a ResNet50 in 0.1 s
    return f"{crc:08x}-{hashlib.blake2b(str(shapes).encode(), digest_size=8).hexdigest()}"


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write OUT/manifest.json, or check that the one there describes the same model and settings."""
    from delib_jax.explanation import write_json

    manifest = json.loads(json.dumps(manifest))  # as it reads back
    previous = st.read_manifest(out)
    if previous is None:
        st._no_follow(out / st.MANIFEST, out)
        write_json(out / st.MANIFEST, manifest)
        return
    if previous != manifest:
        fields = ", ".join(_differences(previous, manifest)[:4])
        raise JobError(
            f"{out} holds explanations made with another model or other settings (differing: {fields}); "
            "choose another --out or empty that folder"
        )


def fingerprint(path: Path) -> list[int]:
    """[size, modification time in ns]: an input replaced under the same path is explained again."""
    s = path.stat()
    return [int(s.st_size), int(s.st_mtime_ns)]


def inputs_outside(files: Sequence[Path], out: Path) -> list[Path]:
    """``files`` less those inside the output folder (its figures are not inputs)."""
    root = out.resolve()
    return [f for f in files if root not in f.resolve().parents]


# ------------------------------------------------------------------------------------------------ device stage


@functools.lru_cache(maxsize=1)
def _compact_fn():
    """A jitted ExplainOutputs -> dict of what the store keeps: masks packed to bits on the device (8x less to
    fetch), the ambiguity maps and first/second-order terms left there, a per-image finiteness flag."""
    import jax
    import jax.numpy as jnp

    def pack(masks):  # (B, Q, H, W) bool -> (B, Q, ceil(H W / 8)) uint8, np.packbits order
        flat = masks.reshape(*masks.shape[:2], -1)
        flat = jnp.pad(flat, ((0, 0), (0, 0), (0, -flat.shape[-1] % 8)))
        bits = flat.reshape(*flat.shape[:2], -1, 8).astype(jnp.uint8)
        return jnp.sum(bits << jnp.arange(7, -1, -1, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)

    def compact(outputs):
        attr, found = outputs.attribution, outputs.insecurities
        values = [attr.probs, attr.score[:, None], attr.maps, outputs.grad_cam, found.strength, found.coverage]
        finite = jnp.stack([jnp.all(jnp.isfinite(v.reshape(v.shape[0], -1)), axis=1) for v in values]).all(0)
        return {
            "probs": attr.probs, "difficulty": attr.score, "classes": attr.classes.astype(jnp.int32),
            "maps": attr.maps, "grad_cam": outputs.grad_cam, "pairs": found.pairs, "strength": found.strength,
            "coverage": found.coverage, "threshold": found.threshold, "valid": found.valid,
            "mask_bits": pack(found.masks), "finite": finite,
        }  # fmt: skip

    return jax.jit(compact)


def _host_lists(host: Mapping[str, np.ndarray]) -> dict[str, list]:
    """The fields the index records need as Python lists, converted once per batch (numpy scalars are slow)."""
    probs = host["probs"]
    prediction = np.argmax(probs, axis=1)
    top = np.take_along_axis(probs, host["classes"], axis=1)
    return {
        "prediction": prediction.tolist(), "confidence": probs[np.arange(len(probs)), prediction].tolist(),
        "difficulty": host["difficulty"].tolist(), "classes": host["classes"].tolist(), "top": top.tolist(),
        "pairs": host["pairs"].tolist(), "strength": host["strength"].tolist(),
        "coverage": host["coverage"].tolist(), "threshold": host["threshold"].tolist(), "valid": host["valid"].tolist(),
    }  # fmt: skip


def _record(i: int, source: str, stat: list[int] | None, lists: Mapping[str, list], row: int, names, note) -> dict:
    """The index record of one explained image (small: no maps or masks); ``lists`` from `_host_lists`."""
    prediction = lists["prediction"][row]
    strength, coverage, threshold = lists["strength"][row], lists["coverage"][row], lists["threshold"][row]
    r = {
        "i": i, "source": source, "stat": stat, "prediction": prediction, "prediction_name": names[prediction],
        "confidence": lists["confidence"][row], "difficulty": lists["difficulty"][row],
        "top": [list(t) for t in zip(lists["classes"][row], lists["top"][row])],
        "insecurities": [
            {"a": a, "b": b, "name_a": names[a], "name_b": names[b], "strength": strength[q],
             "coverage": coverage[q], "threshold": threshold[q]}
            for q, ((a, b), ok) in enumerate(zip(lists["pairs"][row], lists["valid"][row])) if ok
        ],
    }  # fmt: skip
    if note:
        r["note"] = note
    return r


def _render_figure(explanation, source: str, resize: int, crop: int, path: str, examples) -> None:
    """Figure worker: decode the source again (the pixels the masks align with) and draw the figure."""
    from delib_jax.visualize import save_figure

    pixels, report = _reader.decode(source, resize=resize, crop=crop)
    if pixels is None:
        raise OSError(report.error)
    save_figure(explanation, pixels, path, examples=examples)


def figure_name(i: int, source: str) -> str:
    """figures/IIIII_STEM_HASH.png: the input's ordinal and a hash of its path keep names unique across runs with
    other input lists; the stem is shortened and made safe for any file system (any bytes, any length)."""
    from delib_jax.visualize import figure_name as base_name

    digest = hashlib.blake2b(source.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"figures/{base_name(i, source, max_bytes=70).removesuffix('.png')}_{digest}.png"


# ------------------------------------------------------------------------------------------------ the job


def explain_files(
    model,
    config,
    files: Sequence[str | Path],
    out: str | Path,
    *,
    options: JobOptions = JobOptions(),
    model_id: Mapping[str, Any] | None = None,
    examples: Mapping[int, Path] | None = None,
    report: Callable[[str], None] = print,
    **explain_options,
) -> JobSummary:
    """Explain image ``files`` with ``model`` into the output folder ``out`` (see the module docstring).

    Args:
      model: a `DeliberativeModel`; config: its `RunConfig` (class names, resize, crop, normalisation).
      files: image paths, explained in this order (unreadable ones skipped with a reason).
      out: output folder (created); an earlier run's results there are kept and the rest added (resume).
      options: `JobOptions`; model_id: what identifies the model in the manifest (e.g. checkpoint and which);
      examples: class index -> example image for the figures.
      explain_options: as for `delib_jax.explanation.make_explain_fn` (method, score, top_n, k, coverage, ...).
    Raises `JobError` (one line) for a locked or foreign folder, a full disk or a model with NaN/inf outputs.
    """
    import jax

    from delib_jax import explanation as ex
    from delib_jax.models import split_leaves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p, count = options.share or (jax.process_index(), jax.process_count())
    if not 0 <= p < count:
        raise ValueError(f"share {p} of {count} is not a share")
    if options.batch_size < 1 or options.shard_size < 1 or options.prefetch < 1:
        raise ValueError("batch_size, shard_size and prefetch must be at least 1")
    lock = lock_folder(out, p)
    mesh = ex.batch_mesh()
    batch = -(-options.batch_size // mesh.size) * mesh.size  # a multiple of the device count
    workers = _reader.default_workers() if options.workers is None else options.workers
    # The reader processes start now, while the model is prepared and the folder read.
    reader = _reader.Reader(batch=batch, crop=config.crop, resize=config.resize, slots=options.prefetch + 2,
                            workers=workers if files else 0)  # fmt: skip
    try:  # the reader's uint8 pixels are normalised by the compiled function, on the device
        explain_fn, settings = ex.make_explain_fn(model, mesh=mesh, pixel_stats=config.normalization,
                                                  **explain_options)  # fmt: skip
        names = [str(n) for n in config.class_names]
        manifest = {
            "format": st.FORMAT,
            "model": {**(model_id or {}), "arch": config.arch, "weights": weights_digest(split_leaves(model)[1])},
            # a bfloat16 backbone gives other maps: recorded (float32, the default, is left out so that runs made
            # before the option resume)
            "settings": {**settings.to_json(), **({"precision": "bfloat16"}
                                                  if explain_options.get("precision") == "bfloat16" else {})},
            "input": {"resize": config.resize, "crop": config.crop, "mean": list(config.mean),
                      "std": list(config.std)},
            "figures": bool(options.figures),
            "class_names": names,
        }  # fmt: skip
        return _run(out, p, count, config, files, options, manifest, explain_fn, names, reader, examples or {},
                    report)  # fmt: skip
    finally:
        reader.close()
        lock.close()


def _run(out, p, count, config, files, options, manifest, explain_fn, names, reader, examples, report):
    import jax

    t_start = time.perf_counter()
    try:
        check_manifest(out, manifest)
        directory = st.safe_dir(out, st.DIRECTORY)
        if options.figures:
            st.safe_dir(out, "figures")
    except st.StoreError as e:
        raise JobError(str(e)) from None
    synced = options.share is None and count > 1  # processes of jax.distributed: one removes what a killed run left
    if synced:
        _multihost.barrier("delib explain: manifest checked")
    if not synced or p == 0:
        st.remove_temporaries(out, directory, out / "figures")
    if synced:
        _multihost.barrier("delib explain: leftovers removed")

    files = [Path(f) for f in files]
    mine = [(i, f) for i, f in enumerate(files) if i % count == p]
    stats: dict[int, list[int] | None] = {}
    for i, f in mine:
        try:
            stats[i] = fingerprint(f)
        except OSError:
            stats[i] = None

    ordinal = {str(f): i for i, f in mine}

    def keep(r: dict) -> bool:
        i = ordinal.get(r["source"])
        if i is None or stats[i] != r["stat"]:
            return False  # not among this run's inputs, or the file changed since
        if "skipped" in r:
            return True
        if not (directory / r["shard"]).is_file():
            return False
        figure = r.get("figure")
        return not options.figures or (isinstance(figure, str) and (out / figure).is_file())

    kept, seq = st.open_index(directory, p, keep=keep, report=report)
    todo = [(i, f) for i, f in mine if str(f) not in kept]
    resumed = sum(1 for r in kept.values() if "skipped" not in r)
    skipped = [(r["source"], r["skipped"]) for r in kept.values() if "skipped" in r]
    if kept:
        before = f" ({len(skipped)} skipped)" if skipped else ""
        report(f"resuming: {resumed} images already explained{before} in {out}, {len(todo)} to go")

    batch, slots = reader.shape[0], len(reader.arrays)
    compact = _compact_fn()
    pool = None
    if options.figures:
        n = _reader.default_workers() if options.figure_workers is None else options.figure_workers
        if n > 0:
            pool = _reader.start_pool(n)
    writer = st.ShardWriter(directory, p, options.shard_size, next_seq=seq,
                            image_size=(config.crop, config.crop))  # fmt: skip
    pending_figures: dict[str, Future] = {}

    stopping = threading.Event()  # Ctrl-C: keep what is finished, drop the rest (it is redone on resume)

    def figures_ready(records: list[dict], block: bool) -> list[dict] | None:
        """The records whose figures are drawn (all of them, waiting, with ``block``; None: not yet). A failed
        figure is reported and its record kept without it; when stopping, records still waiting are dropped."""
        futures = [pending_figures.get(r["source"]) for r in records]
        if not block and not stopping.is_set() and not all(f is None or f.done() for f in futures):
            return None
        kept = []
        for r, f in zip(records, futures):
            if f is not None:
                if stopping.is_set() and not f.done():
                    f.cancel()
                    continue
                pending_figures.pop(r["source"], None)
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 -- a figure that failed: the explanation stays, without it
                    report(f"no figure for {r['source']}: {e}")
                    r["figure"] = None
            kept.append(r)
        return kept

    writer.ready = figures_ready if options.figures else None
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc="explain", disable=None if options.progress else True)
    free: queue.Queue[int] = queue.Queue()
    for s in range(slots):
        free.put(s)
    work: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []
    done_count, explained = [0], [0]
    compile_s = [0.0]
    last_flush = [time.monotonic()]

    def write_loop() -> None:
        from delib_jax.store import explanation_from_row, unpack_bits

        try:
            while (item := work.get()) is not None:
                slot, items, reports, outputs = item
                if stopping.is_set():  # interrupted: what is not fetched yet is redone on resume
                    free.put(slot)
                    continue
                host = jax.device_get(outputs) if outputs is not None else None
                free.put(slot)
                rows, records = [], []
                lists = _host_lists(host) if host is not None else None
                for row, ((i, f), rep) in enumerate(zip(items, reports)):
                    source = str(f)
                    if rep.error is not None:
                        report(f"skipping {rep.error}")
                        skipped.append((source, rep.error))
                        writer.skip({"i": i, "source": source, "stat": stats[i], "skipped": rep.error})
                        continue
                    if not host["finite"][row]:
                        raise JobError(
                            f"the model's outputs are not finite (NaN/inf) for {source}: the checkpoint is broken, "
                            "retrain"
                        )
                    if rep.note:
                        report(rep.note)
                    rows.append(row)
                    records.append(_record(i, source, stats[i], lists, row, names, rep.note))
                if rows:
                    arrays = {k: v[rows] for k, v in host.items() if k != "finite"}
                    if options.figures:
                        local = {**{k: v for k, v in arrays.items() if k != "mask_bits"},
                                 "masks": unpack_bits(arrays["mask_bits"], (config.crop, config.crop))}  # fmt: skip
                        for j, r in enumerate(records):
                            name = figure_name(r["i"], r["source"])
                            r["figure"] = name
                            e = explanation_from_row(local, j, names, manifest["settings"], r["source"])
                            args = (e, r["source"], config.resize, config.crop, str(out / name), examples)
                            if pool is None:
                                _render_figure(*args)
                            else:
                                pending_figures[r["source"]] = pool.submit(_render_figure, *args)
                    writer.add(arrays, records)
                    explained[0] += len(records)
                if time.monotonic() - last_flush[0] > options.shard_seconds:
                    writer.flush()
                    last_flush[0] = time.monotonic()
                done_count[0] += len(items)
                bar.update(len(items))
            writer.flush(final=True)
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which raises it
            failure.append(e)
            while True:  # unblock the main thread
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    free.put(item[0])
            for s in range(slots):
                free.put(s)

    def get_free() -> int:
        while True:
            if failure:
                raise failure[0]
            try:
                return free.get(timeout=0.1)
            except queue.Empty:
                continue

    def put_work(item) -> None:
        while True:
            if failure:
                raise failure[0]
            try:
                return work.put(item, timeout=0.1)
            except queue.Full:
                continue

    batches = [todo[s : s + batch] for s in range(0, len(todo), batch)]
    thread = threading.Thread(target=write_loop, name="delib-writer", daemon=True)
    thread.start()
    reading: deque = deque()
    try:
        submitted = 0
        for _ in range(min(options.prefetch, len(batches))):
            slot = get_free()
            reading.append((slot, reader.submit(slot, [f for _, f in batches[submitted]])))
            submitted += 1
        for b, items in enumerate(batches):
            slot, futures = reading.popleft()
            reports = [r for fut in futures for r in fut.result()]
            if submitted < len(batches):  # the next batch decodes while this one computes
                nslot = get_free()
                reading.append((nslot, reader.submit(nslot, [f for _, f in batches[submitted]])))
                submitted += 1
            outputs = None
            if any(r.error is None for r in reports):
                t = time.perf_counter()
                outputs = compact(explain_fn(reader.arrays[slot]))  # dispatched, not waited for
                if b == 0:
                    compile_s[0] = time.perf_counter() - t  # tracing and compiling happen in the first call
            put_work((slot, items, reports, outputs))
        put_work(None)
        thread.join()
        if failure:
            raise failure[0]
    except OSError as e:
        if st.disk_full(e):
            raise _disk_full(out, len(todo) - done_count[0], writer) from None
        raise
    finally:
        if thread.is_alive():  # interrupted or failed: let the writer keep what is finished, then stop
            stopping.set()
            while True:
                try:
                    work.put_nowait(None)
                    break
                except queue.Full:
                    try:
                        work.get_nowait()
                    except queue.Empty:
                        pass
            thread.join(timeout=20)
        bar.close()
        reader.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if thread.is_alive() or failure or sys.exc_info()[0] is not None:
            reader = pool = None
            gc.collect()  # finalise the pools' queues now: an interrupted command leaves with os._exit
    summary = JobSummary(
        out=out, total=len(mine), explained=explained[0], resumed=resumed, skipped=skipped,
        compile_s=compile_s[0], run_s=time.perf_counter() - t_start, bytes_written=writer.bytes_written,
    )  # fmt: skip
    if synced:  # the report covers every process's explanations: process 0 writes it once all are done
        _multihost.barrier("delib explain: all written")
        if p != 0:
            return summary
    finish(out, manifest, options, summary, report)
    return summary


def _disk_full(out: Path, remaining: int, writer: st.ShardWriter) -> JobError:
    done = max(1, writer.next_seq)
    need = max(1, writer.bytes_written // done) * math.ceil(remaining / max(1, writer.shard_size))
    return JobError(
        f"the disk holding {out} is full: free about {need / 1e6:.0f} MB more and run the same command "
        "again (finished images are kept)"
    )


# ------------------------------------------------------------------------------------------------ finishing


def finish(out: Path, manifest: Mapping[str, Any], options: JobOptions, summary: JobSummary, report) -> None:
    """index.html (the hardest ``report_limit`` images, with a count of the rest) and, for small runs,
    insecurities.json (every explanation, the same content as `Explanation.to_json`)."""
    from delib_jax.explanation import write_json
    from delib_jax.report import write_report

    settings = manifest["settings"]
    hardest: list = []
    total = 0
    if not any(True for _ in st.read_records(out)):
        return  # nothing explained (yet): no report
    for r in st.read_records(out):
        total += 1
        item = (r["difficulty"], -r["i"], r)
        if len(hardest) < options.report_limit:
            heapq.heappush(hardest, item)
        else:
            heapq.heappushpop(hardest, item)
    chosen = [r for _, _, r in sorted(hardest, key=lambda t: (-t[0], -t[1]))]
    shown = {k: settings[k] for k in ("method", "score", "k", "coverage", "threshold") if settings.get(k) is not None}
    shown["top_n"] = settings.get("top_n") or "all"
    rows = [{**r, "score": settings["score"]} for r in chosen]
    note = None if total <= len(chosen) else (
        f"The {len(chosen)} hardest of {total} images; all of them: explanations/index-*.jsonl "
        "(delib_jax.load_explanations)."
    )  # fmt: skip
    write_report(out, rows, [r.get("figure") for r in chosen], settings=shown, note=note)
    if total <= options.json_limit:
        images = []
        figures = {r["source"]: r.get("figure") for r in st.read_records(out)}
        for e in st.load_explanations(out):
            images.append({**e.to_json(), "figure": figures.get(e.source)})
        skipped = [{"path": r["source"], "reason": r["skipped"]} for r in st.read_records(out, skipped=True)
                   if "skipped" in r]  # fmt: skip
        write_json(out / "insecurities.json", {
            "model": manifest["model"], "settings": settings, "input": manifest["input"],
            "class_names": manifest["class_names"], "skipped": skipped, "images": images,
        })  # fmt: skip
        summary.json_written = True
    else:
        (out / "insecurities.json").unlink(missing_ok=True)  # an earlier, smaller run's: no longer complete
        report(
            f"{total} images: insecurities.json not written (over {options.json_limit}); read {out} with "
            "delib_jax.load_explanations"
        )


__all__ = ["JobError", "JobOptions", "JobSummary", "explain_files", "finish", "lock_folder", "weights_digest"]
