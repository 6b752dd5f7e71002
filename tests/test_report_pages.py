"""The report of large runs (index.html with thumbnails and skipped files, pairs.html from one streaming pass),
`delib figures` (figures drawn later, resumable), and the pages checked in a real browser (headless Chromium)."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from delib_jax import store as st
from delib_jax.checkpoint import RunConfig, build_model
from delib_jax.cli import main
from delib_jax.report import common_root, pair_statistics, relative_name, render_index, render_pairs
from delib_jax.stream import FIGURE_INDEX, JobError, JobOptions, drawn_figures, explain_files

NAMES = ["sparrow", "wren", "tern", "<b>finch</b>"]
OPTIONS = {"top_n": 4, "k": 3, "max_insecurities": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A --no-figures run of 8 images (two subfolders) and one unreadable file; (out, model, config, files)."""
    root = tmp_path_factory.mktemp("pages")
    config = RunConfig(arch="small", num_classes=4, class_names=NAMES, crop=48, resize=56, dataset="cub")
    model = build_model(config, rngs=nnx.Rngs(3))
    model.eval()
    rng = np.random.default_rng(0)
    files = []
    for i in range(8):
        path = root / "photos" / ("birds" if i % 2 else "more") / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50 + 3 * i, 60, 3), dtype=np.uint8)).save(path)
        files.append(path)
    broken = root / "photos" / "more" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    files.append(broken)
    out = root / "out"
    _job(model, config, files, out)
    return out, model, config, files


def _job(model, config, files, out, **kw):
    options = JobOptions(**{"batch_size": 4, "workers": 0, "progress": False, **kw})
    return explain_files(model, config, files, out, options=options, report=lambda m: None, **OPTIONS)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock-*"))
    return copy


def test_pair_statistics_stream_with_bounded_examples():
    def record(i, top, pairs):
        return {"i": i, "source": f"/d/{i}.jpg", "top": top,
                "insecurities": [{"a": a, "b": b, "name_a": NAMES[a], "name_b": NAMES[b], "coverage": 0.1}
                                 for a, b in pairs]}  # fmt: skip

    records = [record(i, [[0, 0.5], [1, 0.3 + i / 100], [2, 0.005]], [(0, 1), (1, 0), (0, 2)]) for i in range(10)]
    records.append(record(10, [[2, 0.6], [3, 0.4]], [(3, 2)]))
    rows = pair_statistics(iter(records), examples=3)  # an iterator: one pass
    first = rows[0]
    assert (first["a"], first["b"], first["images"], first["negligible"]) == (0, 1, 10, 0)  # (0,1) and (1,0): once
    assert [src for _, _, src, _ in first["examples"]] == ["/d/9.jpg", "/d/8.jpg", "/d/7.jpg"]  # competing most
    assert first["competition"] == pytest.approx(np.mean([0.3 + i / 100 for i in range(10)]))
    by_pair = {(r["a"], r["b"]): r for r in rows}
    assert by_pair[(0, 2)]["images"] == 0 and by_pair[(0, 2)]["negligible"] == 10  # p(tern) < 1%: no competition
    assert (by_pair[(2, 3)]["name_a"], by_pair[(2, 3)]["images"]) == ("tern", 1)


def test_relative_paths_and_common_root():
    sources = ["/data/photos/a/1.jpg", "/data/photos/b/c/2.jpg", "/data/photos/3.jpg"]
    root = common_root(iter(sources))
    assert root == "/data/photos"
    assert [relative_name(s, root) for s in sources] == ["a/1.jpg", "b/c/2.jpg", "3.jpg"]
    assert relative_name("/elsewhere/x.jpg", root) == "x.jpg"
    assert common_root(["a.jpg", "/x/b.jpg"]) == ""


def test_index_shows_thumbnails_relative_paths_and_skipped_files(run, tmp_path):
    out, model, config, files = run
    page = _parse(out / "index.html")
    text = "".join(page.text)
    records = list(st.read_records(out))
    assert len(records) == 8 and not drawn_figures(out)
    # every input has a small JPEG thumbnail, loaded lazily; no figure yet: no link
    assert len(page.images) == 8 and all(i["loading"] == "lazy" for i in page.images)
    for img in page.images:
        with Image.open(out / img["src"]) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 128
    assert "birds/im1.png" in text and "more/im0.png" in text  # relative to the input folder
    assert "Skipped files" in text and "more/broken.jpg" in text
    assert text.count("of the ambiguity") == sum(len(r["insecurities"]) for r in records)  # readable strengths
    assert "<b>finch" not in (out / "index.html").read_text()  # class names escaped


