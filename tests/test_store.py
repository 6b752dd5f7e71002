"""The explanation store (`delib_jax.store`) against damaged and foreign files: every row bound to its image and
run, validated and bounded reads, one exception (`StoreDamage`) naming the file, a skip flag, `delib verify`, and a
resume in flat memory that re-explains what is damaged."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import delib_jax
from delib_jax import store as st
from delib_jax.cli import main
from delib_jax.testing.store import synthetic_folder

INDEX = Path("explanations") / "index-00000.jsonl"


@pytest.fixture
def folder(tmp_path):
    """10 images in 3 shards (4, 4, 2)."""
    out = tmp_path / "out"
    rows = synthetic_folder(out, images=10, shard_size=4)
    return out, rows


def _shards(out):
    return sorted((out / "explanations").glob("shard-*"))


def _lines(out):
    return (out / INDEX).read_text().splitlines()


def _write_lines(out, lines):
    (out / INDEX).write_text("\n".join(lines) + "\n")


def _damage(out, match):
    """load_explanations raises StoreDamage naming ``match``; `delib verify` exits 1 with a line naming it."""
    with pytest.raises(st.StoreDamage, match=match):
        list(delib_jax.load_explanations(out))
    verdict = st.verify_folder(out)
    assert any(re.search(match, p) for p in verdict.problems), verdict


def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _rewrite(path, header, body, out=None):
    """Write a shard from a (changed) header and body; with ``out``, its records get the new digest (so that the
    reader gets past the digest to the check under test)."""
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + body
    old = st.content_digest(path.read_bytes())
    path.write_bytes(data)
    if out is not None:
        _write_lines(out, [line.replace(old, st.content_digest(data)) for line in _lines(out)])


def test_round_trip_and_verify_clean(folder, capsys):
    out, rows = folder
    es = list(delib_jax.load_explanations(out))
    assert [e.source for e in es] == [f"/data/img_{i:06d}.jpg" for i in range(10)]
    masks = st.unpack_bits(rows["mask_bits"], (32, 32))
    for i, e in enumerate(es):
        np.testing.assert_array_equal(e.maps, rows["maps"][i])
        valid = np.flatnonzero(rows["valid"][i])
        assert len(e.insecurities) == len(valid)
        for q, ins in zip(valid, e.insecurities):
            np.testing.assert_array_equal(ins.mask, masks[i, q])
    assert main(["verify", str(out)]) == 0
    assert "clean: 10 explained and 0 skipped records, 3 shards" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "flipped"])
def test_damaged_shard_is_one_exception_naming_it(folder, kind):
    out, _ = folder
    shard = _shards(out)[1]
    data = shard.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"PK\x03\x04" + os.urandom(300),
               "flipped": data[:-10] + bytes(b ^ 0xFF for b in data[-10:])}[kind]  # fmt: skip
    shard.write_bytes(damaged)
    _damage(out, re.escape(shard.name))


def test_shard_from_another_folder_or_another_name_is_foreign(folder, tmp_path):
    out, _ = folder
    other = tmp_path / "other"
    synthetic_folder(other, images=10, shard_size=4, seed=1)  # the same sources, another run
    shutil.copy(_shards(other)[0], _shards(out)[0])
    _damage(out, "another run")
    # within the folder: shard 2 copied over shard 1, and its records pointed at it (digest and all)
    out2 = tmp_path / "out2"
    synthetic_folder(out2, images=10, shard_size=4)
    a, b = _shards(out2)[:2]
    digest_b = st.content_digest(b.read_bytes())
    shutil.copy(b, a)
    _write_lines(out2, [re.sub(r'"digest": "[^"]+"', f'"digest": "{digest_b}"', line) for line in _lines(out2)])
    _damage(out2, "was written as .*shard-00000-000001")


def test_old_format_is_one_line(folder, capsys):
    out, _ = folder
    manifest = json.loads((out / st.MANIFEST).read_text())
    (out / st.MANIFEST).write_text(json.dumps({**manifest, "format": "delib-explanations/1"}))
    with pytest.raises(st.StoreError, match="older format .*new folder"):
        list(delib_jax.load_explanations(out))
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "older format" in err[0]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h: h["maps"].update(shape=[4, 5, 3, 3]), "maps"),  # arrays cut to a smaller shape
        (lambda h: h["probs"].update(shape=[4, 5]), "probs"),  # more classes than the manifest names
        (lambda h: h["probs"].update(dtype="F64"), "probs is F64"),
        (lambda h: h.pop("valid"), "missing"),
        (lambda h: h["probs"].update(data_offsets=[0, 1 << 40]), "probs"),  # bytes the file does not hold
        (lambda h: h["__metadata__"].update(rows="[]"), "rows"),
    ],
)
def test_malformed_or_oversized_header(folder, change, match):
    out, _ = folder
    shard = _shards(out)[0]
    header, body = _header(shard)
    change(header)
    _rewrite(shard, header, body, out)
    _damage(out, match)


def test_header_larger_than_the_file(folder):
    out, _ = folder
    shard = _shards(out)[0]
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 1 << 50) + data[8:])
    _damage(out, "header claims")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.update(row=-1), "row -1 is out of range"),  # numpy would read the last row
        (lambda r: r.update(row=4), "row 4 is out of range"),
        (lambda r: r.update(row=1), "row 1 holds another image"),
        (lambda r: r.update(source="/planted.jpg"), "holds another image"),  # a record for an input not there
        (lambda r: r.update(stat=[1, 2]), "holds another image"),  # the same path, another file
    ],
)
def test_record_that_disagrees_with_its_shard(folder, edit, match):
    out, _ = folder
    lines = _lines(out)
    r = json.loads(lines[0])
    edit(r)
    _write_lines(out, [json.dumps(r), *lines[1:]])
    _damage(out, match)


def test_duplicated_and_planted_records(folder):
    out, _ = folder
    lines = _lines(out)
    _write_lines(out, [*lines, lines[3]])  # a record appended twice
    _damage(out, "a second record for '/data/img_000003.jpg'")
    planted = {**json.loads(lines[5]), "source": "/elsewhere/x.jpg", "i": 99}  # another image, a real row
    _write_lines(out, [*lines, json.dumps(planted)])
    _damage(out, "row 1 holds another image")


def test_skip_flag_counts_and_serves_the_rest(folder, capsys):
    out, _ = folder
    _shards(out)[1].write_bytes(b"")  # 4 images
    lines = _lines(out)
    _write_lines(out, [lines[0], "{torn", *lines[1:], lines[9]])  # a damaged line, a duplicate
    damaged: list[st.StoreDamage] = []
    es = list(delib_jax.load_explanations(out, skip_damaged=True, on_damage=damaged.append))
    assert [e.source for e in es] == [f"/data/img_{i:06d}.jpg" for i in (0, 1, 2, 3, 8, 9)]
    assert len(damaged) == 6 and all(isinstance(e, st.StoreDamage) for e in damaged)
    assert sum(e.path.name == "shard-00000-000001.safetensors" for e in damaged) == 4
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 4 and "DAMAGED: 3 problem(s)" in printed[-1]  # torn line, shard (once), duplicate


def test_verify_usage_errors(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "holds no explanations" in err


BOMB = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from delib_jax import store as st

    out = Path(sys.argv[1])
    lay = st.layout(json.loads((out / "manifest.json").read_text()))
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (200 << 20), resource.RLIM_INFINITY))  # 200 MB more, no more
    shard = st.read_shard(out / "explanations" / "shard-00000-000000.safetensors", lay)
    try:
        shard.arrays()
    except st.StoreDamage as e:
        print("damage:", e)
    print("verify:", st.verify_folder(out).problems)
""")


