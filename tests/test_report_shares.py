"""The readable strength in the index (each insecurity's share, computed by the writer stage), the pairs page ranked
by it (and readable without it, for older folders), and `delib figures` streaming over the index in flat memory."""

import json

import numpy as np
import pytest

import delib_jax
from delib_jax import store as st
from delib_jax.cli import main
from delib_jax.insecurity import (
    ambiguity_shares,
    ambiguity_total,
    find_insecurities,
    region_shares,
    strength_shares,
)
from delib_jax.report import pair_statistics, render_pairs
from delib_jax.stream import FIGURE_INDEX, drawn_figures, write_pages
from delib_jax.testing.store import NAMES, synthetic_folder


def _records(out):
    return list(st.read_records(out))


def _strip_shares(out):
    """Make ``out`` a folder written before the index held shares (the shards are untouched)."""
    for path in st.index_files(out):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for r in records:
            for q in r.get("insecurities", ()):
                q.pop("share", None)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_region_shares_of_a_batch_are_each_images_shares():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((3, 4, 5, 6))  # (B, N, H, W)
    difficulty = rng.random((3, 5, 6))
    slots = np.asarray([[[0, 1], [2, 3]], [[1, 3], [0, 2]], [[0, 3], [1, 2]]])
    masks = rng.random((3, 2, 20, 24)) < 0.2
    batch = region_shares(maps, difficulty, slots, masks)
    for b in range(3):
        np.testing.assert_allclose(batch[b], ambiguity_shares(maps[b], difficulty[b], slots[b], masks[b]))
    assert np.all((batch >= 0) & (batch <= 1))
    assert np.all(region_shares(np.zeros_like(maps), difficulty, slots, masks) == 0)  # no ambiguity at all


@pytest.mark.parametrize("image_size", [(24, 24), (40, 56)])
def test_shares_from_strength_and_coverage_equal_those_from_the_masks(image_size):
    """The writer's fast path (a region's ambiguity = strength x area) against the masks, on `find_insecurities`."""
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((3, 5, 6, 7)).astype(np.float32)
    difficulty = rng.random((3, 6, 7), dtype=np.float32)
    found = find_insecurities(maps, difficulty, image_size=image_size, k=3, coverage=0.1, max_insecurities=4)
    total = ambiguity_total(maps, difficulty, image_size)
    fast = strength_shares(np.asarray(found.strength), np.asarray(found.coverage), total, image_size)
    exact = region_shares(maps, difficulty, np.asarray(found.slots), np.asarray(found.masks))
    valid = np.asarray(found.valid)
    assert valid.sum() >= 6
    np.testing.assert_allclose(fast[valid], exact[valid], rtol=1e-5, atol=1e-7)
    assert np.all(fast[~valid] == 0)  # padding: no region


def test_records_hold_the_share_the_explanation_computes(tmp_path):
    out = tmp_path / "out"
    synthetic_folder(out, images=10)
    records = _records(out)
    explanations = list(delib_jax.load_explanations(out))
    assert sum(len(r["insecurities"]) for r in records) > 10
    for r, e in zip(records, explanations):
        stored = [q["share"] for q in r["insecurities"]]
        np.testing.assert_allclose(stored, e.shares, rtol=1e-5, atol=1e-6)
        assert [q["strength"] for q in r["insecurities"]] == [float(q.strength) for q in e.insecurities]  # raw kept
    assert st.verify_folder(out).problems == []


@pytest.mark.parametrize("share", [1.5, -0.1, "0.2", True, None])
def test_a_record_with_a_bad_share_is_not_served(tmp_path, share):
    out = tmp_path / "out"
    synthetic_folder(out, images=4)
    path = st.index_files(out)[0]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["insecurities"][0]["share"] = share
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(_records(out)) == 3
    assert len(st.verify_folder(out).problems) == 1


def test_a_folder_without_shares_loads_verifies_and_renders(tmp_path):
    out = tmp_path / "out"
    synthetic_folder(out, images=12)
    _strip_shares(out)
    records = _records(out)
    assert len(records) == 12 and all("share" not in q for r in records for q in r["insecurities"])
    assert len(list(delib_jax.load_explanations(out))) == 12 and st.verify_folder(out).problems == []
    rows = pair_statistics(iter(records))
    assert rows and all(p["run_share"] is None and p["share_mean"] is None for p in rows)
    assert [p["images"] for p in rows] == sorted((p["images"] for p in rows), reverse=True)  # ranked by images
    manifest = st.read_manifest(out)
    assert write_pages(out, manifest, report=lambda m: None) == 12
    page = (out / "pairs.html").read_text()
    assert "Shares unavailable" in page and page.count(">unavailable<") == len(rows)
    index = (out / "index.html").read_text()
    assert "of the ambiguity" in index  # the index's rows: shares computed from the stored maps instead