def test_pairs_page_counts_every_image_and_escapes(run):
    out = run[0]
    html = (out / "pairs.html").read_text(encoding="utf-8")
    rows = pair_statistics(st.read_records(out))
    assert "<b>finch" not in html  # class names escaped
    assert f"{len(rows)} pairs of classes" in html and "of the 8 images" in html
    page = _parse(out / "pairs.html")
    assert len(page.images) == sum(len(r["examples"]) for r in rows[:200]) > 0
    assert all((out / i["src"]).is_file() for i in page.images)
    page = render_pairs(rows, total=8, limit=1)
    assert f"the first 1 of {len(rows)}" in page


def test_a_runs_records_hold_the_readable_strength(run):
    """The writer stage stores each insecurity's share: that of the stored explanation, raw strength kept."""
    out = run[0]
    records = {r["source"]: r for r in st.read_records(out)}
    explanations = list(st.load_explanations(out))
    assert len(explanations) == 8 and sum(len(e.insecurities) for e in explanations) > 8
    for e in explanations:
        r = records[e.source]
        np.testing.assert_allclose([q["share"] for q in r["insecurities"]], e.shares, rtol=1e-5, atol=1e-6)
        assert [q["strength"] for q in r["insecurities"]] == [float(q.strength) for q in e.insecurities]
    page = (out / "pairs.html").read_text(encoding="utf-8")
    assert "part of the run's ambiguity" in page and "unavailable" not in page


@pytest.mark.slow
def test_shares_of_a_run_with_signed_maps_come_from_the_masks(run, tmp_path):
    """With positive=False the raw strength is not the clamped ambiguity: the writer reads the masks instead."""
    _, model, config, files = run
    out = tmp_path / "signed"
    explain_files(model, config, files[:4], out, options=JobOptions(batch_size=4, workers=0, progress=False),
                  report=lambda m: None, positive=False, **OPTIONS)  # fmt: skip
    records = {r["source"]: r for r in st.read_records(out)}
    explanations = list(st.load_explanations(out))
    assert sum(len(e.insecurities) for e in explanations) > 0
    for e in explanations:
        stored = [q["share"] for q in records[e.source]["insecurities"]]
        np.testing.assert_allclose(stored, e.shares, rtol=1e-5, atol=1e-6)


def test_index_without_thumbnails_is_as_before():
    record = {"source": "/x/a.jpg", "prediction_name": "wren", "confidence": 0.9, "difficulty": 0.1, "score": "s",
              "insecurities": []}  # fmt: skip
    page = render_index([record], ["figures/a.png"])
    assert 'src="figures/a.png"' in page and "Skipped files" not in page and "<nav>" not in page


@pytest.mark.slow
def test_figures_later_are_added_resumed_and_kept(run, tmp_path, capsys):
    out = _copy(run[0], tmp_path)
    hardest = sorted(st.read_records(out), key=lambda r: (-r["difficulty"], r["i"]))
    assert main(["figures", str(out), "--hardest", "2", "--no-progress", "--workers", "2"]) == 0  # in processes
    assert "drew 2 figures (0 already there" in capsys.readouterr().err
    figures = drawn_figures(out)
    assert set(figures) == {r["source"] for r in hardest[:2]}
    lines = (out / FIGURE_INDEX).read_text().splitlines()
    assert sorted(json.loads(line)["source"] for line in lines) == sorted(r["source"] for r in hardest[:2])
    for name in figures.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _parse(out / "index.html")
    assert set(figures.values()) <= set(page.links)  # the full figure on click
    kept = {name: (out / name).stat().st_mtime_ns for name in figures.values()}
    # a killed run: a figure drawn but not recorded (redrawn), a recorded one whose PNG is gone (redrawn)
    (out / figures[hardest[0]["source"]]).unlink()
    assert main(["figures", str(out), "--hardest", "3", "--no-progress", "--workers", "0"]) == 0
    assert "drew 2 figures (1 already there" in capsys.readouterr().err
    name = figures[hardest[1]["source"]]
    assert (out / name).stat().st_mtime_ns == kept[name]  # kept, not redrawn
    assert len(drawn_figures(out)) == 3
    # --images by path; an unknown one is one line
    other = hardest[5]["source"]
    assert (
        main(["figures", str(out), "--images", other, str(tmp_path / "nope.png"), "--no-progress", "--workers", "0"])
        == 0
    )
    err = capsys.readouterr().err
    assert "nope.png is not among the explained images" in err and other in drawn_figures(out)


