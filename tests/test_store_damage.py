"""Every class of damage at every layer of an output folder (file, header, metadata, each tensor, packed masks,
index record, manifest, folder structure), seen three ways that must agree: what `load_explanations(...,
skip_damaged=True)` serves and reports, what `delib verify` prints and its exit code, and what a resume explains
again; afterwards the folder verifies clean and serves what an uninterrupted run serves. The resume is the job's
own (`delib_jax.job.folder.prepare_folder`, `plan_resume`, `store.ShardWriter`) with a stand-in for the model
(`delib_jax.testing.store.synthetic_job`); the last tests run it with the small model (`delib_jax.stream`)."""

import json
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from delib_jax import store as st
from delib_jax.cli import main
from delib_jax.job.folder import JobError
from delib_jax.testing.store import input_files, stored, synthetic_job

# 10 inputs, the 4th unreadable (a skip record); shards of 4: shard 0 holds images 0, 1, 2, 4; shard 1 images 5-8;
# shard 2 image 9. Index lines: 1-3 images 0-2, 4 the skipped image 3, 5-10 images 4-9.
IMAGES, BROKEN = 10, (3,)
EXPLAINED = {i for i in range(IMAGES) if i not in BROKEN}
SHARD1 = {5, 6, 7, 8}
LINE_OF = {i: i + 1 for i in range(IMAGES)}  # image i is on line i + 1


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    files = input_files(root / "in", images=IMAGES, broken=BROKEN)
    out = root / "clean"
    synthetic_job(out, files)
    other = root / "other"  # the same inputs, another run (another folder)
    synthetic_job(other, files)
    return files, out, stored(out), other


