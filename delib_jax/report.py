"""Offline reports: a static HTML index of explained images, and a human-study export like the paper's Fig. 5.

    write_report("out", explanations, figures=["figures/0.png", ...])    # out/index.html, opens without a server
    write_human_study("out/study", zip(explanations, images), examples)       # questions.json + answer_key.json

The index lists every image with its figure's thumbnail, prediction, difficulty and insecurities; clicking the
column headers sorts by difficulty, prediction or input order (a few lines of inline JavaScript, no network).
All text from the data (class names, file names) is HTML-escaped, and any str can be written: undecodable file-name
bytes show as U+FFFD and their links percent-encode the bytes.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from delib_jax.explanation import Explanation, atomic_write, write_json
from delib_jax.insecurity import NEGLIGIBLE_PROBABILITY, is_negligible
from delib_jax.visualize import find_example, load_example, mask_overlay, printable

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
th.sort { cursor: pointer; color: #1a4fa0; user-select: none; }
th.sort:after { content: " \\2195"; color: #999; }
img.thumb { width: 420px; max-width: 45vw; border: 1px solid #ccc; }
ol { margin: 0; padding-left: 1.2em; }
.num { font-variant-numeric: tabular-nums; }
.muted { color: #777; }
"""

_SCRIPT = """
function sortBy(key, numeric) {
  const body = document.querySelector("#explanations tbody");
  const rows = Array.from(body.rows);
  const dir = body.dataset.key === key && body.dataset.dir === "asc" ? "desc" : "asc";
  rows.sort((x, y) => {
    let a = x.dataset[key], b = y.dataset[key];
    if (numeric) { a = parseFloat(a); b = parseFloat(b); }
    const c = a < b ? -1 : a > b ? 1 : 0;
    return dir === "asc" ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
  body.dataset.key = key; body.dataset.dir = dir;
}
"""


def _e(text: Any) -> str:
    return html.escape(printable(text), quote=True)


def _href(path: str) -> str:
    """A relative link to ``path`` that reaches the file on disk: undecodable name bytes (surrogate escapes) are
    percent-encoded as the bytes they stand for."""
    text = str(path).replace("\\", "/")
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes: no file on disk has them
        raw = printable(text).encode("utf-8")
    return _e(quote(raw))


def summary(explanation: Explanation | Mapping[str, Any]) -> dict[str, Any]:
    """The fields the index shows, from an `Explanation` or its `Explanation.to_json` dict."""
    data = explanation.to_json() if isinstance(explanation, Explanation) else explanation
    # an index record holds the top-N probabilities as [class, p] pairs, an Explanation's JSON all of them
    probs = {int(c): float(p) for c, p in data["top"]} if "top" in data else dict(enumerate(data.get("probs", [])))

    def negligible(q) -> bool:
        return bool(q.get("negligible", is_negligible(probs.get(q.get("a"), 0.0), probs.get(q.get("b"), 0.0))))

    return {
        "source": data.get("source"),
        "prediction_name": data["prediction_name"],
        "confidence": float(data["confidence"]),
        "difficulty": float(data["difficulty"]),
        "score": data["score"],
        "insecurities": [
            {"name_a": q["name_a"], "name_b": q["name_b"], "strength": float(q["strength"]),
             "coverage": float(q["coverage"]), "share": q.get("share"), "negligible": negligible(q)}
            for q in data["insecurities"]
        ],
    }  # fmt: skip


def _insecurity_item(q: Mapping[str, Any]) -> str:
    """One insecurity of the index: its classes, its share of the image's ambiguity when known, its coverage."""
    share = "" if q.get("share") is None else f"{q['share']:.0%} of the ambiguity, "
    cls = " class='muted'" if q["negligible"] else ""
    note = " negligible" if q["negligible"] else ""
    return (
        f"<li{cls}>{_e(q['name_a'])} <span class='muted'>vs</span> {_e(q['name_b'])} "
        f"<span class='muted num'>({share}covers {q['coverage']:.0%}{note})</span></li>"
    )


def render_index(
    explanations: Sequence[Explanation | Mapping[str, Any]],
    figures: Sequence[str | None] | None = None,
    *,
    title: str = "Deliberative explanations",
    settings: Mapping[str, Any] | None = None,
    note: str | None = None,
) -> str:
    """The HTML text of the index; ``figures`` are paths relative to the page (or None for no figure); ``note``: a
    line shown under the title (e.g. that the page lists only the hardest images)."""
    figures = [None] * len(explanations) if figures is None else list(figures)
    if len(figures) != len(explanations):
        raise ValueError(f"{len(figures)} figures for {len(explanations)} explanations")
    rows = []
    for i, (item, figure) in enumerate(zip(explanations, figures)):
        s = summary(item)
        name = Path(s["source"]).name if s["source"] else f"image {i}"
        thumb = (
            (
                f'<a href="{_href(figure)}"><img class="thumb" loading="lazy" src="{_href(figure)}" '
                f'alt="figure of {_e(name)}"></a>'
            )
            if figure
            else '<span class="muted">no figure</span>'
        )
        insecurities = "".join(_insecurity_item(q) for q in s["insecurities"]) or "<li class='muted'>none</li>"
        if s["insecurities"] and all(q["negligible"] for q in s["insecurities"]):
            insecurities = (
                f"<li class='muted'>nothing competes (in every pair one class below {NEGLIGIBLE_PROBABILITY:.0%})</li>"
            )
        rows.append(
            f'<tr data-index="{i}" data-difficulty="{s["difficulty"]:.6g}" '
            f'data-prediction="{_e(s["prediction_name"])}">'
            f'<td class="num">{i + 1}</td><td>{thumb}</td>'
            f'<td title="{_e(s["source"] or "")}">{_e(name)}</td>'
            f'<td>{_e(s["prediction_name"])}<br><span class="muted num">p = {s["confidence"]:.3f}</span></td>'
            f'<td class="num">{s["difficulty"]:.3f}<br><span class="muted">{_e(s["score"])}</span></td>'
            f"<td><ol>{insecurities}</ol></td></tr>"
        )
    info = f"<p>{_e(note)}</p>" if note else ""
    if settings:
        info += "<p class='muted'>" + ", ".join(f"{_e(k)} = {_e(v)}" for k, v in settings.items()) + "</p>"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f"<h1>{_e(title)}</h1><p>{len(rows)} images. Click a column header to sort.</p>{info}"
        "<table id='explanations'><thead><tr>"
        "<th class='sort' onclick='sortBy(\"index\", true)'>#</th><th>figure</th><th>image</th>"
        "<th class='sort' onclick='sortBy(\"prediction\", false)'>prediction</th>"
        "<th class='sort' onclick='sortBy(\"difficulty\", true)'>difficulty</th><th>insecurities</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>\n"
    )


