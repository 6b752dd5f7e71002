"""``delib figures OUT``: draw the figures of a run made with ``delib explain --no-figures``, later.

    delib figures explained/ --hardest 50          # the 50 hardest images
    delib figures explained/ --images photos/a.jpg photos/b.jpg

Each figure is drawn from the stored explanation and the input file decoded again as the job did (the manifest's
resize and crop), with the same figure code and the same class examples as ``delib explain`` (the run's, chosen once
per run; ``--no-examples``: none). A figure is written atomically to OUT/figures/, then recorded in
OUT/figures/index.jsonl (source -> figure), so a killed run redoes only what is missing; the report (index.html,
pairs.html) is rewritten at the end with the new figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
from pathlib import Path

from delib_jax._command import Command, UsageError

DESCRIPTION = __doc__


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="the output folder of a delib explain run (made with --no-figures)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--hardest", type=int, metavar="N", help="the N hardest images (default: every image)")
    which.add_argument("--images", nargs="+", metavar="PATH", help="these inputs (as given to delib explain)")
    p.add_argument("--no-examples", action="store_true", help="no example images of the classes in the figures")
    p.add_argument("--workers", type=int, metavar="N",
                   help="figure processes (default: one per core but one; 0: draw in this process)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def choose(out: Path, hardest: int | None, images: list[str] | None) -> tuple[list[dict], list[str]]:
    """The records to draw (hardest first, or in input order) and the ``images`` not found among the records."""
    if images is not None:  # matched as absolute paths: "photos/a.jpg" finds the record of /data/photos/a.jpg
        wanted = {os.path.abspath(g): g for g in images}
        found = [r for r in st_records(out) if os.path.abspath(r["source"]) in wanted]
        seen = {os.path.abspath(r["source"]) for r in found}
        return found, [g for a, g in wanted.items() if a not in seen]
    if hardest is None:
        return list(st_records(out)), []
    heap: list = []
    for r in st_records(out):
        item = (r["difficulty"], -r["i"], r)
        if len(heap) < hardest:
            heapq.heappush(heap, item)
        else:
            heapq.heappushpop(heap, item)
    return [r for _, _, r in sorted(heap, key=lambda t: (-t[0], -t[1]))], []


def st_records(out: Path):
    from delib_jax import store as st

    return st.read_records(out)


def record_figure(out: Path, source: str, figure: str) -> None:
    """Append source -> figure to OUT/figures/index.jsonl (one line, flushed to disk): only once the PNG exists."""
    from delib_jax.stream import FIGURE_INDEX

    path = out / FIGURE_INDEX
    if path.is_symlink():
        raise OSError(f"{path} is a symbolic link")
    line = json.dumps({"source": source, "figure": figure}, ensure_ascii=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _examples(manifest: dict, no_examples: bool, report) -> dict:
    """The class examples ``delib explain`` shows for the manifest's run (none when it is not reachable)."""
    model_id = manifest.get("model", {})
    if no_examples or not model_id.get("checkpoint"):
        return {}
    from delib_jax.checkpoint import load_model
    from delib_jax.class_examples import class_examples

    run, which = model_id["checkpoint"], model_id.get("which", "best")
    try:
        model, config = load_model(run, which=which)
    except (FileNotFoundError, ValueError, OSError) as e:
        report(f"no class examples: cannot load the run {run} ({e})")
        return {}
    return class_examples(run, model, config, which=which, report=report)


def _run(args: argparse.Namespace) -> int:
    from concurrent import futures

    from delib_jax import _reader
    from delib_jax import store as st
    from delib_jax.job.folder import JobError, check_own_files, lock_folder
    from delib_jax.job.writing import figure_name, render_figure
    from delib_jax.progress import progress_bar
    from delib_jax.stream import drawn_figures, write_pages

    def report(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"delib figures: {message}", file=sys.stderr)

    out = Path(args.out)
    if args.hardest is not None and args.hardest < 1:
        raise UsageError(f"--hardest must be at least 1, got {args.hardest}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be at least 0, got {args.workers}")
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder of delib explain")
    try:
        manifest = st.read_manifest(out)
        if manifest is None:
            raise UsageError(f"{out} holds no explanations (no {st.MANIFEST}): run delib explain first")
        st.layout(manifest, out / st.MANIFEST)
        check_own_files(out)
        lock = lock_folder(out, 0)
    except (st.StoreError, JobError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot use {out}: {e.strerror or e}") from None
    try:
        chosen, unknown = choose(out, args.hardest, args.images)
        for given in unknown:
            report(f"{given} is not among the explained images: skipped")
        done = drawn_figures(out, [r["source"] for r in chosen])
        todo = {r["source"]: r for r in chosen if r["source"] not in done}
        if todo:
            try:
                st.safe_dir(out, "figures")
            except st.StoreError as e:
                raise UsageError(str(e)) from None
            st.remove_temporaries(out / "figures")
            examples = _examples(manifest, args.no_examples, report)
        resize, crop = manifest["input"]["resize"], manifest["input"]["crop"]
        drawn = failed = 0
        workers = _reader.default_workers() if args.workers is None else args.workers
        pool = _reader.start_pool(workers) if workers > 0 and len(todo) > 1 else None
        pending: dict = {}  # future -> (source, figure name); at most 2 per worker in flight (flat memory)
        bar = progress_bar(total=len(todo), unit="fig", desc="figures", disable=args.no_progress)

        def settle(source: str, name: str, draw) -> None:
            nonlocal drawn, failed
            try:
                draw()
            except Exception as err:  # noqa: BLE001 -- one figure that cannot be drawn: said, the rest go on
                report(f"no figure for {source}: {err}")
                failed += 1
            else:
                record_figure(out, source, name)  # only once the PNG is on disk
                drawn += 1
            bar.update(1)

        def wait(limit: int) -> None:
            while len(pending) > limit:
                finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for f in finished:
                    settle(*pending.pop(f), f.result)

        try:
            for e in st.load_explanations(out, sources=list(todo), skip_damaged=True,
                                          on_damage=lambda d: report(f"skipping a damaged entry: {d}")):  # fmt: skip
                r = todo[e.source]
                name = figure_name(r["i"], r["source"])
                job = (e, e.source, resize, crop, str(out / name), examples)
                if pool is None:
                    settle(e.source, name, lambda job=job: render_figure(*job))
                else:
                    pending[pool.submit(render_figure, *job)] = (e.source, name)
                    wait(2 * workers)
            wait(0)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        write_pages(out, manifest, report=report)
    except KeyboardInterrupt:
        print(f"delib figures: interrupted; {len(drawn_figures(out))} figures are kept in {out / 'figures'}: run the "
              "same command again to continue", file=sys.stderr, flush=True)  # fmt: skip
        return 130
    finally:
        lock.close()
    kept = len(chosen) - len(todo)
    print(f"drew {drawn} figures ({kept} already there, {failed} failed) -> {out / 'index.html'}", file=sys.stderr)
    return 0 if drawn or kept or not chosen else 1


COMMAND = Command("figures", "draw the figures of a --no-figures run, later", DESCRIPTION, _configure, _run)

__all__ = ["COMMAND", "choose", "record_figure"]