def test_compression_bomb_stays_bounded(folder, tmp_path):
    """Mask bits that inflate to 1 GB (from ~1 MB) are refused with a memory limit of 200 MB over the start."""
    out, _ = folder
    shard = _shards(out)[0]
    header, body = _header(shard)
    z = zlib.compressobj(9)
    bomb = b"".join(z.compress(bytes(1 << 20)) for _ in range(1024)) + z.flush()
    parts = {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
    parts["masks_deflated"] = bomb
    header["masks_deflated"]["shape"] = [len(bomb)]
    at = 0
    for k, part in parts.items():
        header[k]["data_offsets"] = [at, at + len(part)]
        at += len(part)
    _rewrite(shard, header, b"".join(parts.values()), out)
    script = tmp_path / "bomb.py"
    script.write_text(BOMB)
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "damage:" in done.stdout and "do not inflate" in done.stdout and "MemoryError" not in done.stderr
    assert "verify: ['" in done.stdout and "shard-00000-000000" in done.stdout


def test_open_index_is_compact_and_repairs(folder):
    out, _ = folder
    directory = out / "explanations"
    lines = _lines(out)
    _shards(out)[1].write_bytes(b"damaged")
    planted = {**json.loads(lines[0]), "source": "/elsewhere/x.jpg", "i": 99}
    _write_lines(out, [*lines, lines[0], "{torn", json.dumps(planted)])
    (directory / "shard-00000-000007.safetensors").write_bytes(b"left by a kill")
    messages: list[str] = []
    done = st.open_index(directory, 0, keep=lambda r: True, report=messages.append)
    assert isinstance(done, st.Resume) and done.hashes.dtype == np.int64 and done.hashes.nbytes == 8 * 6
    assert done.explained == 6 and len(done) == 6 and done.next_seq == 3 and not done.skipped
    assert "/data/img_000000.jpg" in done and "/data/img_000004.jpg" not in done and "/elsewhere/x.jpg" not in done
    assert any("shard-00000-000001" in m and "explaining its 4 image(s) again" in m for m in messages), messages
    assert any("dropped 7 record(s)" in m for m in messages), messages
    assert [p.name for p in _shards(out)] == ["shard-00000-000000.safetensors", "shard-00000-000002.safetensors"]
    assert len(_lines(out)) == 6 and st.verify_folder(out).problems == []
    messages.clear()
    again = st.open_index(directory, 0, keep=lambda r: True, report=messages.append)
    assert again.explained == 6 and not messages  # rewritten clean: nothing dropped the second time


def _depth(value) -> int:
    """How deeply lists and dicts nest in a parsed JSON value (the reference for `st._nests_within`)."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max((_depth(v) for v in children), default=0)


def test_records_nested_too_deeply_are_dropped(folder):
    """An index line nested past what the job writes (3: record, insecurities, insecurity) is not a record; the
    fast check agrees with a plain depth on random JSON values."""
    rng = np.random.default_rng(0)

    def value(level):
        if level == 0 or rng.random() < 0.3:
            return [1, "a", 2.5, None, True][rng.integers(5)]
        if rng.random() < 0.5:
            return [value(level - 1) for _ in range(rng.integers(4))]
        return {f"k{i}": value(level - 1) for i in range(rng.integers(4))}

    for _ in range(3000):
        v = value(6)
        assert all(st._nests_within(v, limit) == (_depth(v) <= limit) for limit in range(7))
    out, _ = folder
    lines = _lines(out)
    first = json.loads(lines[0])
    assert st._record(lines[0]) == first and st._record(json.dumps({**first, "extra": [[1]]})) is not None
    deep = {**first, "insecurities": [{**first["insecurities"][0], "x": [1]}, *first["insecurities"][1:]]}
    assert _depth(deep) == 4 and st._record(json.dumps(deep)) is None
    _write_lines(out, [json.dumps(deep), *lines[1:]])
    done = st.open_index(out / "explanations", 0, keep=lambda r: True, report=lambda m: None)
    assert done.explained == 9 and first["source"] not in done


def test_open_index_never_stops_on_a_stored_file(folder):
    out, _ = folder
    directory = out / "explanations"
    (out / INDEX).write_bytes(b"\xff\xfe\x00garbage\n" + b"[" * 100000 + b"\n")
    for p in _shards(out):
        p.write_bytes(b"")
    done = st.open_index(directory, 0, keep=lambda r: True, report=lambda m: None)
    assert len(done) == 0 and done.next_seq == 0 and not _shards(out)


def test_docs_page_code_runs(tmp_path, monkeypatch):
    """The python blocks of docs/explanation-store.md, run in a temporary folder."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "explanation-store.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)\n```", text, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "explanation-store.md", "exec"), namespace)  # noqa: S102


@pytest.mark.slow
def test_resume_re_explains_damaged_and_foreign_results(tmp_path):
    """A real job's folder with a shard from another folder, a truncated shard, a duplicated and a torn line: the
    same call reports one line per file, re-explains those images only, and gives the uninterrupted results."""
    from flax import nnx
    from PIL import Image
    from test_stream import OPTIONS, _config, _same

    from delib_jax.checkpoint import build_model
    from delib_jax.stream import JobOptions, explain_files

    config = _config()
    model = build_model(config, rngs=nnx.Rngs(3))
    model.eval()
    rng = np.random.default_rng(0)
    files = []
    for i in range(7):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (50 + 3 * i, 60, 3), dtype=np.uint8)).save(files[-1])
    messages: list[str] = []

    def job(out, inputs):
        options = JobOptions(batch_size=2, workers=0, progress=False, shard_size=2)
        return explain_files(model, config, inputs, out, options=options, report=messages.append, **OPTIONS)

    out, other = tmp_path / "out", tmp_path / "other"
    job(out, files)
    expected = list(delib_jax.load_explanations(out))
    job(other, files[:2])  # the same first two images, another run
    shards = _shards(out)
    assert len(shards) == 4
    shutil.copy(_shards(other)[0], shards[0])  # images 0, 1: foreign
    shards[2].write_bytes(shards[2].read_bytes()[:300])  # images 4, 5: truncated
    lines = _lines(out)
    _write_lines(out, [*lines, lines[3], '{"i": 2, "sou'])
    assert main(["verify", str(out)]) == 1
    messages.clear()
    summary = job(out, files)
    assert summary.resumed == 3 and summary.explained == 4, messages
    assert any("shard-00000-000000" in m and "another run" in m for m in messages), messages
    assert any("shard-00000-000002" in m and "again" in m for m in messages), messages
    assert any("dropped 6 record(s)" in m for m in messages), messages
    resumed = list(delib_jax.load_explanations(out))
    assert sorted(e.source for e in resumed) == sorted(e.source for e in expected)
    by_source = {e.source: e for e in resumed}
    for e in expected:
        _same(by_source[e.source], e)
    assert st.verify_folder(out).problems == []


def test_the_first_process_writes_the_manifest(tmp_path):
    """Several processes of one run starting in a new folder: one manifest, one run id for all of them."""
    first = {"format": st.FORMAT, "run": st.new_run_id()}
    assert st.create_manifest(tmp_path, first)
    assert not st.create_manifest(tmp_path, {**first, "run": st.new_run_id()})
    assert json.loads((tmp_path / st.MANIFEST).read_text()) == first
    assert [p.name for p in tmp_path.iterdir()] == [st.MANIFEST]  # no temporary left


def test_unreadable_index_is_damage_naming_it(folder):
    out, _ = folder
    (out / INDEX).unlink()
    (out / INDEX).mkdir()  # a folder where the index should be: reading fails whoever runs the test
    _damage(out, "index-00000.jsonl: cannot be read")


# ---------------------------------------------------------------------------------------------- the resume's fast read


def _written_lines(tmp_path: Path) -> list[str]:
    """Index lines as the job's writer writes them, in every form it has: odd names and sources (quotes,
    backslashes, non-ASCII, control characters, undecodable bytes), a dataset's fields, notes, figures drawn or
    failed, shares present or not, no insecurity at all, skipped files with and without a fingerprint."""
    from delib_jax.job.writing import host_lists, make_record
    from delib_jax.testing.store import synthetic_rows

    names = ['sp"arrow', "wr\\en", "tërn \u2603", "fi\x01nch"]
    part = synthetic_rows(8, crop=8, seed=3)
    part["valid"][3] = False  # an image without insecurities
    lists = host_lists(part, (8, 8), from_strength=False)
    lists["share"][5] = [float("nan")] * len(lists["share"][5])  # written before shares: no share field
    lists["share"][6] = [0.0, 1.0, 3e-05][: len(lists["share"][6])]
    sources = ["/data/a.jpg", '/data/q"uote.jpg', "/data/b\\s.jpg", "/data/caf\u00e9.jpg",
               os.fsdecode(b"/data/bad\xff.jpg"), "/data/tab\t.jpg", "/d/7.jpg", "/d/8.jpg"]  # fmt: skip
    writer = st.ShardWriter(tmp_path, 0, 64, image_size=(8, 8), run="0" * 32)
    records = []
    for j, source in enumerate(sources):
        described = {"dataset": "cub", "split": "test", "index": j} if j % 2 else None
        r = make_record(j, source, [100 + j, 10**18 + j], lists, j, names, "note: small" if j % 3 == 0 else None,
                        described)  # fmt: skip
        if j in (1, 2):
            r["figure"] = None if j == 1 else f"figures/{j:06d}_x.png"
        records.append(r)
    writer.add(part, records)
    writer.skip({"i": 8, "source": "/data/gone.jpg", "stat": None, "skipped": "no such file"})
    writer.skip({"i": 9, "source": "/data/bad.jpg", "stat": [1, 2], "dataset": "cub", "split": "test", "index": 9,
                 "skipped": 'cannot decode "bad.jpg"'})  # fmt: skip
    writer.flush(final=True)
    return (tmp_path / st.index_name(0)).read_text(encoding="utf-8", errors="surrogateescape").splitlines(True)


def _projection(r: dict | None) -> dict | None:
    """What a resume keeps of a parsed record (`store._bookkeeping`'s fields)."""
    if r is None:
        return None
    keys = ("i", "source", "stat", "skipped") if "skipped" in r else ("i", "source", "stat", "row", "shard", "digest",
                                                                      "figure")  # fmt: skip
    return {k: r[k] for k in keys if k in r}


def test_written_lines_take_the_fast_read_and_agree_with_the_parser(tmp_path):
    lines = _written_lines(tmp_path)
    assert len(lines) == 10
    for line in lines:
        assert st._LAID_OUT.fullmatch(line), line  # else a resume silently parses every line the slow way
        assert st._record(line) is not None
        assert st._bookkeeping(line) == _projection(st._record(line))
    kept = [st._bookkeeping(line) for line in lines]
    assert [r.get("figure", "absent") for r in kept[:3]] == ["absent", None, "figures/000002_x.png"]
    assert kept[4]["source"] == os.fsdecode(b"/data/bad\xff.jpg") and kept[1]["source"] == '/data/q"uote.jpg'
    assert kept[-2] == {"i": 8, "source": "/data/gone.jpg", "stat": None, "skipped": "no such file"}


@pytest.mark.parametrize("key, value", [
    ("confidence", "NaN"), ("difficulty", "1e999"), ("strength", "1" + "0" * 400 + ".0"), ("coverage", "-Infinity"),
    ("threshold", "Infinity"), ("share", "1.5"), ("share", "9e-0"), ("share", "-0.0"), ("share", "10e-1"),
    ("share", "1e-100"), ("a", "1.0"), ("b", "-0"), ("row", "true"), ("i", '"0"'), ("stat", "[1.5, 2]"),
    ("stat", "null"), ("stat", "[1, 2, 3]"), ("shard", '"\\u0073hard-00000-000000.safetensors"'),
    ("digest", '"CRC32:00000000"'), ("top", "[[[[1]]]]"), ("figure", "7"), ("source", "null"),
    ("skipped", "false"), ("prediction_name", "[]"),
])  # fmt: skip
def test_fast_read_agrees_with_the_parser_on_edited_values(tmp_path, key, value):
    """A value replaced in place (the line keeps its layout): the fast read either rejects the line as the parser
    does or hands it to the parser; never takes a non-finite number, a share outside [0, 1], a float where an int
    belongs or a nesting too deep at face value."""
    pattern = re.compile(rf'"{key}": (\[[^\]]*\]|"(?:[^"\\]|\\.)*"|[^,}}\]]+)')
    changed = 0
    for line in _written_lines(tmp_path):
        edited = pattern.sub(lambda m: f'"{key}": {value}', line, count=1)
        if edited != line:
            changed += 1
            assert st._bookkeeping(edited) == _projection(st._record(edited)), edited
    assert changed


def test_fast_read_agrees_with_the_parser_on_random_damage(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as hs

    lines = _written_lines(tmp_path)
    pieces = hs.sampled_from(list('0123456789eE-+."\\[]{},: nNulltrueIfa') + ["NaN", "null", "1e99", "1e999", '\\"'])

    @settings(max_examples=400, deadline=None, database=None)
    @given(hs.sampled_from(lines), hs.integers(0, 2000), hs.integers(0, 4), hs.lists(pieces, max_size=4))
    def check(line, at, cut, insert):
        at = at % len(line)
        damaged = line[:at] + "".join(insert) + line[at + cut :]
        assert st._bookkeeping(damaged) == _projection(st._record(damaged))

    check()


def test_seen_hashes_in_flat_memory_as_a_set():
    """`store._Seen` answers as a set does across its merges (small buffer: many merges)."""
    rng = np.random.default_rng(0)
    values = rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64).tolist()
    values += values[::7]  # repeats
    seen, reference = st._Seen(buffer=16), set()
    for h in values:
        assert (h in seen) == (h in reference)
        seen.add(h)
        reference.add(h)
    assert seen.array().tolist() == sorted(reference) and -(2**63) not in seen
