"""Explanations of many image files at accelerator speed: reader -> device -> writer, overlapped.

    from delib_jax.stream import JobOptions, explain_files
    summary = explain_files(model, config, files, "explained/", options=JobOptions(batch_size=64))
    for e in delib_jax.load_explanations("explained/"): ...

    # a classifier of your own (features: images -> A, head: A -> logits), preprocessed as torchvision's ImageNet models
    config = ModelConfig(class_names=names, resize=256, crop=224)
    explain_files((features, head), config, files, "explained/", score="entropy")

Stages: reader processes decode, resize, crop and normalise files straight into shared batch buffers
(`delib_jax._reader`), several batches ahead; the main thread puts each batch on the devices (sharded over all local
devices) and dispatches the compiled explanation without waiting for it, so the next batch is on its way while one
computes; a writer thread fetches finished batches, packs them into the compact store (`delib_jax.store`) and hands
figures, when asked for, to a pool of processes. Each stage is a unit of `delib_jax.job` (the folder and the resume
plan, the reader stage, the device step, the writer stage and its figures); `_run` below wires them. Every batch
has one shape (the last one padded), so there is one compilation per run, which the persistent compilation cache
(`delib_jax._xla.compilation_cache`) keeps for the next run.

The output folder is safe to reuse: a lock refuses a second job on the same folder (per process share), resume
skips the files whose explanation is recorded (re-explaining any whose size or modification time changed), another
model or other settings are refused rather than mixed, temporary files of a killed run are removed, nothing is
written through a symbolic link, and the job's own outputs inside an input folder are never read as inputs.
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import math
import threading
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from delib_jax import _malloc, _multihost, _reader
from delib_jax import store as st
from delib_jax.data.transforms import IMAGENET_STATS, Normalization
from delib_jax.job.device import DeviceStep
from delib_jax.job.folder import (
    JobError,
    JobOptions,
    JobSummary,
    PathList,
    check_manifest,
    fingerprint,
    inputs_outside,
    lock_folder,
    plan_resume,
    prepare_folder,
    weights_digest,
)
from delib_jax.job.inputs import DatasetInputs, RecordPayloads, dataset_inputs
from delib_jax.job.reading import Channel, Dispatched, read_ahead
from delib_jax.job.writing import Figures, WriterStage, figure_name, writer_loop

# ------------------------------------------------------------------------------------------------ the job


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What the job needs to know of a classifier that is not a run folder (one of your own, see
    `delib_jax.models.DeliberativeModel.from_split`): its class names and how its images are preprocessed
    (the shorter side resized to ``resize``, centre crop ``crop``, normalised with ``mean`` / ``std`` of RGB in
    [0, 1]; torchvision's ImageNet defaults). Passed where a run's `RunConfig` goes; ``arch`` must be the model's
    (``from_split`` names it 'custom')."""

    class_names: Sequence[str]
    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_STATS.mean
    std: tuple[float, float, float] = IMAGENET_STATS.std
    arch: str = "custom"
    dataset = None  # no dataset's split to explain (`explain_dataset` needs a run's)

    def __post_init__(self):
        object.__setattr__(self, "class_names", [str(n) for n in self.class_names])
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.class_names) < 2:
            raise ValueError(f"a classifier needs at least 2 class names, got {len(self.class_names)}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"crop {self.crop} and resize {self.resize} must satisfy 0 < crop <= resize")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(v) for v in self.mean + self.std):
            raise ValueError(f"mean and std need 3 finite values each, got mean {self.mean}, std {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> Normalization:
        return Normalization(mean=self.mean, std=self.std)


def explain_files(
    model,
    config,
    files: Sequence[str | Path] | DatasetInputs,
    out: str | Path,
    *,
    options: JobOptions = JobOptions(),  # noqa: B008 -- a frozen dataclass
    model_id: Mapping[str, Any] | None = None,
    examples: Mapping[int, Path] | None = None,
    report: Callable[[str], None] = print,
    **explain_options,
) -> JobSummary:
    """Explain image ``files`` with ``model`` into the output folder ``out`` (see the module docstring).

    Args:
      model: a `DeliberativeModel`; config: its `RunConfig` (class names, resize, crop, normalisation). A
        classifier of your own: ``(features, head)`` NNX modules (or `DeliberativeModel.from_split`) with a
        `ModelConfig`.
      files: image paths, explained in this order (unreadable ones skipped with a reason), or the examples of a
        dataset's split (`DatasetInputs`, see `explain_dataset`).
      out: output folder (created); an earlier run's results there are kept and the rest added (resume).
      options: `JobOptions`; model_id: what identifies the model in the manifest (e.g. checkpoint and which);
      examples: class index -> example image for the figures.
      explain_options: as for `delib_jax.explanation.make_explain_fn` (method, score, top_n, k, coverage, ...).
    Raises `JobError` (one line) for a locked or foreign folder, a full disk or a model with NaN/inf outputs, and
    ValueError (nothing written) when the model and ``config`` disagree (`delib_jax.checkpoint.check_model_config`).
    """
    import jax

    from delib_jax import explanation as ex
    from delib_jax import insecurity as insec
    from delib_jax.checkpoint import check_model_config
    from delib_jax.models import split_leaves

    _malloc.bound_heap()  # XLA's per-batch temporaries returned when freed, not kept (`delib_jax._malloc`)
    model = ex.as_model(model)
    check_model_config(model, config)  # a model of another run: one line, before anything is compiled or written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    share = options.share or (jax.process_index(), jax.process_count())
    if not 0 <= share[0] < share[1]:
        raise ValueError(f"share {share[0]} of {share[1]} is not a share")
    if options.batch_size < 1 or options.shard_size < 1 or options.prefetch < 1:
        raise ValueError("batch_size, shard_size and prefetch must be at least 1")
    lock = lock_folder(out, share[0])
    mesh = ex.batch_mesh()
    batch = -(-options.batch_size // mesh.size) * mesh.size  # a multiple of the device count
    workers = _reader.default_workers() if options.workers is None else options.workers
    reader = None
    try:  # the reader processes start now, while the model is prepared and the folder read
        reader = _reader.Reader(batch=batch, crop=config.crop, resize=config.resize, slots=options.prefetch + 2,
                                workers=workers if files else 0)  # fmt: skip
        # the reader's uint8 pixels are normalised by the compiled function, on the device
        explain_fn, settings = ex.make_explain_fn(model, mesh=mesh, pixel_stats=config.normalization,
                                                  **explain_options)  # fmt: skip
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
            "class_names": [str(n) for n in config.class_names],
        }  # fmt: skip
        if isinstance(files, DatasetInputs):  # a resumed run must read the same split of the same data
            manifest["data"] = files.manifest()
        else:
            files = files if isinstance(files, PathList) else PathList(files)
        # the default ambiguity (product of clamped maps): a region's share follows from its strength and coverage
        strength_is_mean = settings.positive and explain_options.get("combine", insec.product) is insec.product
        summary = _run(out, share, config, files, options, manifest, DeviceStep(explain_fn),
                       reader, examples or {}, report, strength_is_mean=strength_is_mean)  # fmt: skip
        if _synced(options, share):  # the report covers every process's explanations: process 0, once all are done
            _multihost.barrier("delib explain: all written")
            if share[0] != 0:
                return summary
        finish(out, manifest, options, summary, report, inputs=files if isinstance(files, DatasetInputs) else None)
        return summary
    except BaseException:
        if reader is not None:
            reader.close()
        reader = None
        gc.collect()  # finalise the pools' queues now: an interrupted command leaves with os._exit
        raise
    finally:
        if reader is not None:
            reader.close()
        lock.close()


def explain_dataset(
    model,
    config,
    data_dir: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    data_options: Mapping[str, Any] | None = None,
    options: JobOptions = JobOptions(),  # noqa: B008 -- a frozen dataclass
    model_id: Mapping[str, Any] | None = None,
    examples: Mapping[int, Path] | None = None,
    report: Callable[[str], None] = print,
    **explain_options,
) -> JobSummary:
    """`explain_files` over the examples of ``split`` ('test' or 'train'; class folders and TFDS catalog datasets
    also 'val') of the run's dataset (``config.dataset``) in ``data_dir``: a release folder or a TFDS build, class
    folders or a TFDS data folder, read as training read it (the run's ``data_options``: the same carved splits).
    ``dataset`` and ``data_options`` read other data instead (a kind of `delib_jax.data.KINDS` and its options; a
    run imported from weights names none): its classes must be the model's, or each one of them by name (a line
    says so; for an imported run as many classes also match by index, `delib_jax.job.inputs.check_classes`).
    Records name the dataset, split and example index; images kept in records (TFDS) are decoded from them. Raises
    `DatasetError` or ValueError (one line, nothing written) for data that cannot be read, a split the data does not
    have, or classes that are not the model's."""
    from delib_jax.job.inputs import check_classes

    if dataset is None and config.dataset is None:
        raise ValueError("the run names no dataset (imported from weights?): give dataset ('folder', 'tfds', ...)")
    own = dataset is None or dataset == config.dataset
    kind = config.dataset if dataset is None else dataset
    if data_options is None and own:
        data_options = getattr(config, "data_options", None)
    inputs = dataset_inputs(kind, data_dir, split, options=dict(data_options) if data_options is not None else None)
    note = check_classes(inputs, config.class_names, by_index=getattr(config, "imported_from", None) is not None)
    if note:
        report(note)
    return explain_files(model, config, inputs, out, options=options, model_id=model_id, examples=examples,
                         report=report, **explain_options)  # fmt: skip


def _synced(options: JobOptions, share: tuple[int, int]) -> bool:
    """Whether this job is one of several jax.distributed processes (their shares implicit: they wait for each
    other where one of them acts for all)."""
    return options.share is None and share[1] > 1


def _run(out: Path, share: tuple[int, int], config, files: PathList | DatasetInputs, options: JobOptions,
         manifest: dict, step: DeviceStep, reader: _reader.Reader, examples: Mapping[int, Path], report, *,
         strength_is_mean: bool = True) -> JobSummary:  # fmt: skip
    """The stages wired: the reader decodes ahead, the device step is dispatched per batch, the writer thread
    fetches and stores; Ctrl-C or a failure keeps what the writer finished and drops the rest."""
    from delib_jax.progress import progress_bar

    t_start = time.perf_counter()
    synced = _synced(options, share)
    directory, run = prepare_folder(out, manifest, figures=options.figures,
                                    sync=_multihost.barrier if synced else None, first=share[0] == 0)  # fmt: skip
    plan = plan_resume(out, directory, files, share, figures=options.figures, report=report)
    if plan.kept:
        before = f" ({len(plan.skipped)} skipped)" if plan.skipped else ""
        report(f"resuming: {plan.resumed} images already explained{before} in {out}, {len(plan.todo)} to go")

    channel = Channel(slots=len(reader.arrays))
    figures = thread = None
    bar = progress_bar(total=len(plan.todo), unit="img", desc="explain", disable=not options.progress)
    try:
        if options.figures:
            n = _reader.default_workers() if options.figure_workers is None else options.figure_workers
            figures = Figures(out, config.resize, config.crop, manifest["class_names"], manifest["settings"],
                              examples, report, channel.stopping, payload=lambda r: files.payload(r["i"]))  # fmt: skip
            figures.pool = _reader.start_pool(n) if n > 0 else None
            figures.in_flight = 2 * n  # each worker busy and one more ready: the rest wait in the writer
        shards = st.ShardWriter(directory, share[0], options.shard_size, next_seq=plan.next_seq,
                                image_size=(config.crop, config.crop), run=run,
                                ready=figures.ready if figures else None)  # fmt: skip
        writer = WriterStage(shards, manifest["class_names"], plan.stats, report, figures,
                             shard_seconds=options.shard_seconds, on_done=bar.update,
                             describe=files.describe, strength_is_mean=strength_is_mean)  # fmt: skip
        thread = threading.Thread(target=writer_loop, args=(channel, writer), name="delib-writer", daemon=True)
        thread.start()
        for batch in read_ahead(reader, plan.todo, options.prefetch, channel, lambda i, f: files.payload(i)):
            channel.put(Dispatched(batch, step(reader.arrays[batch.slot]) if batch.any_readable else None))
        channel.put(None)
        thread.join()
        if channel.failure is not None:
            raise channel.failure
    except OSError as e:
        if st.disk_full(e):
            raise _disk_full(out, len(plan.todo) - writer.done, shards) from None
        raise
    finally:
        if thread is not None and thread.is_alive():  # interrupted or failed: keep what is finished, then stop
            channel.stop()
            thread.join(timeout=20)
        bar.close()
        reader.close()
        if figures is not None:
            figures.close()
    return JobSummary(
        out=out, total=len(plan.mine), explained=writer.explained, resumed=plan.resumed,
        skipped=[*plan.skipped, *writer.skipped], compile_s=step.compile_s, run_s=time.perf_counter() - t_start,
        bytes_written=shards.bytes_written,
    )  # fmt: skip


def _disk_full(out: Path, remaining: int, writer: st.ShardWriter) -> JobError:
    done = max(1, writer.next_seq)
    need = max(1, writer.bytes_written // done) * math.ceil(remaining / max(1, writer.shard_size))
    return JobError(
        f"the disk holding {out} is full: free about {need / 1e6:.0f} MB more and run the same command "
        "again (finished images are kept)"
    )


# ------------------------------------------------------------------------------------------------ finishing


def finish(out: Path, manifest: Mapping[str, Any], options: JobOptions, summary: JobSummary, report,
           inputs: DatasetInputs | None = None) -> None:  # fmt: skip
    """The report (`write_pages`) and, when asked (``json``) for small runs, insecurities.json (every explanation,
    the same content as `Explanation.to_json`); ``inputs``: a dataset run's examples (for the thumbnails)."""
    from delib_jax.explanation import write_json

    settings = manifest["settings"]
    total = write_pages(out, manifest, report_limit=options.report_limit, report=report, inputs=inputs)
    if not total:
        return  # nothing explained (yet): no report
    if not options.json:
        (out / "insecurities.json").unlink(missing_ok=True)  # an earlier run's: it no longer describes the folder
    elif total <= options.json_limit:
        images = []
        figures = drawn_figures(out)
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


FIGURE_INDEX = "figures/index.jsonl"  # figures drawn later (`delib figures`): one {"source", "figure"} per line
PAGES = (("index.html", "images"), ("pairs.html", "class pairs"))
SKIPPED_LISTED = 1000  # index.html lists at most this many skipped inputs (and counts the rest)
PAIRS_LISTED = 200  # pairs.html lists the first this many class pairs (`delib_jax.report.rank_key`)


def drawn_figures(out: Path, sources: Container[str] | None = None) -> dict[str, str]:
    """source -> figure path (relative to OUT) of every figure on disk (of ``sources`` only, when given: memory
    bounded by them): those the job drew (named in its records) and those `delib figures` drew later
    (OUT/figures/index.jsonl, appended only once the PNG exists)."""
    found = {s: f for s, f in recorded_figures(out) if sources is None or s in sources}
    return {s: f for s, f in found.items() if _inside(out, f) and (out / f).is_file()}


def recorded_figures(out: Path) -> Iterator[tuple[str, str]]:
    """(source, figure path relative to OUT) as recorded, streamed: in the job's records, then in
    OUT/figures/index.jsonl (a later line of a source replaces an earlier one); the file may not exist."""
    import json

    for r in st.read_records(out):
        if isinstance(r.get("figure"), str):
            yield r["source"], r["figure"]
    path = out / FIGURE_INDEX
    if path.is_file() and not path.is_symlink():
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue  # a torn last line of a killed run
                if (
                    isinstance(item, dict)
                    and isinstance(item.get("source"), str)
                    and isinstance(item.get("figure"), str)
                ):
                    yield item["source"], item["figure"]


def drawn_sources(out: Path) -> st.SourceSet:
    """The sources whose figure is on disk, in flat memory (8 bytes each: `delib_jax.store.SourceSet`)."""
    return st.SourceSet.of(s for s, f in recorded_figures(out) if _inside(out, f) and (out / f).is_file())


def _inside(out: Path, relative: str) -> bool:
    """Whether ``relative`` names a file in OUT/figures (never a path that leaves the folder)."""
    parts = Path(relative).parts
    return len(parts) == 2 and parts[0] == "figures" and ".." not in parts


def write_pages(out: Path, manifest: Mapping[str, Any], *, report_limit: int = 1000, report=print,
                inputs: DatasetInputs | None = None) -> int:  # fmt: skip
    """index.html (the hardest ``report_limit`` images with thumbnails and figures, the skipped inputs) and
    pairs.html (the class pairs of the whole run, `delib_jax.report.pair_statistics`), from the stored index in
    streaming passes; returns the number of explained images (0: nothing written). The thumbnails of a dataset
    run are read from its data (``inputs``, or opened from the manifest when needed)."""
    from delib_jax.report import common_root, pair_statistics, write_pairs, write_report, write_thumbnail

    settings = manifest["settings"]
    resize, crop = manifest["input"]["resize"], manifest["input"]["crop"]
    hardest: list = []
    total = 0
    for r in st.read_records(out):
        total += 1
        item = (r["difficulty"], -r["i"], r)
        if len(hardest) < report_limit:
            heapq.heappush(hardest, item)
        else:
            heapq.heappushpop(hardest, item)
    if not total:
        return 0
    root = common_root(r["source"] for r in st.read_records(out, skipped=True))
    skipped, skipped_total = [], 0
    for r in st.read_records(out, skipped=True):
        if "skipped" in r:
            skipped_total += 1
            if len(skipped) < SKIPPED_LISTED:
                skipped.append((r["source"], r["skipped"]))
    chosen = [r for _, _, r in sorted(hardest, key=lambda t: (-t[0], -t[1]))]
    thumbs, records_of = {}, {}
    payloads = RecordPayloads(dict(manifest), inputs, report)  # a dataset run's images are read from its data

    def thumb(source: str) -> str | None:
        if source not in thumbs:
            try:
                payload = payloads(records_of.get(source, {"source": source}))
                thumbs[source] = write_thumbnail(out, source, resize, crop, payload=payload)
            except OSError as e:
                report(f"no thumbnail for {source}: {e.strerror or e}")
                thumbs[source] = None
        return thumbs[source]

    shown = {k: settings[k] for k in ("method", "score", "k", "coverage", "threshold") if settings.get(k) is not None}
    shown["top_n"] = settings.get("top_n") or "all"
    rows = [{**r, "score": settings["score"]} for r in chosen]
    note = None if total <= len(chosen) else (
        f"The {len(chosen)} hardest of {total} images; all of them: explanations/index-*.jsonl "
        "(delib_jax.load_explanations)."
    )  # fmt: skip
    pairs = pair_statistics(st.read_records(out))
    listed = pairs[:PAIRS_LISTED]
    wanted = {src for p in listed for _, _, src, _ in p["examples"]}
    if payloads.data is not None:  # their records name the examples (dataset index) the thumbnails are read from
        needed = wanted | {r["source"] for r in chosen}
        records_of = {r["source"]: r for r in st.read_records(out) if r["source"] in needed}
    figures = drawn_figures(out, sources=wanted | {r["source"] for r in chosen})  # of the rows shown only
    # the readable strengths the pages show: in the records; computed from the stored maps (`Explanation.shares`)
    # only for records written before the index held them
    shares, image_shares = {}, {}
    sources = {src for p in listed for _, _, src, share in p["examples"] if share is None}
    sources |= {r["source"] for r in chosen if any(q.get("share") is None for q in r["insecurities"])}
    for e in st.load_explanations(out, sources=sorted(sources), skip_damaged=True,
                                  on_damage=lambda d: report(str(d))) if sources else ():  # fmt: skip
        image_shares[e.source] = e.shares
        for q, share in zip(e.insecurities, e.shares):
            shares.setdefault((e.source, min(q.a, q.b), max(q.a, q.b)), share)
    for row in rows:
        found = image_shares.get(row["source"])
        if found is not None and len(found) == len(row["insecurities"]):
            row["insecurities"] = [{**q, "share": share} for q, share in zip(row["insecurities"], found)]
    write_pairs(out, pairs, total=total, thumbs={s: thumb(s) for s in wanted}, figures=figures, shares=shares,
                root=root, limit=PAIRS_LISTED, pages=PAGES)  # fmt: skip
    write_report(out, rows, [figures.get(r["source"]) for r in chosen], settings=shown, note=note,
                 thumbs=[thumb(r["source"]) for r in chosen], root=root, skipped=skipped,
                 skipped_total=skipped_total, pages=PAGES)  # fmt: skip
    return total


__all__ = [
    "FIGURE_INDEX", "JobError", "JobOptions", "JobSummary", "ModelConfig", "check_manifest", "drawn_figures",
    "drawn_sources", "explain_dataset", "explain_files", "figure_name", "fingerprint", "finish", "inputs_outside",
    "lock_folder", "recorded_figures", "weights_digest", "write_pages",
]  # fmt: skip