def _copy(clean, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(clean[1], out, symlinks=True)
    return out


def _source(files, i) -> str:
    return str(files[i])


def _shard(out, k) -> Path:
    return out / "explanations" / st.shard_name(0, k)


def _index(out) -> Path:
    return out / "explanations" / st.index_name(0)


def _lines(out) -> list[str]:
    return _index(out).read_text().splitlines()


def _write_lines(out, lines) -> None:
    _index(out).write_text("".join(line + "\n" for line in lines))


def _edit_record(out, i, edit) -> None:
    lines = _lines(out)
    r = json.loads(lines[LINE_OF[i] - 1])
    edit(r)
    lines[LINE_OF[i] - 1] = json.dumps(r)
    _write_lines(out, lines)


def _fix_digest(out, before: bytes, path: Path) -> None:
    """What a colleague's script or a bad copy does: the records of a changed shard get its new digest."""
    old, new = st.content_digest(before), st.content_digest(path.read_bytes())
    _write_lines(out, [line.replace(old, new) for line in _lines(out)])


def _parts(path: Path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    parts = {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
    return header, parts


def _assemble(path: Path, header, parts, out=None) -> None:
    """Write a shard from a header and its arrays' bytes (offsets laid out anew); with ``out``, its records get the
    new digest."""
    before = path.read_bytes()
    at = 0
    for k, part in parts.items():
        header[k]["data_offsets"] = [at, at + len(part)]
        at += len(part)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(parts.values()))
    if out is not None:
        _fix_digest(out, before, path)


def _replace_array(out, k, name, data_of) -> None:
    """Array ``name`` of shard ``k`` replaced in place (the header untouched), its records' digests fixed up."""
    path = _shard(out, k)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    lo, hi = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    new = data_of(hi - lo)
    assert len(new) == hi - lo
    path.write_bytes(data[: 8 + n + lo] + new + data[8 + n + hi :])
    _fix_digest(out, data, path)


def _random(size, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _change_header(change):
    def damage(out, files, other):
        path = _shard(out, 1)
        header, parts = _parts(path)
        change(header, parts)
        _assemble(path, header, parts, out)

    return damage


def _masks(make):
    def damage(out, files, other):
        path = _shard(out, 1)
        header, parts = _parts(path)
        parts["masks_deflated"] = make(parts["masks_deflated"])
        header["masks_deflated"]["shape"] = [len(parts["masks_deflated"])]
        _assemble(path, header, parts, out)

    return damage


def _bomb(_):
    z = zlib.compressobj(9)
    return b"".join(z.compress(bytes(1 << 20)) for _ in range(64)) + z.flush()  # 64 MB of zeros from 64 KB


def _other_size(_):
    rng = np.random.default_rng(1)
    return zlib.compress(st.pack_bits(rng.random((4, 3, 16, 16)) < 0.2).tobytes(), 1)  # masks of 16 px, not 32


def _copy_from_other(out, files, other):
    shutil.copy(_shard(other, 1), _shard(out, 1))


def _copied_over(out, files, other):
    """Shard 0 copied over shard 1, and shard 1's records given its digest."""
    before = _shard(out, 1).read_bytes()
    shutil.copy(_shard(out, 0), _shard(out, 1))
    _fix_digest(out, before, _shard(out, 1))


def _symlinked(out, files, other):
    outside = out.parent / "elsewhere.safetensors"
    shutil.copy(_shard(out, 1), outside)
    _shard(out, 1).unlink()
    _shard(out, 1).symlink_to(outside)


def _a_folder(k):
    def damage(out, files, other):
        _shard(out, k).unlink()
        _shard(out, k).mkdir()

    return damage


# (damage, the images whose entries the reader refuses, the file named, images a resume explains besides those)
SHARD_CLASSES = {
    # the file
    "shard cut short": (lambda out, f, o: _shard(out, 1).write_bytes(_shard(out, 1).read_bytes()[:1000]), SHARD1),
    "shard empty": (lambda out, f, o: _shard(out, 1).write_bytes(b""), SHARD1),
    "shard deleted": (lambda out, f, o: _shard(out, 1).unlink(), SHARD1),
    "shard random bytes": (
        lambda out, f, o: _shard(out, 1).write_bytes(_random(_shard(out, 1).stat().st_size)),
        SHARD1,
    ),
    "shard last bytes flipped": (
        lambda out, f, o: _shard(out, 1).write_bytes(
            _shard(out, 1).read_bytes()[:-10] + bytes(b ^ 0xFF for b in _shard(out, 1).read_bytes()[-10:])
        ),
        SHARD1,
    ),
    "shard a symbolic link": (_symlinked, SHARD1),
    "shard a folder": (_a_folder(1), SHARD1),
    "last shard a folder": (_a_folder(2), {9}),
    # the header (records' digests fixed up, so that the check under test is reached)
    "header size beyond the file": (
        lambda out, f, o: _shard(out, 1).write_bytes(struct.pack("<Q", 1 << 50) + _shard(out, 1).read_bytes()[8:]),
        SHARD1,
    ),
    "header not JSON": (
        lambda out, f, o: _shard(out, 1).write_bytes(
            _shard(out, 1).read_bytes()[:8] + b"x" + _shard(out, 1).read_bytes()[9:]
        ),
        SHARD1,
    ),
    "header dtype": (_change_header(lambda h, p: h["probs"].update(dtype="F64")), SHARD1),
    "header shape": (_change_header(lambda h, p: h["maps"].update(shape=[4, 5, 2, 8])), SHARD1),
    "header array missing": (_change_header(lambda h, p: (h.pop("valid"), p.pop("valid"))), SHARD1),
    "header array added": (
        _change_header(lambda h, p: (h.update(extra={"dtype": "U8", "shape": [3]}), p.update(extra=b"abc"))),
        SHARD1,
    ),
    "header offsets beyond the file": (lambda out, f, o: _offsets_beyond(out), SHARD1),
    # the metadata
    "metadata of another run": (_copy_from_other, SHARD1),
    "metadata of another name": (_copied_over, SHARD1),
    "metadata rows": (_change_header(lambda h, p: h["__metadata__"].update(rows="[]")), SHARD1),
    "metadata rows of other images": (
        _change_header(
            lambda h, p: h["__metadata__"].update(rows=h["__metadata__"]["rows"].replace("img_000005", "img_000001"))
        ),
        SHARD1,
    ),
    "metadata format": (_change_header(lambda h, p: h["__metadata__"].pop("format")), SHARD1),
    # the packed masks (digests fixed up)
    "masks inflating to 64 MB": (_masks(_bomb), SHARD1),
    "masks packed for another size": (_masks(_other_size), SHARD1),
    "masks random bytes": (lambda out, f, o: _replace_array(out, 1, "masks_deflated", _random), SHARD1),
    "masks with bytes after the stream": (_masks(lambda m: m + b"\x00\x01"), SHARD1),
}
# each tensor: random bytes of its length, digests fixed up
for _name in ("probs", "difficulty", "classes", "maps", "grad_cam", "pairs", "strength", "coverage", "threshold",
              "valid"):  # fmt: skip
    SHARD_CLASSES[f"tensor {_name} random bytes"] = (
        lambda out, f, o, name=_name: _replace_array(out, 1, name, lambda n: _random(n, seed=len(name))),
        SHARD1,
    )
    SHARD_CLASSES[f"tensor {_name} zeroed"] = (
        lambda out, f, o, name=_name: _replace_array(out, 1, name, lambda n: bytes(n)),
        SHARD1,
    )


def _offsets_beyond(out):
    path = _shard(out, 1)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["probs"]["data_offsets"] = [0, 1 << 40]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    _fix_digest(out, data, path)


def _digest_of_another(out, files, other):
    _edit_record(out, 6, lambda r: r.update(digest="crc32:00000000"))


RECORD_CLASSES = {  # (damage, refused images, whether the index is named (else the shard), images redone besides)
    "record not JSON": (
        lambda out, f, o: _write_lines(out, [*_lines(out)[:6], "{not json", *_lines(out)[7:]]),
        {6},
        set(),
    ),
    "record torn (last line cut)": (
        lambda out, f, o: _index(out).write_bytes(_index(out).read_bytes()[:-40]),
        {9},
        set(),
    ),
    "record row out of range": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(row=9)), {6}, set()),
    "record row negative": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(row=-1)), {6}, set()),
    "record row of another image": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(row=2)), {6}, set()),
    "record source of another input": (
        lambda out, f, o: _edit_record(
            out, 6, lambda r: r.update(source=r["source"].replace("img_000006", "img_000007"))
        ),
        {6},
        set(),
    ),
    "record stat": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(stat=[1, 2])), {6}, set()),
    "record digest": (_digest_of_another, {6}, set()),
    "record names another shard": (
        lambda out, f, o: _edit_record(out, 6, lambda r: r.update(shard=st.shard_name(0, 0))),
        {6},
        set(),
    ),
    "record confidence": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(confidence=0.123)), {6}, set()),
    "record difficulty": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(difficulty=0.5)), {6}, set()),
    "record prediction": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(prediction=3)), {6}, set()),
    "record class name": (
        lambda out, f, o: _edit_record(out, 6, lambda r: r["insecurities"][0].update(name_a="crow")),
        {6},
        set(),
    ),
    "record strength": (
        lambda out, f, o: _edit_record(out, 6, lambda r: r["insecurities"][0].update(strength=0.25)),
        {6},
        set(),
    ),
    "record share": (
        lambda out, f, o: _edit_record(out, 6, lambda r: r["insecurities"][0].update(share=0.5)),
        {6},
        set(),
    ),
    "record insecurity dropped": (
        lambda out, f, o: _edit_record(out, 6, lambda r: r["insecurities"].pop()),
        {6},
        set(),
    ),
    "record note added": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(note="hello")), {6}, set()),
    "record ordinal": (lambda out, f, o: _edit_record(out, 6, lambda r: r.update(i=60)), {6}, set()),
    "record duplicated": (lambda out, f, o: _write_lines(out, [*_lines(out), _lines(out)[6]]), set(), set()),
    "record planted": (
        lambda out, f, o: _write_lines(
            out, [*_lines(out), json.dumps({**json.loads(_lines(out)[6]), "source": "/elsewhere/x.jpg", "i": 99})]
        ),
        set(),
        set(),
    ),
    "record deleted": (lambda out, f, o: _write_lines(out, [*_lines(out)[:6], *_lines(out)[7:]]), set(), {6}),
    "index emptied": (lambda out, f, o: _index(out).write_bytes(b""), set(), EXPLAINED),
    "index deleted": (lambda out, f, o: _index(out).unlink(), set(), EXPLAINED),
}