def test_figures_skip_damaged_entries_with_one_line(run, tmp_path, capsys):
    out = _copy(run[0], tmp_path)
    index = st.index_files(out)[0]
    lines = index.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    explained = [n for n, r in enumerate(records) if "skipped" not in r]
    j = explained[0]
    k = next(n for n in explained[1:] if records[n]["shard"] == records[j]["shard"])
    records[j]["row"], records[k]["row"] = records[k]["row"], records[j]["row"]  # two entries that lie
    index.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["figures", str(out), "--no-progress", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("skipping a damaged entry") == 2, err
    assert len(drawn_figures(out)) == 6


def test_figures_usage_errors_are_one_line(tmp_path, capsys):
    assert main(["figures", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder of delib explain" in err and len(err.strip().splitlines()) == 1
    assert main(["figures", str(tmp_path)]) == 2
    assert "holds no explanations" in capsys.readouterr().err
    assert main(["figures", str(tmp_path), "--hardest", "0"]) == 2


def test_drawn_figures_of_some_sources_only(tmp_path):
    """The pages ask for the figures they show, not the whole run's (flat memory): the same answer, restricted."""
    from delib_jax.testing.store import synthetic_folder

    synthetic_folder(tmp_path, images=6)
    sources = [r["source"] for r in st.read_records(tmp_path)]
    (tmp_path / "figures").mkdir()
    with open(tmp_path / FIGURE_INDEX, "w", encoding="utf-8") as f:
        for j in (0, 2, 4):
            (tmp_path / "figures" / f"{j}.png").write_bytes(b"png")
            f.write(json.dumps({"source": sources[j], "figure": f"figures/{j}.png"}) + "\n")
    every = drawn_figures(tmp_path)
    assert sorted(every) == [sources[0], sources[2], sources[4]]
    assert drawn_figures(tmp_path, [sources[4], sources[1], "/elsewhere.png"]) == {sources[4]: "figures/4.png"}
    assert drawn_figures(tmp_path, []) == {}


def test_a_figures_rerun_points_to_delib_figures_and_foreign_pairs_page_is_kept(run, tmp_path):
    out, model, config, files = run
    copy = _copy(out, tmp_path)
    with pytest.raises(JobError, match="delib figures"):
        _job(model, config, files, copy, figures=True)
    (copy / "pairs.html").write_text("<html>my own page</html>")
    with pytest.raises(JobError, match="pairs.html was not written by delib explain"):
        _job(model, config, files, copy)
    assert (copy / "pairs.html").read_text() == "<html>my own page</html>"


# ------------------------------------------------------------------------------------------------ a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(*args: str, timeout: float = 60) -> str:
    """Run headless Chromium; its stdout (the dumped DOM with --dump-dom)."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
               "--no-first-run", "--disable-dev-shm-usage", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True).stdout


def selftest(page: Path) -> dict:
    """The page's own check in Chromium (?selftest=1): images loaded, sorting, script errors, as JSON."""
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", page.absolute().as_uri() + "?selftest=1")
    start = dom.find('<pre id="selftest">')
    assert start >= 0, f"the self-test did not run: {dom[-500:]}"
    return json.loads(
        dom[start + len('<pre id="selftest">') : dom.index("</pre>", start)]
        .replace("&quot;", '"')
        .replace("&amp;", "&")
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_pages_in_a_real_browser(run, tmp_path):
    out = _copy(run[0], tmp_path)
    assert main(["figures", str(out), "--hardest", "3", "--no-progress", "--workers", "0"]) == 0
    for name, sorts in (("index.html", {"index", "prediction", "difficulty"}),
                        ("pairs.html", {"rank", "pair", "images", "ambiguity", "competition"})):  # fmt: skip
        result = selftest(out / name)
        assert result["images"] > 0 and result["broken"] == [], (name, result)
        assert result["errors"] == [], (name, result)
        assert set(result["sorts"]) == sorts and all(result["sorts"].values()), (name, result)
    shot = tmp_path / "index.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,1600", (out / "index.html").absolute().as_uri())
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)


def test_the_self_test_can_fail(tmp_path):
    """The checker sees a broken image, a script error and a wrong sort (else its green would mean nothing)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from delib_jax.report import render_index

    record = {"source": "/x/a.jpg", "prediction_name": "wren", "confidence": 0.9, "difficulty": 0.1, "score": "s",
              "insecurities": []}  # fmt: skip
    page = render_index([record, {**record, "difficulty": 0.5}], thumbs=["thumbs/missing.jpg", None], root="/x")
    page = page.replace("</body>", "<script>undefinedFunction();</script></body>")
    page = page.replace("rows.forEach(r => body.appendChild(r));", "")  # sorting that does nothing
    (tmp_path / "index.html").write_text(page)
    result = selftest(tmp_path / "index.html")
    assert result["broken"] == ["thumbs/missing.jpg"]
    assert any("undefinedFunction" in e for e in result["errors"])
    assert result["sorts"]["difficulty"] is False
