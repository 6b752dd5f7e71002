"""The writer stage: fetch a finished batch, check it, turn it into index records and store rows
(`store.ShardWriter`), and hand its figures to `Figures`, the stage's consumer of finished explanations."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax import _reader
from delib_jax import store as st
from delib_jax.job.folder import JobError
from delib_jax.job.reading import Channel, ReadBatch


def host_lists(host: Mapping[str, np.ndarray], image_size: tuple[int, int], *, from_strength: bool = True) -> dict:
    """The fields the index records need as Python lists, converted once per batch (numpy scalars are slow); with
    ``share`` (`batch_shares`), the readable strength of each insecurity."""
    probs = host["probs"]
    prediction = np.argmax(probs, axis=1)
    top = np.take_along_axis(probs, host["classes"], axis=1)
    shares = np.round(batch_shares(host, image_size, from_strength=from_strength), 6)  # 1e-4 of a percent
    return {
        "prediction": prediction.tolist(), "confidence": probs[np.arange(len(probs)), prediction].tolist(),
        "difficulty": host["difficulty"].tolist(), "classes": host["classes"].tolist(), "top": top.tolist(),
        "pairs": host["pairs"].tolist(), "strength": host["strength"].tolist(),
        "coverage": host["coverage"].tolist(), "threshold": host["threshold"].tolist(), "valid": host["valid"].tolist(),
        "share": shares.tolist(),
    }  # fmt: skip


def batch_shares(host: Mapping[str, np.ndarray], image_size: tuple[int, int], *, from_strength: bool = True):
    """(B, Q) the share of each image's ambiguity in each insecurity's region (`Explanation.shares`) from the
    fetched outputs, NaN where a pair has no maps. ``from_strength``: the raw strengths are mean ambiguities of the
    product of clamped maps (`find_insecurities`' default), so a region's sum is strength x area and no mask is
    read (microseconds per image); else from the maps and the packed masks (`delib_jax.insecurity.region_shares`,
    milliseconds per image at 224 px), for other ``combine`` or ``positive=False``."""
    from delib_jax import insecurity as insec

    classes, pairs, maps = host["classes"], host["pairs"], host["maps"]
    same = pairs[..., None] == classes[:, None, None, :]  # (B, Q, 2, N)
    mapped = same.any(-1).all(-1) & host["valid"]
    if from_strength:
        total = insec.ambiguity_total(maps[:, :-1], maps[:, -1], image_size)
        shares = insec.strength_shares(host["strength"], host["coverage"], total, image_size)
    else:
        masks = st.unpack_bits(host["mask_bits"], image_size)  # (B, Q, H_img, W_img)
        shares = insec.region_shares(maps[:, :-1], maps[:, -1], same.argmax(-1), masks)
    return np.where(mapped, shares, np.nan)


def make_record(i: int, source: str, stat: list[int] | None, lists: Mapping[str, list], row: int, names, note,
                described: Mapping[str, Any] | None = None) -> dict:  # fmt: skip
    """The index record of one explained image (small: no maps or masks); ``lists`` from `host_lists`;
    ``described``: fields naming a dataset's example (dataset, split, index)."""
    prediction = lists["prediction"][row]
    strength, coverage, threshold = lists["strength"][row], lists["coverage"][row], lists["threshold"][row]
    share = lists["share"][row]
    r = {
        "i": i, "source": source, "stat": stat, **(described or {}),
        "prediction": prediction, "prediction_name": names[prediction],
        "confidence": lists["confidence"][row], "difficulty": lists["difficulty"][row],
        "top": [list(t) for t in zip(lists["classes"][row], lists["top"][row])],
        "insecurities": [
            {"a": a, "b": b, "name_a": names[a], "name_b": names[b], "strength": strength[q],
             "coverage": coverage[q], "threshold": threshold[q],
             **({} if math.isnan(share[q]) else {"share": share[q]})}
            for q, ((a, b), ok) in enumerate(zip(lists["pairs"][row], lists["valid"][row])) if ok
        ],
    }  # fmt: skip
    if note:
        r["note"] = note
    return r


# ------------------------------------------------------------------------------------------------ figures


def render_figure(explanation, source, resize: int, crop: int, path: str, examples) -> None:
    """Figure worker: decode the source again (a file or a dataset's `_reader.StoredImage`: the pixels the masks
    align with) and draw the figure."""
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


@dataclass
class Figures:
    """Draws a figure per explained image into ``out`` (in ``pool``'s processes, or here when it is None) and tells
    the shard writer which records may be appended (`ready`): the index never names a figure not yet written. At
    most ``in_flight`` figures wait for the pool at a time (`submit` waits for one to finish), so the explanations
    handed to it stay bounded in memory however far the figures lag behind the device."""

    out: Path
    resize: int
    crop: int
    names: Sequence[str]
    settings: Mapping[str, Any]
    examples: Mapping[int, Path]
    report: Callable[[str], None]
    stopping: threading.Event
    pool: ProcessPoolExecutor | None = None
    in_flight: int = 4
    pending: dict[str, Future] = field(default_factory=dict)
    payload: Callable[[dict], Any] | None = None  # record -> what to decode (None: its source file)

    def submit(self, arrays: Mapping[str, np.ndarray], records: list[dict]) -> None:
        """Start the figures of ``records`` (rows of ``arrays``, masks still packed); names them in the records."""
        local = {**{k: v for k, v in arrays.items() if k != "mask_bits"},
                 "masks": st.unpack_bits(arrays["mask_bits"], (self.crop, self.crop))}  # fmt: skip
        for j, r in enumerate(records):
            name = figure_name(r["i"], r["source"])
            r["figure"] = name
            e = st.explanation_from_row(local, j, self.names, self.settings, r["source"])
            source = r["source"] if self.payload is None else self.payload(r)
            args = (e, source, self.resize, self.crop, str(self.out / name), self.examples)
            if self.pool is None:
                render_figure(*args)
            else:
                self._wait_below(self.in_flight)
                self.pending[r["source"]] = self.pool.submit(render_figure, *args)

    def _wait_below(self, limit: int) -> None:
        """Wait until fewer than ``limit`` figures are unfinished (not at all once stopping: they are dropped)."""
        while not self.stopping.is_set():
            unfinished = [f for f in self.pending.values() if not f.done()]
            if len(unfinished) < max(1, limit):
                return
            wait(unfinished, timeout=0.5, return_when=FIRST_COMPLETED)

    def ready(self, records: list[dict], block: bool) -> list[dict] | None:
        """The records whose figures are drawn (all of them, waiting, with ``block``; None: not yet). A failed
        figure is reported and its record kept without it; when stopping, records still waiting are dropped."""
        futures = [self.pending.get(r["source"]) for r in records]
        stopping = self.stopping.is_set()
        if not block and not stopping and not all(f is None or f.done() for f in futures):
            return None
        kept = []
        for r, f in zip(records, futures):
            if f is not None:
                if self.stopping.is_set() and not f.done():
                    f.cancel()
                    continue
                self.pending.pop(r["source"], None)
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 -- a figure that failed: the explanation stays, without it
                    self.report(f"no figure for {r['source']}: {e}")
                    r["figure"] = None
            kept.append(r)
        return kept

    def close(self) -> None:
        """Stop the figure processes (figures not started are cancelled)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.pending.clear()


# ------------------------------------------------------------------------------------------------ the stage


@dataclass
class WriterStage:
    """Turns fetched batches into the store: ``write(batch, host)`` per batch, `close` at the end. Unreadable
    files become skip records (and ``skipped``), a non-finite output stops the job (`JobError`), a shard is
    flushed at least every ``shard_seconds``; ``on_done(n)`` is told of every n inputs handled;
    ``strength_is_mean``: the raw strengths are mean ambiguities of the product of clamped maps (`batch_shares`)."""

    shards: st.ShardWriter
    names: Sequence[str]
    stats: Mapping[int, list[int] | None]
    report: Callable[[str], None]
    figures: Figures | None = None
    shard_seconds: float = 10.0
    on_done: Callable[[int], None] = lambda n: None
    describe: Callable[[int], dict | None] = lambda i: None  # ordinal -> fields added to its record (a dataset's)
    strength_is_mean: bool = True
    done: int = 0
    explained: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)

    def write(self, batch: ReadBatch, host: Mapping[str, np.ndarray] | None) -> None:
        """Record one batch; ``host``: its fetched outputs (None when nothing in it was readable)."""
        rows, records = [], []
        lists = host_lists(host, self.shards.image_size, from_strength=self.strength_is_mean) if host is not None \
            else None  # fmt: skip
        for row, ((i, f), rep) in enumerate(zip(batch.items, batch.reports)):
            source = str(f)
            if rep.error is not None:
                self.report(f"skipping {rep.error}")
                self.skipped.append((source, rep.error))
                self.shards.skip({"i": i, "source": source, "stat": self.stats[i], **(self.describe(i) or {}),
                                  "skipped": rep.error})  # fmt: skip
                continue
            if not host["finite"][row]:
                raise JobError(
                    f"the model's outputs are not finite (NaN/inf) for {source}: the checkpoint is broken, retrain"
                )
            if rep.note:
                self.report(rep.note)
            rows.append(row)
            records.append(make_record(i, source, self.stats[i], lists, row, self.names, rep.note,
                                       self.describe(i)))  # fmt: skip
        if rows:
            arrays = {k: v[rows] for k, v in host.items() if k != "finite"}
            if self.figures is not None:
                self.figures.submit(arrays, records)
            self.shards.add(arrays, records)
            self.explained += len(records)
        if time.monotonic() - self.last_flush > self.shard_seconds:
            self.shards.flush()
            self.last_flush = time.monotonic()
        self.done += len(batch.items)
        self.on_done(len(batch.items))

    def close(self) -> None:
        """Write what is buffered and wait for the last figures."""
        self.shards.flush(final=True)


def writer_loop(channel: Channel, stage: WriterStage) -> None:
    """The writer thread: fetch each dispatched batch from the device, give its slot back to the reader, write it;
    a failure (or an interrupt's stop) is handed to the main thread through ``channel``."""
    import jax

    try:
        while (item := channel.get()) is not None:
            if channel.stopping.is_set():  # interrupted: what is not fetched yet is redone on resume
                channel.give_slot(item.batch.slot)
                continue
            host = jax.device_get(item.outputs) if item.outputs is not None else None
            channel.give_slot(item.batch.slot)
            stage.write(item.batch, host)
        stage.close()
    except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which raises it
        channel.fail(e)