def test_pairs_are_ranked_by_their_part_of_the_runs_ambiguity():
    def record(i, shares):
        return {"i": i, "source": f"/d/{i}.jpg", "top": [[0, 0.4], [1, 0.3], [2, 0.3]],
                "insecurities": [{"a": a, "b": b, "name_a": NAMES[a], "name_b": NAMES[b], "coverage": 0.1,
                                  "share": s} for (a, b), s in shares.items()]}  # fmt: skip

    # (0, 1) competes in 3 images with small shares, (1, 2) in 2 with large ones, (0, 2) in 1
    records = [record(0, {(0, 1): 0.05, (1, 2): 0.6}), record(1, {(0, 1): 0.1, (2, 1): 0.4}),
               record(2, {(0, 1): 0.03, (0, 2): 0.1}), record(3, {})]  # fmt: skip
    rows = pair_statistics(iter(records))
    assert [(p["a"], p["b"]) for p in rows] == [(1, 2), (0, 1), (0, 2)]
    first = rows[0]
    assert first["run_share"] == pytest.approx(1.0 / 4) and first["share_mean"] == pytest.approx(0.5)
    assert first["share_max"] == pytest.approx(0.6) and first["images"] == 2
    assert [x[3] for x in first["examples"]] == [0.6, 0.4]  # each example with its record's share
    page = render_pairs(rows, total=4)
    assert "part of the run's ambiguity" in page and "25%<br>" in page and "50% per image<br>at most 60%" in page
    assert "Shares unavailable" not in page
    # a folder resumed across the change: the shares of the records that hold them
    mixed = pair_statistics(iter([*records, {**record(4, {}), "insecurities": [
        {"a": 0, "b": 1, "name_a": "sparrow", "name_b": "wren", "coverage": 0.1}]}]))  # fmt: skip
    by_pair = {(p["a"], p["b"]): p for p in mixed}
    assert by_pair[(0, 1)]["images"] == 4 and by_pair[(0, 1)]["share_mean"] == pytest.approx(0.06)


class _Tracked(dict):
    """An index record that counts how many records are alive at once."""

    live = peak = 0

    def __init__(self, *args):
        super().__init__(*args)
        _Tracked.live += 1
        _Tracked.peak = max(_Tracked.peak, _Tracked.live)

    def __del__(self):
        _Tracked.live -= 1


@pytest.fixture
def tracked(monkeypatch):
    """Every record the store reads is a `_Tracked`; figures are written as a few bytes, the pages not at all
    (their own limit of 1,000 rows would hold these records): what is measured is `delib figures` alone."""
    read = st._record
    monkeypatch.setattr(st, "_record", lambda line: None if (r := read(line)) is None else _Tracked(r))
    monkeypatch.setattr("delib_jax.stream.write_pages", lambda *a, **k: 0)

    def render(explanation, source, resize, crop, path, examples):
        with open(path, "wb") as f:
            f.write(b"\x89PNG fake " + source.encode())

    monkeypatch.setattr("delib_jax.job.writing.render_figure", render)
    _Tracked.live = _Tracked.peak = 0
    return _Tracked


def test_figures_of_every_image_stream_over_the_index(tmp_path, tracked, capsys):
    out = tmp_path / "out"
    synthetic_folder(out, images=300, shard_size=32)
    assert main(["figures", str(out), "--no-progress", "--workers", "0"]) == 0
    assert "drew 300 figures (0 already there, 0 failed)" in capsys.readouterr().err
    assert tracked.peak <= 8, f"{tracked.peak} records held at once"  # the list of all of them: 300
    lines = (out / FIGURE_INDEX).read_text().splitlines()
    assert len(lines) == 300 and len(drawn_figures(out)) == 300
    # resumable: figures lost by a killed run are drawn again, the others kept
    figures = drawn_figures(out)
    for source in [f"/data/img_{i:06d}.jpg" for i in (3, 150, 299)]:
        (out / figures[source]).unlink()
    tracked.peak = tracked.live
    assert main(["figures", str(out), "--no-progress", "--workers", "0"]) == 0
    assert "drew 3 figures (297 already there, 0 failed)" in capsys.readouterr().err
    assert tracked.peak <= tracked.live + 8 and len(drawn_figures(out)) == 300


def test_figures_of_chosen_images_hold_only_those(tmp_path, tracked, capsys):
    out = tmp_path / "out"
    synthetic_folder(out, images=200, shard_size=32)
    assert main(["figures", str(out), "--hardest", "5", "--no-progress", "--workers", "0"]) == 0
    assert "drew 5 figures (0 already there" in capsys.readouterr().err and tracked.peak <= 8
    hardest = sorted(_records(out), key=lambda r: (-r["difficulty"], r["i"]))[:5]
    assert set(drawn_figures(out)) == {r["source"] for r in hardest}
    given = ["/data/img_000007.jpg", "/data/img_000190.jpg", "/data/none.jpg"]
    tracked.peak = tracked.live
    assert main(["figures", str(out), "--images", *given, "--no-progress", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "none.jpg is not among the explained images" in err and tracked.peak <= tracked.live + 8
    assert set(given[:2]) <= set(drawn_figures(out))