def _served(out):
    """What the reader serves with skip_damaged (source -> (record content, explanation digest)) and its reports."""
    from delib_jax.testing.store import explanation_digest

    damaged: list[st.StoreDamage] = []
    served = {}
    for r, e in st.iter_explanations(out, skip_damaged=True, on_damage=damaged.append):
        content = {k: v for k, v in r.items() if k not in ("row", "shard", "digest", "figure")}
        served[r["source"]] = (json.dumps(content, sort_keys=True), explanation_digest(e))
    return served, damaged


def _verify(out, capsys):
    code = main(["verify", str(out)])
    return code, capsys.readouterr().out


def _agree(out, files, clean, refused, named, capsys, *, redone=frozenset()):
    """The three views of a damaged folder agree, and one resume restores it. ``refused``: the images whose entries
    the reader refuses; ``redone``: those it does not serve because no record names them (which the resume explains
    again too)."""
    expected = clean[2]
    served, damaged = _served(out)
    for source, value in served.items():  # nothing served differs from the uninterrupted run
        assert value == expected["explained"][source], source
    assert set(expected["explained"]) - set(served) == {_source(files, i) for i in refused | set(redone)}
    assert len(damaged) >= len(refused)
    code, text = _verify(out, capsys)
    if not damaged:
        assert code == 0 and "clean" in text, text
    else:
        assert code == 1 and "DAMAGED" in text, text
        assert all(named in str(d) for d in damaged), [str(d) for d in damaged]
        assert f"{len(damaged)} record(s) cannot be served" in text.splitlines()[-1], text
        for d in damaged:  # the same judgement, word for word
            assert str(d) in text, (str(d), text)
        verdict = st.verify_folder(out)
        assert verdict.refused == len(damaged) and verdict.served == len(served)
    messages: list[str] = []
    summary = synthetic_job(out, files, report=messages.append)
    again = {_source(files, i) for i in refused | set(redone)}
    assert set(summary.explained_sources) == again, messages
    if damaged:
        assert any(named in m for m in messages), messages
    assert _verify(out, capsys)[0] == 0
    assert stored(out) == expected


