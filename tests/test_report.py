"""HTML report (lists every image, escapes class names, sortable) and the human-study export (Fig. 5)."""

import dataclasses
import html.parser
import json
import os
import sys

import numpy as np
import pytest

from delib_jax.explanation import Explanation, Insecurity
from delib_jax.report import render_index, write_human_study, write_report

NAMES = ["sparrow", "wren", '<b>&"x"', "finch", "tern", "gull"]
EVIL = '<b>&"x"'


def make_explanation(i: int, pair=(0, 2), difficulty=0.5, source=None) -> Explanation:
    rng = np.random.default_rng(i)
    probs = rng.dirichlet(np.ones(6)).astype(np.float32)
    classes = np.argsort(-probs)[:5].astype(np.int32)
    mask = np.zeros((16, 16), bool)
    mask[4:9, 2:7] = True
    item = Insecurity(
        mask=mask,
        strength=np.float32(0.3),
        coverage=np.float32(mask.mean()),
        threshold=np.float32(0.1),
        a=pair[0],
        b=pair[1],
        name_a=NAMES[pair[0]],
        name_b=NAMES[pair[1]],
    )
    return Explanation(
        probs=probs,
        difficulty=np.float32(difficulty),
        classes=classes,
        maps=rng.normal(size=(6, 4, 4)),
        grad_cam=rng.random((4, 4)),
        insecurities=(item,),
        prediction=int(classes[0]),
        prediction_name=NAMES[classes[0]],
        class_names=tuple(NAMES[c] for c in classes),
        score="hardness",
        method="gradient_hessian",
        image_size=(16, 16),
        source=source or f"/data/img{i}.jpg",
    )


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.text, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-difficulty" in attrs:
            self.rows.append(attrs)
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_lists_every_image_and_escapes_names(tmp_path):
    explanations = [make_explanation(i, difficulty=d) for i, d in enumerate([0.2, 0.9, 0.5])]
    explanations.append(make_explanation(3, source='/x/<script>alert("1")</script>.png'))
    figures = [f"figures/{i}.png" for i in range(3)] + [None]
    path = write_report(tmp_path, explanations, figures, settings={"k": 3})
    page = path.read_text()
    assert "<script>alert" not in page and "<b>&" not in page  # raw markup never reaches the page
    assert "&lt;b&gt;&amp;&quot;x&quot;" in page
    parser = _Collector()
    parser.feed(page)
    assert len(parser.rows) == 4
    assert [float(r["data-difficulty"]) for r in parser.rows] == pytest.approx([0.2, 0.9, 0.5, 0.5])
    assert parser.images == figures[:3]
    text = "".join(parser.text)
    assert EVIL in text  # escaped in the source, shown verbatim to the reader
    for i in range(3):
        assert f"img{i}.jpg" in text
    assert 'sortBy("difficulty", true)' in page and 'sortBy("prediction", false)' in page
    # the same page from the JSON dicts the CLI keeps
    assert render_index([e.to_json() for e in explanations], figures, settings={"k": 3}) == page


def test_report_checks_lengths():
    with pytest.raises(ValueError, match="figures"):
        render_index([make_explanation(0)], ["a.png", "b.png"])


