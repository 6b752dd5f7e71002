"""The streaming explanation job (`delib_jax.stream`) and its store (`delib_jax.store`): equal to `explain`, resumable
after a kill at any point, shareable between processes, and safe with its output folder."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import delib_jax
from delib_jax import store as st
from delib_jax.checkpoint import RunConfig, build_model
from delib_jax.explanation import preprocess, read_image
from delib_jax.stream import JobError, JobOptions, explain_files, lock_folder

pytestmark = pytest.mark.slow  # the streaming job end to end, several runs killed in subprocesses

NAMES = ["sparrow", "wren", "tern", "finch"]
OPTIONS = {"top_n": 4, "k": 3, "max_insecurities": 3}


def _config():
    return RunConfig(arch="small", num_classes=4, class_names=NAMES, crop=48, resize=56, dataset="cub")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    config = _config()
    model = build_model(config, rngs=nnx.Rngs(3))
    model.eval()
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    files = []
    for i, (h, w) in enumerate([(60, 80), (50, 50), (64, 48), (90, 40), (56, 70), (48, 48), (70, 52)]):
        path = images / f"im{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(path)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    files.insert(3, images / "broken.jpg")
    return root, model, config, files


def _job(model, config, files, out, **kw):
    options = JobOptions(**{"batch_size": 3, "workers": 0, "progress": False, **kw})
    return explain_files(model, config, files, out, options=options, report=lambda m: None, **OPTIONS)


def _same(a, b):
    """Two Explanations equal bit for bit (maps, probabilities, masks, pairs, strengths)."""
    assert a.source == b.source and a.prediction == b.prediction and a.class_names == b.class_names
    for field in ("probs", "maps", "grad_cam", "classes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert np.float32(a.difficulty) == np.float32(b.difficulty)
    assert [q.pair for q in a.insecurities] == [q.pair for q in b.insecurities]
    for qa, qb in zip(a.insecurities, b.insecurities):
        np.testing.assert_array_equal(qa.mask, qb.mask)
        assert (qa.strength, qa.coverage, qa.threshold) == (qb.strength, qb.coverage, qb.threshold)


def test_streamed_outputs_equal_explain_bit_for_bit(setup, tmp_path):
    """Reader processes, padding of the last batch, packing on the device and the store change nothing."""
    _, model, config, files = setup
    summary = _job(model, config, files, tmp_path / "out", workers=1, shard_size=4)
    assert summary.explained == 7 and [Path(p).name for p, _ in summary.skipped] == ["broken.jpg"]
    streamed = list(delib_jax.load_explanations(tmp_path / "out"))
    good = [f for f in files if f.name != "broken.jpg"]
    assert [e.source for e in streamed] == [str(f) for f in good]  # input order
    x = np.stack([preprocess(read_image(f), resize=56, crop=48, normalization=config.normalization)[1] for f in good])
    direct = delib_jax.explain(model, x, class_names=NAMES, sources=[str(f) for f in good], **OPTIONS)
    assert sum(len(e.insecurities) for e in direct) > 0
    for a, b in zip(streamed, direct):
        _same(a, b)
    # the index alone says the same, without reading any array
    records = list(st.read_records(tmp_path / "out"))
    for r, e in zip(records, direct):
        assert r["prediction_name"] == e.prediction_name and r["confidence"] == pytest.approx(e.confidence)
        assert [(q["a"], q["b"], q["name_a"]) for q in r["insecurities"]] == [
            (q.a, q.b, q.name_a) for q in e.insecurities
        ]
        assert [c for c, _ in r["top"]] == [int(c) for c in e.classes]
    skipped = [r for r in st.read_records(tmp_path / "out", skipped=True) if "skipped" in r]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]["skipped"]
    assert len(list((tmp_path / "out" / "explanations").glob("shard-*.safetensors"))) == 2  # 7 images, 4 per shard
    assert list(delib_jax.load_explanations(tmp_path / "out", sources=[str(good[2])]))[0].source == str(good[2])


def test_packed_bits_round_trip():
    rng = np.random.default_rng(1)
    for shape in [(2, 3, 7, 5), (1, 1, 48, 48), (4, 0, 3, 3)]:
        masks = rng.random(shape) > 0.5
        bits = st.pack_bits(masks)
        assert bits.shape == (*shape[:2], -(-shape[2] * shape[3] // 8))
        np.testing.assert_array_equal(st.unpack_bits(bits, shape[2:]), masks)


def test_two_shares_write_disjoint_files_that_merge_into_the_whole(setup, tmp_path):
    _, model, config, files = setup
    whole = tmp_path / "whole"
    _job(model, config, files, whole)
    shared = tmp_path / "shared"
    for p in range(2):
        _job(model, config, files, shared, share=(p, 2))
    names = sorted(p.name for p in (shared / "explanations").iterdir())
    assert {n.split("-")[1][:5] for n in names} == {"00000", "00001"}
    merged = {e.source: e for e in delib_jax.load_explanations(shared)}
    alone = {e.source: e for e in delib_jax.load_explanations(whole)}
    assert merged.keys() == alone.keys() and len(alone) == 7
    for source, e in alone.items():
        _same(merged[source], e)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from pathlib import Path
    from flax import nnx
    sys.path.insert(0, {tests!r})
    from test_stream import _config, _job
    from delib_jax import store as st
    from delib_jax.checkpoint import build_model

    point, out, files = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    model = build_model(_config(), rngs=nnx.Rngs(3))
    model.eval()
    calls = [0]
    flush = st.ShardWriter.flush

    def dying_flush(self, **kw):
        calls[0] += 1
        if calls[0] < 2:
            return flush(self, **kw)
        if point == "shard_written":  # the shard is on disk, its records are not in the index
            self.ready = lambda records, block: os.kill(os.getpid(), signal.SIGKILL)
            return flush(self, **kw)
        if point == "torn_index":  # half a record line appended
            with open(self.index_path, "a") as f:
                f.write('{{"i": 5, "source": "x", "st')
        if point == "temporary":  # a shard's temporary file half written
            (self.directory / ".shard-00000-000009.npz.abc.tmp").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)

    st.ShardWriter.flush = dying_flush
    _job(model, _config(), files, out, batch_size=1, shard_size=2)
""")