@pytest.mark.parametrize("name", list(SHARD_CLASSES))
def test_shard_damage_three_views_agree_and_one_resume_repairs(clean, tmp_path, capsys, name):
    damage, refused = SHARD_CLASSES[name]
    out = _copy(clean, tmp_path)
    damage(out, clean[0], clean[3])
    shard = st.shard_name(0, 2 if name == "last shard a folder" else 1)
    _agree(out, clean[0], clean, refused, shard, capsys)


@pytest.mark.parametrize("name", list(RECORD_CLASSES))
def test_record_damage_three_views_agree_and_one_resume_repairs(clean, tmp_path, capsys, name):
    damage, refused, redone = RECORD_CLASSES[name]
    out = _copy(clean, tmp_path)
    damage(out, clean[0], clean[3])
    _agree(out, clean[0], clean, refused, st.index_name(0), capsys, redone=redone)


def test_damaged_masks_with_a_fixed_up_digest_are_explained_again(clean, tmp_path, capsys):
    """Issue 33, 1: the reader refuses them, verify flags them, and so the resume explains them again."""
    out = _copy(clean, tmp_path)
    _replace_array(out, 1, "masks_deflated", _random)
    with pytest.raises(st.StoreDamage, match="shard-00000-000001"):
        list(st.load_explanations(out))
    assert _verify(out, capsys)[0] == 1
    messages: list[str] = []
    summary = synthetic_job(out, clean[0], report=messages.append)
    assert sorted(summary.explained_sources) == sorted(_source(clean[0], i) for i in SHARD1), messages
    assert _verify(out, capsys)[0] == 0 and stored(out) == clean[2]


def test_a_wrong_digest_in_one_record_is_that_record(clean, tmp_path, capsys):
    """Issue 33, 3: verify and the reader count the same one record and say the record is wrong, not the shard."""
    out = _copy(clean, tmp_path)
    _digest_of_another(out, None, None)
    damaged: list[st.StoreDamage] = []
    served = list(st.load_explanations(out, skip_damaged=True, on_damage=damaged.append))
    assert len(served) == len(EXPLAINED) - 1 and len(damaged) == 1
    (d,) = damaged
    assert d.path == _index(out) and "line 7" in d.problem and "the record" in d.problem and "intact" in d.problem
    code, text = _verify(out, capsys)
    assert code == 1 and "1 record(s) cannot be served" in text and str(d) in text, text
    assert "4 record(s)" not in text


# ---------------------------------------------------------------------------------------------- the manifest


