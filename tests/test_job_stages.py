"""The explanation job's stages one by one (`delib_jax.job`): the resume plan, the reader stage and its channel,
the device step, the writer stage and its figures. The job as a whole: tests/test_stream.py."""

import os
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delib_jax import _reader
from delib_jax import store as st
from delib_jax.job.device import DeviceStep
from delib_jax.job.folder import JobError, plan_resume, prepare_folder
from delib_jax.job.reading import Channel, Dispatched, ReadBatch, batches_of, read_ahead
from delib_jax.job.writing import Figures, WriterStage, writer_loop

NAMES = ["sparrow", "wren", "tern"]


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        files.append(folder / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(files[-1])
    return files


def _host(n: int, *, q: int = 2, size: int = 8, finite: bool = True) -> dict[str, np.ndarray]:
    """Fetched outputs of a batch of ``n`` images, as the device step's compact dict holds them."""
    rng = np.random.default_rng(n)
    probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
    masks = rng.random((n, q, size, size)) > 0.5
    return {
        "probs": probs, "difficulty": rng.random(n).astype(np.float32),
        "classes": np.argsort(-probs, axis=1).astype(np.int32), "maps": rng.random((n, 4, size, size), np.float32),
        "grad_cam": rng.random((n, size, size), np.float32), "pairs": np.tile(np.array([[0, 1], [1, 2]]), (n, 1, 1)),
        "strength": rng.random((n, q), np.float32), "coverage": np.full((n, q), 0.1, np.float32),
        "threshold": rng.random((n, q), np.float32), "valid": np.ones((n, q), bool),
        "mask_bits": st.pack_bits(masks), "finite": np.full(n, finite),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ resume plan


def _manifest(version: int) -> dict:
    from delib_jax.testing.store import NAMES, SETTINGS

    return {"format": st.FORMAT, "model": {"arch": "small", "v": version}, "settings": SETTINGS,
            "input": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}, "figures": False,
            "class_names": NAMES}  # fmt: skip


def test_resume_plan_takes_this_share_and_leaves_out_what_is_finished(tmp_path):
    files = _images(tmp_path / "in", 5)
    out = tmp_path / "out"
    out.mkdir()
    directory, run = prepare_folder(out, _manifest(1), figures=False)
    plan = plan_resume(out, directory, files, (1, 2), figures=False, report=print)
    assert [i for i, _ in plan.mine] == [1, 3] and plan.todo == plan.mine and plan.kept == 0
    writer = st.ShardWriter(directory, 1, 4, run=run)
    writer.skip({"i": 1, "source": str(files[1]), "stat": plan.stats[1], "skipped": "unreadable"})
    writer.flush(final=True)
    plan = plan_resume(out, directory, files, (1, 2), figures=False, report=print)
    assert [i for i, _ in plan.todo] == [3] and plan.skipped == [(str(files[1]), "unreadable")]
    files[1].write_bytes(files[1].read_bytes() + b"changed")  # another file under the same path: redone
    messages = []
    plan = plan_resume(out, directory, files, (1, 2), figures=False, report=messages.append)
    assert [i for i, _ in plan.todo] == [1, 3] and plan.kept == 0 and "dropped 1 record" in messages[0]
    with pytest.raises(JobError, match="another model or other settings"):
        prepare_folder(out, _manifest(2), figures=False)


# ------------------------------------------------------------------------------------------------ reader stage


def test_read_ahead_yields_batches_in_order_and_waits_for_slots(tmp_path):
    files = _images(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_bytes(b"no png")
    todo = list(enumerate([*files[:2], tmp_path / "in" / "broken.png", *files[2:]]))
    assert [len(b) for b in batches_of(todo, 2)] == [2, 2, 2]
    channel = Channel(slots=3)
    with _reader.Reader(batch=2, crop=8, resize=10, slots=3, workers=0) as reader:
        got = []
        for batch in read_ahead(reader, todo, 2, channel):
            got.append(batch)
            assert reader.arrays[batch.slot][: len(batch.items)].any() or not batch.any_readable
            channel.give_slot(batch.slot)  # what the writer does once it has fetched the batch
    assert [b.items for b in got] == batches_of(todo, 2)
    assert [r.error is None for b in got for r in b.reports] == [True, True, False, True, True, True]
    assert len({b.slot for b in got}) == 3  # two ahead, the third taken when the first was handed on


def test_channel_raises_the_writers_failure_instead_of_blocking():
    channel = Channel(slots=1, depth=1)
    assert channel.take_slot() == 0
    channel.put(Dispatched(ReadBatch(0, [], []), None))
    channel.fail(RuntimeError("writer broke"))
    for wait in (channel.take_slot, lambda: channel.put(None)):
        with pytest.raises(RuntimeError, match="writer broke"):
            wait()
    stopped = Channel(slots=1, depth=1)
    stopped.put(Dispatched(ReadBatch(0, [], []), None))
    stopped.stop()  # the queue is full: the end still gets through
    assert stopped.stopping.is_set() and stopped.get() is None


# ------------------------------------------------------------------------------------------------ device step


def test_device_step_times_the_first_call_only():
    calls = []
    step = DeviceStep(lambda x: calls.append(x) or x * 2, compact=lambda y: {"y": y})
    assert step(3) == {"y": 6} and step.calls == 1 and step.compile_s >= 0
    first = step.compile_s
    step(4)
    assert step.calls == 2 and step.compile_s == first and calls == [3, 4]


# ------------------------------------------------------------------------------------------------ writer stage


def _stage(tmp_path, **kw):
    directory = tmp_path / "explanations"
    directory.mkdir(exist_ok=True)
    shards = st.ShardWriter(directory, 0, 2, image_size=(8, 8), run=st.new_run_id())
    done = []
    stage = WriterStage(shards, NAMES, {0: [1, 1], 1: [2, 2], 2: [3, 3]}, lambda m: None, on_done=done.append, **kw)
    return stage, done


def test_writer_stage_records_skips_and_flushes(tmp_path):
    stage, done = _stage(tmp_path, shard_seconds=1e9)
    ok, bad = _reader.Decoded(size=(8, 8)), _reader.Decoded(error="x.png: cannot read image")
    batch = ReadBatch(0, [(0, Path("a.png")), (1, Path("x.png")), (2, Path("c.png"))], [ok, bad, ok])
    stage.write(batch, _host(3))
    assert (stage.done, stage.explained, stage.skipped, done) == (3, 2, [("x.png", "x.png: cannot read image")], [3])
    records = list(st.read_records(tmp_path, skipped=True))  # the shard (2 images) is full: written
    assert len(records) == 3
    stage.write(ReadBatch(1, [(0, Path("d.png"))], [ok]), _host(1))
    assert len(list(st.read_records(tmp_path))) == 2  # buffered
    stage.close()
    assert len(list(st.read_records(tmp_path))) == 3
    records = list(st.read_records(tmp_path, skipped=True))
    assert [r["source"] for r in records] == ["a.png", "x.png", "c.png", "d.png"]
    assert records[0]["prediction_name"] in NAMES and records[0]["row"] == 0 and records[2]["row"] == 1
    layout = st.Layout(run=stage.shards.run, classes=3, top=3, insecurities=2, crop=8)
    arrays = st.read_shard(tmp_path / "explanations" / records[0]["shard"], layout).arrays()
    np.testing.assert_array_equal(arrays["probs"], _host(3)["probs"][[0, 2]])


def test_writer_stage_stops_on_a_model_with_nan_outputs(tmp_path):
    stage, _ = _stage(tmp_path)
    batch = ReadBatch(0, [(0, Path("a.png"))], [_reader.Decoded(size=(8, 8))])
    with pytest.raises(JobError, match=r"not finite \(NaN/inf\) for a.png"):
        stage.write(batch, _host(1, finite=False))


def test_writer_stage_flushes_every_shard_seconds(tmp_path):
    stage, _ = _stage(tmp_path, shard_seconds=0.0)
    stage.write(ReadBatch(0, [(0, Path("a.png"))], [_reader.Decoded(size=(8, 8))]), _host(1))
    assert [r["source"] for r in st.read_records(tmp_path)] == ["a.png"]  # one image, flushed at once


def test_writer_loop_hands_a_failure_to_the_main_thread(tmp_path):
    stage, _ = _stage(tmp_path)
    channel = Channel(slots=2)
    slots = [channel.take_slot(), channel.take_slot()]
    batch = ReadBatch(slots[0], [(0, Path("a.png"))], [_reader.Decoded(size=(8, 8))])
    channel.put(Dispatched(batch, None))  # nothing fetched for a readable image: the stage fails
    thread = threading.Thread(target=writer_loop, args=(channel, stage))
    thread.start()
    thread.join(timeout=30)
    assert isinstance(channel.failure, TypeError)
    with pytest.raises(TypeError):
        channel.take_slot()


def _done(value=None, error=None) -> Future:
    f = Future()
    f.set_exception(error) if error else f.set_result(value)
    return f


def test_figures_hold_records_back_until_drawn_and_drop_them_when_stopping(tmp_path):
    messages = []
    figures = Figures(tmp_path, 10, 8, NAMES, {}, {}, messages.append, threading.Event())
    records = [{"source": s, "figure": f"figures/{s}.png"} for s in ("a", "b", "c")]
    waiting = Future()
    figures.pending = {"a": _done(), "b": _done(error=OSError("b: cannot read image")), "c": waiting}
    assert figures.ready(records, block=False) is None  # c is not drawn yet
    waiting.set_result(None)
    kept = figures.ready(records, block=False)
    assert [r["figure"] for r in kept] == ["figures/a.png", None, "figures/c.png"] and not figures.pending
    assert messages == ["no figure for b: b: cannot read image"]
    figures.pending = {"a": Future()}
    figures.stopping.set()
    assert figures.ready(records[:1], block=True) == []  # interrupted: not waited for, dropped (redone on resume)


def test_figures_keep_at_most_in_flight_explanations_waiting_for_the_pool(tmp_path, monkeypatch):
    """Figures lag far behind the device: `Figures.submit` waits rather than queue every explanation of the run."""
    from concurrent.futures import ThreadPoolExecutor

    from delib_jax.job import writing
    from delib_jax.testing.store import SETTINGS

    drawn, most = [], [0]

    class Pool(ThreadPoolExecutor):  # counts the figures handed over and not yet drawn at each submit
        def submit(self, fn, *args):
            most[0] = max(most[0], 1 + sum(not f.done() for f in figures.pending.values()))
            return super().submit(fn, *args)

    monkeypatch.setattr(writing, "render_figure", lambda e, source, *rest: (threading.Event().wait(0.01),
                                                                             drawn.append(source)))  # fmt: skip
    figures = Figures(tmp_path, 8, 8, NAMES, SETTINGS, {}, print, threading.Event(), pool=Pool(1), in_flight=2)
    host = _host(12)
    arrays = {k: v for k, v in host.items() if k != "finite"}
    records = [{"i": i, "source": f"/d/im{i}.png"} for i in range(12)]
    try:
        figures.submit(arrays, records)
        assert most[0] <= 2  # the old writer queued all 12 at once
        assert len(figures.ready(records, block=True)) == 12 and sorted(drawn) == sorted(r["source"] for r in records)
    finally:
        figures.close()


def test_inputs_in_flat_memory_read_back_as_given(tmp_path):
    """PathList keeps any path (non-UTF-8 bytes included) in one buffer; Items and Fingerprints index by ordinal."""
    from delib_jax.job.folder import Fingerprints, Items, Ordinals, PathList, fingerprint

    odd = tmp_path / os.fsdecode(b"caf\xe9.png")
    odd.write_bytes(b"x" * 3)
    paths = [tmp_path / "a.png", odd, tmp_path / "gone.png", Path("relative/b.jpg")]
    paths[0].write_bytes(b"x")
    listed = PathList(paths)
    assert list(listed) == paths and listed[1] == odd and listed[-1] == paths[-1] and len(listed) == 4
    assert list(listed[1:3]) == paths[1:3] and list(PathList()) == []
    ordinals = np.array([0, 1, 2], np.int64)
    stats = Fingerprints(listed, ordinals)
    assert stats[0] == fingerprint(paths[0]) and stats[1] == [3, odd.stat().st_mtime_ns] and stats[2] is None
    with pytest.raises(KeyError):
        stats[3]
    items = Items(listed, ordinals[[0, 2]])
    assert list(items) == [(0, paths[0]), (2, paths[2])] and items[1] == (2, paths[2]) and len(items[:1]) == 1
    lookup = Ordinals(listed, ordinals)
    assert [lookup.get(str(p)) for p in paths] == [0, 1, 2, None]


def test_inputs_outside_the_output_folder_as_resolving_each_file(tmp_path):
    """Each folder resolved once gives what resolving every file gives: files in OUT (or a folder below it, or
    reached through a link to it) left out, a link to a file in OUT left out, a link out of OUT kept."""
    from delib_jax.job.folder import inputs_outside

    out = tmp_path / "in" / "out"
    (out / "figures").mkdir(parents=True)
    (tmp_path / "in" / "sub").mkdir()
    files = [tmp_path / "in" / "a.png", out / "b.png", out / "figures" / "c.png", tmp_path / "in" / "sub" / "d.png"]
    for f in files:
        f.write_bytes(b"x")
    (tmp_path / "in" / "to_out").symlink_to(out)  # a folder link into OUT
    (tmp_path / "in" / "e.png").symlink_to(out / "b.png")  # a file link into OUT
    (out / "f.png").symlink_to(files[0])  # a link in OUT to a file outside: its target is outside
    given = [*files, tmp_path / "in" / "to_out" / "b.png", tmp_path / "in" / "e.png", out / "f.png"]
    root = out.resolve()
    expected = [f for f in given if root not in f.resolve().parents]
    assert list(inputs_outside(given, out)) == expected
    assert [f.name for f in expected] == ["a.png", "d.png", "f.png"]


def test_paths_are_kept_as_path_writes_them_and_named_without_path_objects(tmp_path):
    """PathList stores str(Path(p)) (collapsed slashes, no "." parts) so that `source(i)`, the fast name a resume
    looks inputs up by, is the name the writer records (str of the Path read back)."""
    from delib_jax.job.folder import PathList, _as_path

    odd = ["./a//b/./c.png", "x/", "//y", "///z", "a/.", ".", "a", "/", "a//b", "/a/./b", "../a", "a/..", "/x.png",
           os.fsdecode(b"caf\xe9/./n.png"), Path("p/q.png")]  # fmt: skip
    listed = PathList(odd)
    assert [listed.source(i) for i in range(len(odd))] == [str(Path(p)) for p in odd] == [str(p) for p in listed]
    assert all(_as_path(p) == str(Path(p)) for p in odd)


def test_image_files_once_each_as_resolving_every_file(tmp_path):
    """A folder is resolved once, not each file: the same files are found, each once, as when every file is
    resolved: a folder given twice (once through ".." and once through a link), a file given again, links to files."""
    from delib_jax.cli import image_files

    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png", "notes.txt"):
        (d / name).write_bytes(b"x")
    (tmp_path / "link_dir").symlink_to(d)
    (tmp_path / "e.png").symlink_to(d / "a.png")  # a file link: the same file as d/a.png
    (d / "sub" / "f.png").symlink_to(tmp_path / "elsewhere.png")  # a dangling link: not a file
    said: list[str] = []
    inputs = [str(d), str(tmp_path / "link_dir"), str(d / "sub" / ".." / "b.jpg"), str(tmp_path / "e.png")]
    found = image_files(inputs, said.append)
    assert [str(p) for p in found] == [str(d / "a.png"), str(d / "b.jpg"), str(d / "sub" / "c.png")]
    assert len(said) == 5 and all("is given more than once" in s for s in said)  # 3 through the link, 2 named again