def test_human_study(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    explanations = [make_explanation(i, pair=p) for i, p in enumerate([(0, 2), (1, 3), (4, 5)])]
    examples = {c: pixels[c % 3] for c in range(6)}
    paths = write_human_study(tmp_path, zip(explanations, pixels), examples, class_names=NAMES, seed=3)
    questions = json.loads(paths["questions"].read_text())
    key = json.loads(paths["answer_key"].read_text())
    assert len(questions) == 3 and set(key) == {q["id"] for q in questions}
    for q in questions:  # nothing in what participants see gives the answer away
        assert set(q) == {"id", "region", "prompt", "choices"}
        assert all(set(c) == {"label", "class_name", "example"} for c in q["choices"])
    orders = []
    for q, e in zip(questions, explanations):
        names = [c["class_name"] for c in q["choices"]]
        assert len(names) == 5 == len(set(names))
        answer = key[q["id"]]
        item = e.insecurities[0]
        assert answer["class_names"] == [item.name_a, item.name_b]
        chosen = [c["class_name"] for c in q["choices"] if c["label"] in answer["labels"]]
        assert sorted(chosen) == sorted([item.name_a, item.name_b])
        assert (tmp_path / q["region"]).is_file()
        assert all((tmp_path / c["example"]).is_file() for c in q["choices"])
        orders.append(answer["labels"])
    assert len({tuple(o) for o in orders}) > 1 or orders[0] != ["A", "B"]  # shuffled, not always first
    # too few classes with examples: the question is skipped, not padded
    few = write_human_study(tmp_path / "few", zip(explanations[:1], pixels), {0: pixels[0], 2: pixels[1]})
    assert json.loads(few["questions"].read_text()) == []


# Names a file system or a dataset can hold: mathtext and LaTeX syntax, undecodable file-name bytes (as os.fsdecode
# returns them), lone surrogates, very long names.
HOSTILE = ["$x$", "a$b$c$d", "$\\frac{", "50% & #1 ^_^ \\", os.fsdecode(b"caf\xe9"), "\ud800", "é" * 300]


@pytest.mark.parametrize("name", HOSTILE)
def test_figures_draw_any_class_name_as_plain_text(name, tmp_path, monkeypatch):
    from delib_jax.visualize import explanation_figure, save_figure

    monkeypatch.setattr(sys.modules[__name__], "NAMES", [name] * 6)
    e = make_explanation(0, source=os.fsdecode(b"/data/\xff" + "鳥".encode() * 80 + b".jpg"))
    e = dataclasses.replace(e, probs=np.full(6, 1 / 6, np.float32))  # classes that compete: the insecurity is drawn
    image = np.zeros((16, 16, 3), np.uint8)
    path = save_figure(e, image, tmp_path / "figure.png", examples={0: image, 2: image})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axis = next(ax for ax in explanation_figure(e, image).axes if ax.get_title().startswith("1. "))
    assert axis.title.get_parse_math() is False  # "1. a\nvs b\n...": drawn as written, never as mathtext
    if "$" in name:
        assert name[:10] in axis.get_title().replace("\n", "")


def test_report_writes_any_file_and_class_name(tmp_path, monkeypatch):
    """index.html with undecodable file-name bytes and lone surrogates: valid UTF-8, U+FFFD shown, and the link to a
    figure whose name holds raw bytes percent-encodes those bytes."""
    monkeypatch.setattr(sys.modules[__name__], "NAMES", ["\udcff" + n for n in NAMES])
    items = [make_explanation(i, source=os.fsdecode(b"/data/caf\xe9_%d.jpg" % i)) for i in range(2)]
    figures = [os.fsdecode(b"figures/caf\xe9.png"), "figures/\ud800.png"]
    page = write_report(tmp_path, items, figures).read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert "caf\ufffd_0.jpg" in page and "\ufffdsparrow" in page
    assert 'src="figures/caf%E9.png"' in page


def test_long_names_fit_the_file_system(tmp_path):
    """A 250-byte target name is legal (ext4 allows 255): its temporary file must be legal too; figure_name keeps
    any source name short and ASCII."""
    from delib_jax.explanation import atomic_write
    from delib_jax.visualize import figure_name

    for name in ("a" * 246 + ".png", "鳥" * 82 + ".png"):  # 250 and 250 bytes
        assert len(os.fsencode(name)) == 250
        atomic_write(tmp_path / name, lambda f: f.write(b"x"))
        assert (tmp_path / name).read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a" * 246 + ".png", "鳥" * 82 + ".png"])
    source = os.fsdecode(b"/photos/" + "鳥".encode() * 80 + b"\xff\xfe.jpeg")  # a 244-byte name
    names = {figure_name(i, source) for i in range(3)}
    assert len(names) == 3 and all(n.isascii() and len(n) <= 100 and n.endswith(".png") for n in names)
    assert figure_name(7, None) == "00007_image.png"