def _manifest_text(out, edit):
    path = out / st.MANIFEST
    path.write_text(edit(path.read_text()))


MANIFEST_CLASSES = {
    "manifest not JSON": lambda out: _manifest_text(out, lambda t: t[:-5]),
    "manifest random bytes": lambda out: (out / st.MANIFEST).write_bytes(_random(300)),
    "manifest setting changed": lambda out: _manifest_text(out, lambda t: t.replace('"crop": 32', '"crop": 31')),
    "manifest run id changed": lambda out: _manifest_text(out, lambda t: re.sub(r'"run": "[0-9a-f]', '"run": "x', t)),
    "manifest class name changed": lambda out: _manifest_text(out, lambda t: t.replace("sparrow", "sparrox")),
}


@pytest.mark.parametrize("name", list(MANIFEST_CLASSES))
def test_manifest_damage_is_named_and_one_resume_repairs(clean, tmp_path, capsys, name):
    """A damaged manifest: nothing can be served (the reader raises, with skip_damaged too), verify names it and
    exits 1; a resume writes it anew (a new run: every stored result is foreign) and explains everything again."""
    out = _copy(clean, tmp_path)
    MANIFEST_CLASSES[name](out)
    with pytest.raises(st.StoreDamage, match="manifest.json"):
        list(st.load_explanations(out, skip_damaged=True, on_damage=lambda d: None))
    code, text = _verify(out, capsys)
    assert code == 1 and "manifest.json" in text, text
    messages: list[str] = []
    summary = synthetic_job(out, clean[0], report=messages.append)
    assert set(summary.explained_sources) == {_source(clean[0], i) for i in EXPLAINED}, messages
    assert any("manifest.json" in m for m in messages), messages
    assert _verify(out, capsys)[0] == 0 and stored(out) == clean[2]