def write_report(
    out_dir: str | Path,
    explanations: Sequence[Explanation | Mapping[str, Any]],
    figures: Sequence[str | None] | None = None,
    *,
    title: str = "Deliberative explanations",
    settings: Mapping[str, Any] | None = None,
    note: str | None = None,
) -> Path:
    """Write ``out_dir/index.html`` (atomically); figure paths relative to ``out_dir``. Returns its path."""
    page = render_index(explanations, figures, title=title, settings=settings, note=note)
    return atomic_write(Path(out_dir) / "index.html", lambda f: f.write(page), binary=False)


def _png(path: Path, pixels: np.ndarray) -> None:
    atomic_write(path, lambda f: Image.fromarray(np.asarray(pixels, np.uint8)).save(f, format="PNG"))


def write_human_study(
    out_dir: str | Path,
    pairs: Iterable[tuple[Explanation, np.ndarray]],
    examples: Mapping,
    *,
    class_names: Sequence[str] | None = None,
    num_choices: int = 5,
    max_per_image: int | None = 1,
    seed: int = 0,
) -> dict[str, Path]:
    """A human study like the paper's Fig. 5: per insecurity, its region and ``num_choices`` candidate classes, each
    with an example image, two of them the insecurity's classes a and b, in a shuffled order.

    Distractors are the image's other top classes first, then other classes with an example image (random). An
    insecurity is skipped when fewer than ``num_choices`` classes have an example. Writes ``out_dir/questions.json``
    (what a participant sees: region image, labelled choices with example images), ``out_dir/answer_key.json``
    (the two correct labels and classes per question, kept apart), ``out_dir/regions/*.png`` and
    ``out_dir/examples/*.png``. pairs: (explanation, its (H_img, W_img, 3) uint8 input), consumed once;
    examples: class index or name -> example image (path or uint8 array); class_names: all C names, so that
    examples keyed by name can serve as distractors too.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    labels = [chr(ord("A") + j) for j in range(num_choices)]
    questions, answers, example_files = [], {}, {}

    def example_file(c: int, name: str) -> str:
        if c not in example_files:
            example_files[c] = f"examples/class{c}.png"
            _png(out / example_files[c], load_example(find_example(examples, c, name)))
        return example_files[c]

    for e, image in pairs:
        names = dict(enumerate(class_names or ()))
        for c, n in _example_names(examples).items():
            names.setdefault(c, n)
        names.update(zip((int(c) for c in e.classes), e.class_names))
        for q, item in enumerate(e.insecurities[:max_per_image]):
            names.update({item.a: item.name_a, item.b: item.name_b})
            have = {c for c, n in names.items() if find_example(examples, c, n) is not None}
            if not {item.a, item.b} <= have:
                continue
            ranked = [int(c) for c in e.classes if int(c) in have and int(c) not in (item.a, item.b)]
            others = sorted(have - set(ranked) - {item.a, item.b})
            rng.shuffle(others)
            distractors = (ranked + others)[: num_choices - 2]
            if len(distractors) < num_choices - 2:
                continue
            choices = [item.a, item.b, *distractors]
            rng.shuffle(choices)
            qid = f"q{len(questions):04d}"
            region = f"regions/{qid}.png"
            _png(out / region, mask_overlay(np.asarray(image, np.uint8), item.mask))
            questions.append({
                "id": qid, "region": region,
                "prompt": "The highlighted region could belong to two of these classes. Which two?",
                "choices": [{"label": lab, "class_name": names[c], "example": example_file(c, names[c])}
                            for lab, c in zip(labels, choices)],
            })  # fmt: skip
            answers[qid] = {
                "labels": [labels[choices.index(item.a)], labels[choices.index(item.b)]],
                "classes": [item.a, item.b], "class_names": [item.name_a, item.name_b],
                "source": e.source, "insecurity": q, "strength": float(item.strength),
            }  # fmt: skip
    return {
        "questions": write_json(out / "questions.json", questions),
        "answer_key": write_json(out / "answer_key.json", answers),
    }


def _example_names(examples: Mapping) -> dict[int, str]:
    """Class index -> name for examples keyed by index (names unknown: the index as text)."""
    return {int(c): str(c) for c in examples if isinstance(c, (int, np.integer))}


__all__ = ["render_index", "summary", "write_human_study", "write_report"]