@pytest.mark.parametrize("point", ["shard_written", "torn_index", "temporary"])
def test_kill_at_any_point_then_the_same_command_gives_the_uninterrupted_outputs(setup, tmp_path, point):
    _, model, config, files = setup
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script), point, str(out), *map(str, files)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == -9, done.stderr  # killed
    before = list(st.read_records(out, skipped=True))
    assert 0 < len(before) < 8
    summary = _job(model, config, files, out, batch_size=1, shard_size=2, json=True)
    assert summary.resumed == sum("skipped" not in r for r in before)
    reference = tmp_path / "reference"
    _job(model, config, files, reference, batch_size=1, shard_size=2)
    resumed = list(delib_jax.load_explanations(out))
    expected = list(delib_jax.load_explanations(reference))
    assert [e.source for e in resumed] == [e.source for e in expected]
    for a, b in zip(resumed, expected):
        _same(a, b)
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    named = {r["shard"] for r in st.read_records(out)}
    assert {p.name for p in (out / "explanations").glob("shard-*")} == named  # no orphan shard
    assert json.loads((out / "insecurities.json").read_text())["images"]


def test_json_only_when_asked(setup, tmp_path):
    """insecurities.json (the maps as decimal text, ~60 KB per image) only with json=True; the store always."""
    _, model, config, files = setup
    out = tmp_path / "out"
    summary = _job(model, config, files[:3], out)
    assert not summary.json_written and not (out / "insecurities.json").exists()
    assert (out / "index.html").is_file() and len(list(st.read_records(out))) == 3
    summary = _job(model, config, files[:3], out, json=True)
    data = json.loads((out / "insecurities.json").read_text())
    assert summary.json_written and len(data["images"]) == 3
    _job(model, config, files[:3], out)  # asked no more: the file, no longer kept up to date, goes
    assert not (out / "insecurities.json").exists()


def test_the_folder_is_safe(setup, tmp_path):
    """A lock, no writing through links, changed inputs explained again, another model refused, a full disk said."""
    root, model, config, files = setup
    out = tmp_path / "out"
    out.mkdir()
    held = lock_folder(out, 0)
    with pytest.raises(JobError, match="another delib explain .* is writing to"):
        _job(model, config, files[:2], out)
    held.close()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "explanations").symlink_to(outside)
    with pytest.raises(JobError, match="symbolic link"):
        _job(model, config, files[:2], out)
    assert not list(outside.iterdir())
    (out / "explanations").unlink()

    _job(model, config, files[:3], out)
    changed = tmp_path / "changed.png"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(changed)
    copy = tmp_path / "copy.png"
    copy.write_bytes(files[1].read_bytes())
    _job(model, config, [*files[:3], copy], out)
    first = {e.source: e for e in delib_jax.load_explanations(out)}
    os.replace(changed, copy)  # another picture under the same path
    summary = _job(model, config, [*files[:3], copy], out)
    assert summary.resumed == 3 and summary.explained == 1
    second = {e.source: e for e in delib_jax.load_explanations(out)}
    assert len(second) == 4 and not np.array_equal(second[str(copy)].maps, first[str(copy)].maps)

    other = build_model(_config(), rngs=nnx.Rngs(4))  # the run folder retrained in place
    other.eval()
    with pytest.raises(JobError, match="another model or other settings .*model.weights"):
        _job(other, config, files[:3], out)