def test_manifest_deleted_makes_everything_foreign(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    (out / st.MANIFEST).unlink()
    with pytest.raises(FileNotFoundError):
        list(st.load_explanations(out, skip_damaged=True))
    assert _verify(out, capsys)[0] == 2
    summary = synthetic_job(out, clean[0])
    assert set(summary.explained_sources) == {_source(clean[0], i) for i in EXPLAINED}
    assert _verify(out, capsys)[0] == 0 and stored(out) == clean[2]


# ---------------------------------------------------------------------------------------------- the folder


def _explanations_a_file(out):
    shutil.rmtree(out / "explanations")
    (out / "explanations").write_text("not a folder")


def _explanations_linked_out(out):
    shutil.move(out / "explanations", out.parent / "moved")
    (out / "explanations").symlink_to(out.parent / "moved")


def _index_a_folder(out):
    _index(out).unlink()
    _index(out).mkdir()


def _index_linked(out):
    shutil.move(_index(out), out.parent / "index.jsonl")
    _index(out).symlink_to(out.parent / "index.jsonl")


def _manifest_a_folder(out):
    (out / st.MANIFEST).unlink()
    (out / st.MANIFEST).mkdir()


STRUCTURE_CLASSES = {  # (damage, the path in the way, how to clear it, whether nothing at all can be served)
    "explanations a file": (_explanations_a_file, "explanations", lambda out: (out / "explanations").unlink(), True),
    "explanations a link out of OUT": (
        _explanations_linked_out,
        "explanations",
        lambda out: (out / "explanations").unlink(),
        True,
    ),
    "index a folder": (_index_a_folder, st.index_name(0), lambda out: _index(out).rmdir(), False),
    "index a link": (_index_linked, st.index_name(0), lambda out: _index(out).unlink(), False),
    "manifest a folder": (_manifest_a_folder, st.MANIFEST, lambda out: (out / st.MANIFEST).rmdir(), True),
}


@pytest.mark.parametrize("name", list(STRUCTURE_CLASSES))
def test_a_folder_that_is_not_what_it_seems_is_damage_named(clean, tmp_path, capsys, name):
    """Issue 33, 2: never a clean empty folder: the reader raises `StoreDamage` naming what is wrong (with
    skip_damaged too when nothing can be served; else it reports the index file it cannot read), verify names it
    and exits 1, the resume says what is in the way (and repairs once it is cleared)."""
    damage, named, clear, whole = STRUCTURE_CLASSES[name]
    out = _copy(clean, tmp_path)
    damage(out)
    with pytest.raises(st.StoreDamage, match=re.escape(named)):
        list(st.load_explanations(out))
    if whole:
        with pytest.raises(st.StoreDamage, match=re.escape(named)):
            list(st.load_explanations(out, skip_damaged=True, on_damage=lambda d: None))
    else:
        damaged: list = []
        assert not list(st.load_explanations(out, skip_damaged=True, on_damage=damaged.append))
        assert len(damaged) == 1 and damaged[0].path.name == named
    code, text = _verify(out, capsys)
    assert code == 1 and named in text and "clean" not in text, text
    with pytest.raises(JobError, match=re.escape(named)):
        synthetic_job(out, clean[0])
    clear(out)
    synthetic_job(out, clean[0])
    assert _verify(out, capsys)[0] == 0 and stored(out) == clean[2]


def test_explanations_folder_missing_is_damage_and_the_resume_repairs(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    shutil.rmtree(out / "explanations")
    with pytest.raises(st.StoreDamage, match="explanations"):
        list(st.load_explanations(out, skip_damaged=True, on_damage=lambda d: None))
    code, text = _verify(out, capsys)
    assert code == 1 and "missing" in text, text
    summary = synthetic_job(out, clean[0])
    assert set(summary.explained_sources) == {_source(clean[0], i) for i in EXPLAINED}
    assert _verify(out, capsys)[0] == 0 and stored(out) == clean[2]


def test_explanations_folder_unreadable_is_damage_named(clean, tmp_path, capsys, monkeypatch):
    """A folder that cannot be listed (simulated: the tests may run as root, whom permissions do not stop)."""
    out = _copy(clean, tmp_path)
    directory = out / "explanations"
    scandir, listdir = os.scandir, os.listdir

    def refused(real):
        def call(path=".", *args):
            if os.fspath(path) == os.fspath(directory):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args)

        return call

    monkeypatch.setattr(os, "scandir", refused(scandir))
    monkeypatch.setattr(os, "listdir", refused(listdir))
    with pytest.raises(st.StoreDamage, match="explanations.*cannot be read"):
        list(st.load_explanations(out, skip_damaged=True, on_damage=lambda d: None))
    code, text = _verify(out, capsys)
    assert code == 1 and "cannot be read" in text, text
    with pytest.raises(JobError, match="explanations"):
        synthetic_job(out, clean[0])


# ---------------------------------------------------------------------------------------------- random damage


def test_random_damage_three_views_agree_and_one_resume_repairs(clean):
    """A random byte range of a random file of the folder overwritten, or the file cut short or deleted: nothing
    served differs from the clean run, verify flags exactly what the reader refuses (the same judgement, word for
    word), and one resume restores a folder that verifies clean and serves what the clean run serves."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    files, clean_out, expected, _ = clean
    names = sorted(str(p.relative_to(clean_out)) for p in clean_out.rglob("*") if p.is_file() and
                   not p.name.startswith(".lock"))  # fmt: skip

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(hs.sampled_from(names), hs.sampled_from(["overwrite", "truncate", "delete"]), hs.integers(0, 1 << 20),
           hs.integers(1, 64), hs.binary(min_size=1, max_size=64))  # fmt: skip
    def check(name, how, at, length, data):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "out"
            shutil.copytree(clean_out, out, symlinks=True)
            path = out / name
            content = path.read_bytes()
            at = at % max(1, len(content))
            if how == "overwrite":
                path.write_bytes(content[:at] + (data * length)[:length] + content[at + length :])
            elif how == "truncate":
                path.write_bytes(content[:at])
            else:
                path.unlink()
            try:
                served, damaged = _served(out)
                whole = None
            except (st.StoreDamage, FileNotFoundError) as e:  # the manifest: nothing can be served
                served, damaged, whole = {}, [], e
            for source, value in served.items():
                assert value == expected["explained"][source], source
            try:
                verdict = st.verify_folder(out)
            except FileNotFoundError:
                assert isinstance(whole, FileNotFoundError)
            else:
                if whole is not None:
                    assert verdict.problems and str(whole) in verdict.problems[0]
                else:
                    refusals: list[st.StoreDamage] = []
                    verdict = st.verify_folder(out, on_damage=refusals.append)
                    assert verdict.refused == len(damaged) and verdict.served == len(served)
                    assert sorted(map(str, damaged)) == sorted(map(str, refusals)), (verdict, damaged)
                    assert bool(verdict.problems) == bool(damaged)
            synthetic_job(out, files)
            verdict = st.verify_folder(out)
            assert not verdict.problems, verdict
            assert stored(out) == expected

    check()


def test_a_manifest_whose_seal_or_run_id_is_blanked_is_repaired_by_one_resume(clean):
    """Spaces over the manifest's seal or run id (what the property test found on CI): the manifest may still parse,
    without its seal, with a key renamed or the run id gone. That is damage, not another model: one resume writes
    the manifest anew, explains everything again, and the folder verifies clean and serves the clean run."""
    files, clean_out, expected, _ = clean
    content = (clean_out / st.MANIFEST).read_bytes()
    for key in (b'"check"', b'"run"'):
        for shift in range(-6, 7, 3):
            at = content.find(key) + shift
            with tempfile.TemporaryDirectory() as d:
                out = Path(d) / "out"
                shutil.copytree(clean_out, out, symlinks=True)
                (out / st.MANIFEST).write_bytes(content[:at] + b" " * 44 + content[at + 44 :])
                synthetic_job(out, files)
                verdict = st.verify_folder(out)
                assert not verdict.problems, (key, shift, verdict)
                assert stored(out) == expected, (key, shift)


# ---------------------------------------------------------------------------------------------- the real job


@pytest.mark.slow
def test_the_job_explains_again_what_the_reader_refuses(tmp_path, capsys):
    """`delib_jax.stream.explain_files` with the small model: masks that inflate to 64 MB, masks of another size and
    random mask bytes (digests fixed up), a record's digest and a record's confidence changed: one resume explains
    exactly those images again and gives the uninterrupted run's folder; a folder whose explanations are a file is
    refused naming it."""
    from flax import nnx
    from PIL import Image
    from test_stream import NAMES, OPTIONS, _config

    from delib_jax.checkpoint import build_model
    from delib_jax.stream import JobOptions, explain_files

    config = _config()
    model = build_model(config, rngs=nnx.Rngs(3))
    model.eval()
    rng = np.random.default_rng(0)
    files = []
    for i in range(10):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (50 + 3 * i, 60, 3), dtype=np.uint8)).save(files[-1])
    messages: list[str] = []

    def job(out):
        options = JobOptions(batch_size=2, workers=0, progress=False, shard_size=2)
        return explain_files(model, config, files, out, options=options, report=messages.append, **OPTIONS)

    out = tmp_path / "out"
    job(out)
    expected = stored(out)
    assert len(expected["explained"]) == 10 and len(NAMES) == 4
    for k, make in ((0, _bomb), (1, lambda m: zlib.compress(st.pack_bits(np.ones((2, 3, 24, 24), bool)).tobytes())),
                    (2, lambda m: _random(len(m)))):  # fmt: skip
        path = _shard(out, k)
        header, parts = _parts(path)
        parts["masks_deflated"] = make(parts["masks_deflated"])
        header["masks_deflated"]["shape"] = [len(parts["masks_deflated"])]
        _assemble(path, header, parts, out)
    lines = _lines(out)
    r = json.loads(lines[7])
    lines[7] = json.dumps({**r, "digest": "crc32:00000000"})
    r = json.loads(lines[9])
    lines[9] = json.dumps({**r, "confidence": r["confidence"] / 2})
    _write_lines(out, lines)
    damaged: list = []
    served = list(st.load_explanations(out, skip_damaged=True, on_damage=damaged.append))
    assert len(served) == 2 and len(damaged) == 8
    assert _verify(out, capsys)[0] == 1
    messages.clear()
    summary = job(out)
    assert summary.explained == 8 and summary.resumed == 2, messages
    assert sum("explaining its 2 image(s) again" in m for m in messages) == 3, messages
    assert _verify(out, capsys)[0] == 0 and stored(out) == expected
    # the explanations folder replaced by a file: refused, named
    shutil.rmtree(out / "explanations")
    (out / "explanations").write_text("")
    with pytest.raises(JobError, match=re.escape(str(out / "explanations"))):
        job(out)