def test_full_disk_is_one_error_and_the_same_call_resumes(setup, tmp_path, monkeypatch):
    _, model, config, files = setup
    out = tmp_path / "out"
    encode = st.encode_shard
    calls = [0]

    def full(*args, **kw):
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return encode(*args, **kw)

    monkeypatch.setattr(st, "encode_shard", full)
    with pytest.raises(JobError, match=r"the disk holding .* is full: free about \d+ MB"):
        _job(model, config, files, out, shard_size=2)
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(st, "encode_shard", encode)
    summary = _job(model, config, files, out, shard_size=2)
    assert summary.resumed == 3 and summary.resumed + summary.explained == 7  # the first shard (one batch) kept


def test_report_and_json_limits(setup, tmp_path):
    _, model, config, files = setup
    out = tmp_path / "out"
    summary = _job(model, config, files, out, report_limit=2, json=True, json_limit=3)
    assert not summary.json_written and not (out / "insecurities.json").exists()
    page = (out / "index.html").read_text()
    assert page.count("<tr data-index=") == 2 and "The 2 hardest of 7 images" in page
    difficulties = sorted((r["difficulty"] for r in st.read_records(out)), reverse=True)
    shown = [float(x) for x in __import__("re").findall(r'data-difficulty="([^"]+)"', page)]
    assert shown == pytest.approx(difficulties[:2], rel=1e-5)


CACHED = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    from flax import nnx
    sys.path.insert(0, {tests!r})
    from test_stream import _config, _job
    from delib_jax import _xla
    from delib_jax.checkpoint import build_model

    _xla.compilation_cache(None)  # from DELIB_COMPILATION_CACHE
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    model = build_model(_config(), rngs=nnx.Rngs(3))
    _job(model, _config(), sys.argv[2:], Path(sys.argv[1]))
    print(json.dumps({{"hits": sum("cache_hits" in e for e in events),
                      "misses": sum("cache_misses" in e for e in events)}}))
""")


def test_a_second_run_compiles_nothing(setup, tmp_path):
    _, _, _, files = setup
    script = tmp_path / "cached.py"
    script.write_text(CACHED.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DELIB_COMPILATION_CACHE": str(tmp_path / "cache")}
    counts = []
    for run in range(2):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / f"out{run}"), *map(str, files[:3])],
                              env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        counts.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert counts[0]["misses"] > 0 and list((tmp_path / "cache").iterdir())
    assert counts[1]["misses"] == 0 and counts[1]["hits"] >= counts[0]["misses"]


INTERRUPTED = textwrap.dedent("""
    import sys
    from pathlib import Path
    from flax import nnx
    sys.path.insert(0, {tests!r})
    from test_stream import _config, _job
    from delib_jax.checkpoint import build_model
    from delib_jax.cli import exit_process

    model = build_model(_config(), rngs=nnx.Rngs(3))
    try:
        _job(model, _config(), sys.argv[2:] * 40, Path(sys.argv[1]), batch_size=1, shard_size=1, figures=True,
             figure_workers=1, workers=1, shard_seconds=0.1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        exit_process(130)
""")


def test_ctrl_c_is_one_line_keeps_finished_work_and_leaves_no_process(setup, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while reader and figure processes run."""
    import signal
    import time

    _, model, config, files = setup
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "out"
    copies = []
    for j in range(3):  # distinct paths: the 40-fold list repeats them, and repeats are explained once
        for f in files:
            copies.append(tmp_path / "in" / f"{j}_{f.name}")
            copies[-1].parent.mkdir(exist_ok=True)
            copies[-1].write_bytes(f.read_bytes())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), *map(str, copies)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    index = out / "explanations" / "index-00000.jsonl"
    deadline = time.monotonic() + 240
    while not (index.is_file() and index.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # returns only when no process holds the pipes: no orphaned workers
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err and "leaked" not in err, err
    kept = list(st.read_records(out))
    assert kept and all((out / r["figure"]).is_file() for r in kept)
    summary = _job(model, config, copies, out, figures=True, figure_workers=1)
    assert summary.resumed == len(kept) and summary.resumed + summary.explained == 21


def test_a_page_the_job_did_not_write_is_refused_and_kept(setup, tmp_path):
    """A user's own index.html (or insecurities.json) in the output folder: one line, the file untouched; the
    job's own files are replaced by the next run."""
    _, model, config, files = setup
    for name in ("index.html", "pairs.html", "insecurities.json"):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text("<html>my own page</html>")
        with pytest.raises(JobError, match=f"{name} was not written by delib explain"):
            _job(model, config, files[:2], out)
        assert (out / name).read_text() == "<html>my own page</html>"
        (out / name).unlink()
        _job(model, config, files[:2], out, json=True)
        page = (out / "index.html").read_text()
        _job(model, config, files[:3], out, json=True)  # the job's own files: replaced
        assert (out / "index.html").read_text() != page and (out / "insecurities.json").is_file()
