"""Offline reports: a static HTML index of explained images, and a human-study export like the paper's Fig. 5.

    write_report("out", explanations, figures=["figures/0.png", ...])    # out/index.html, opens without a server
    write_human_study("out/study", zip(explanations, images), examples)       # questions.json + answer_key.json

The index lists every image with its figure's thumbnail, prediction, difficulty and insecurities; clicking the
column headers sorts by difficulty, prediction or input order (a few lines of inline JavaScript, no network).
All text from the data (class names, file names) is HTML-escaped, and any str can be written: undecodable file-name
bytes show as U+FFFD and their links percent-encode the bytes.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import os
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
img.small { width: 96px; height: 96px; object-fit: cover; border: 1px solid #ccc; background: #eee; }
td.path { overflow-wrap: anywhere; max-width: 24em; }
th { white-space: nowrap; }
nav > * { margin-right: 1.2em; }
td.examples { white-space: nowrap; }
figure.example { display: inline-block; margin: 0 6px 4px 0; text-align: center; font-size: 0.8em; color: #777; }
figure.example figcaption { max-width: 96px; overflow: hidden; text-overflow: ellipsis; }
a.figure { display: block; font-size: 0.8em; }
ol { margin: 0; padding-left: 1.2em; }
.num { font-variant-numeric: tabular-nums; }
.muted { color: #777; }
"""

_SCRIPT = """
function sortBy(key, numeric, table) {
  const body = document.querySelector("#" + (table || "explanations") + " tbody");
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
// ?selftest=1 (the browser test): load every image, check each and the sorting, write the result as JSON into the page
const selftestErrors = [];
window.addEventListener("error", e => selftestErrors.push(String(e.message || e)));
window.addEventListener("load", async () => {
  if (!/[?&]selftest=1/.test(location.search)) return;
  const images = Array.from(document.images);
  images.forEach(i => { i.loading = "eager"; });
  await Promise.all(images.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const sorts = {};
  for (const th of document.querySelectorAll("th.sort")) {
    const body = th.closest("table").tBodies[0];
    const key = th.dataset.key, numeric = th.dataset.numeric === "1";
    const values = () => Array.from(body.rows).map(r => numeric ? parseFloat(r.dataset[key]) : r.dataset[key]);
    th.click();
    const up = values();
    th.click();
    const down = values();
    const ordered = (v, s) => v.every((x, j) => j === 0 || s * (x < v[j - 1] ? -1 : x > v[j - 1] ? 1 : 0) >= 0);
    sorts[key] = ordered(up, 1) && ordered(down, -1);
  }
  const out = document.createElement("pre");
  out.id = "selftest";
  out.textContent = JSON.stringify({
    images: images.length, broken: images.filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute("src")),
    sorts: sorts, errors: selftestErrors,
  });
  document.body.appendChild(out);
});
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


def _percent(share: float) -> str:
    """A share as a percentage, a small one as "<1%" (never "0%" for a share that is not zero)."""
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def _insecurity_item(q: Mapping[str, Any]) -> str:
    """One insecurity of the index: its classes, its share of the image's ambiguity when known, its coverage."""
    share = "" if q.get("share") is None else f"{_percent(q['share'])} of the ambiguity, "
    cls = " class='muted'" if q["negligible"] else ""
    note = " negligible" if q["negligible"] else ""
    return (
        f"<li{cls}>{_e(q['name_a'])} <span class='muted'>vs</span> {_e(q['name_b'])} "
        f"<span class='muted num'>({share}covers {q['coverage']:.0%}{note})</span></li>"
    )


THUMBNAIL = 96  # px, the side of the report's JPEG thumbnails


def common_root(sources: Iterable[str]) -> str:
    """The folder every source lies in (their common parent; "" when there is none), in one pass."""
    root: str | None = None
    for source in sources:
        parent = os.path.dirname(str(source))
        try:
            root = parent if root is None else os.path.commonpath([root, parent]) if root and parent else ""
        except ValueError:  # absolute and relative paths: no common folder
            root = ""
    return root or ""


def relative_name(source: str | None, root: str) -> str:
    """``source`` relative to ``root`` (the input folder), or its file name when it is not below it."""
    if not source:
        return ""
    if root and str(source).startswith(root.rstrip("/") + "/"):
        return str(source)[len(root.rstrip("/")) + 1 :]
    return Path(str(source)).name


def thumbnail_name(source: str) -> str:
    """thumbs/HASH.jpg: one small JPEG per input path, whatever its name."""
    digest = hashlib.blake2b(str(source).encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()
    return f"thumbs/{digest}.jpg"


def write_thumbnail(out: str | Path, source: str, resize: int, crop: int, size: int = THUMBNAIL, *,
                    payload=None) -> str | None:  # fmt: skip
    """OUT/thumbs/HASH.jpg of ``source`` as the job saw it (resized and cropped), ``size`` px, written once
    (atomically; an existing one is kept). Returns its path relative to OUT, or None when the input is unreadable.
    ``payload``: what to decode when it is not the file ``source`` (a dataset's `_reader.StoredImage`)."""
    from delib_jax import _reader

    name = thumbnail_name(source)
    path = Path(out) / name
    if path.is_file():
        return name
    pixels, _ = _reader.decode(source if payload is None else payload, resize=resize, crop=crop)
    if pixels is None:
        return None
    image = Image.fromarray(np.asarray(pixels, np.uint8)).resize((size, size), Image.BILINEAR)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda f: image.save(f, format="JPEG", quality=80))
    return name


def _picture(figure: str | None, thumb: str | None, name: str) -> str:
    """The image cell: with a thumbnail, it (lazily loaded) linking to the figure when there is one; without, the
    figure itself scaled down (or a note that there is none)."""
    if thumb:
        img = f'<img class="small" loading="lazy" src="{_href(thumb)}" alt="{_e(name)}">'
        if figure:
            link = _href(figure)
            return f'<a href="{link}" title="the figure">{img}</a><a class="figure" href="{link}">figure</a>'
        return img
    if figure:
        return (
            f'<a href="{_href(figure)}"><img class="thumb" loading="lazy" src="{_href(figure)}" '
            f'alt="figure of {_e(name)}"></a>'
        )
    return '<span class="muted">no figure</span>'


def _nav(here: str, pages: Sequence[tuple[str, str]]) -> str:
    links = [f"<b>{_e(t)}</b>" if f == here else f'<a href="{_href(f)}">{_e(t)}</a>' for f, t in pages]
    return "<nav>" + "".join(links) + "</nav>" if len(pages) > 1 else ""


def render_index(
    explanations: Sequence[Explanation | Mapping[str, Any]],
    figures: Sequence[str | None] | None = None,
    *,
    title: str = "Deliberative explanations",
    settings: Mapping[str, Any] | None = None,
    note: str | None = None,
    thumbs: Sequence[str | None] | None = None,
    root: str | None = None,
    skipped: Sequence[tuple[str, str]] = (),
    skipped_total: int | None = None,
    pages: Sequence[tuple[str, str]] = (),
) -> str:
    """The HTML text of the index; ``figures`` and ``thumbs`` are paths relative to the page (or None: none);
    ``note``: a line shown under the title (e.g. that the page lists only the hardest images); ``root``: the input
    folder, names are shown relative to it (None: file names); ``skipped``: (source, reason) of unreadable inputs
    (``skipped_total`` of them in all); ``pages``: (file, title) of the report's pages, linked at the top."""
    figures = [None] * len(explanations) if figures is None else list(figures)
    thumbs = [None] * len(explanations) if thumbs is None else list(thumbs)
    if len(figures) != len(explanations) or len(thumbs) != len(explanations):
        raise ValueError(f"{len(figures)} figures, {len(thumbs)} thumbnails for {len(explanations)} explanations")
    rows = []
    for i, (item, figure, thumb) in enumerate(zip(explanations, figures, thumbs)):
        s = summary(item)
        name = (relative_name(s["source"], root) if root is not None else Path(s["source"]).name) if s["source"] \
            else f"image {i}"  # fmt: skip
        insecurities = "".join(_insecurity_item(q) for q in s["insecurities"]) or "<li class='muted'>none</li>"
        if s["insecurities"] and all(q["negligible"] for q in s["insecurities"]):
            insecurities = (
                f"<li class='muted'>nothing competes (in every pair one class below {NEGLIGIBLE_PROBABILITY:.0%})</li>"
            )
        rows.append(
            f'<tr data-index="{i}" data-difficulty="{s["difficulty"]:.6g}" '
            f'data-prediction="{_e(s["prediction_name"])}">'
            f'<td class="num">{i + 1}</td><td>{_picture(figure, thumb, name)}</td>'
            f'<td class="path" title="{_e(s["source"] or "")}">{_e(name)}</td>'
            f'<td>{_e(s["prediction_name"])}<br><span class="muted num">p = {s["confidence"]:.3f}</span></td>'
            f'<td class="num">{s["difficulty"]:.3f}<br><span class="muted">{_e(s["score"])}</span></td>'
            f"<td><ol>{insecurities}</ol></td></tr>"
        )
    info = f"<p>{_e(note)}</p>" if note else ""
    if settings:
        info += "<p class='muted'>" + ", ".join(f"{_e(k)} = {_e(v)}" for k, v in settings.items()) + "</p>"
    if root:
        info += f"<p class='muted'>Paths relative to {_e(root)}</p>"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f"{_nav('index.html', pages)}<h1>{_e(title)}</h1><p>{len(rows)} images. Click a column header to sort.</p>"
        f"{info}<table id='explanations'><thead><tr>"
        "<th class='sort' data-key='index' data-numeric='1' onclick='sortBy(\"index\", true)'>#</th>"
        "<th>figure</th><th>image</th>"
        "<th class='sort' data-key='prediction' onclick='sortBy(\"prediction\", false)'>prediction</th>"
        "<th class='sort' data-key='difficulty' data-numeric='1' onclick='sortBy(\"difficulty\", true)'>difficulty"
        f"</th><th>insecurities</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"{_skipped_section(skipped, skipped_total, root)}</body></html>\n"
    )


def _skipped_section(skipped: Sequence[tuple[str, str]], total: int | None, root: str | None) -> str:
    """The inputs that could not be read, with the reason (the first ``len(skipped)`` of ``total``)."""
    total = len(skipped) if total is None else total
    if not total:
        return ""
    more = f" (the first {len(skipped)} listed)" if total > len(skipped) else ""
    items = "".join(
        f"<tr><td class='path' title='{_e(s)}'>{_e(relative_name(s, root) if root is not None else s)}</td>"
        f"<td>{_e(why)}</td></tr>"
        for s, why in skipped
    )
    return (
        f"<h2 id='skipped'>Skipped files</h2><p>{total} inputs could not be read{more}.</p>"
        f"<table id='skipped-files'><thead><tr><th>file</th><th>reason</th></tr></thead><tbody>{items}</tbody></table>"
    )


def write_report(
    out_dir: str | Path,
    explanations: Sequence[Explanation | Mapping[str, Any]],
    figures: Sequence[str | None] | None = None,
    **kw: Any,
) -> Path:
    """Write ``out_dir/index.html`` (atomically); figure and thumbnail paths relative to ``out_dir``; keywords as
    `render_index`. Returns its path."""
    page = render_index(explanations, figures, **kw)
    return atomic_write(Path(out_dir) / "index.html", lambda f: f.write(page), binary=False)


# ------------------------------------------------------------------------------------------------ class pairs


def pair_statistics(records: Iterable[Mapping[str, Any]], *, examples: int = 4) -> list[dict[str, Any]]:
    """The class pairs the model hesitates between over a whole run, in one pass over index records
    (`delib_jax.store.read_records`) with memory bounded by the number of pairs that occur (not of images).

    Per unordered pair: ``images`` where it is an insecurity that competes (not negligible), ``negligible`` where it
    is one that does not, ``competition`` the mean over those images of min(p_a, p_b) (how probable the less
    probable class is), ``coverage`` the regions' mean coverage; from the records' shares (the share of an image's
    ambiguity in the pair's region), ``share_mean`` and ``share_max`` over the images where it competes and
    ``run_share``, their sum over the number of images whose records hold shares (the pair's part of the run's
    ambiguity, each image counting alike), all None for a pair that no record with shares names (folders written
    before they were stored); ``examples``: (min(p_a, p_b), ordinal, source, share or None) of the ``examples``
    images where the two compete most. Sorted as `rank_key`: by ``run_share``, most first (by ``images`` when
    there are no shares)."""
    stats: dict[tuple[int, int], dict[str, Any]] = {}
    with_shares = 0
    for r in records:
        probs = {int(c): float(p) for c, p in r.get("top", ())}
        qs = r.get("insecurities", ())
        with_shares += all(q.get("share") is not None for q in qs)  # an image without insecurities: 0 in all
        for key, group in _pairs_of(r).items():
            q = group[0]
            p = min(probs.get(q["a"], 0.0), probs.get(q["b"], 0.0))
            e = stats.get(key)
            if e is None:
                first = q["a"] == key[0]
                e = stats[key] = {"images": 0, "negligible": 0, "p": 0.0, "coverage": 0.0, "heap": [], "shared": 0,
                                  "share": 0.0, "share_max": 0.0, "name_a": q["name_a"] if first else q["name_b"],
                                  "name_b": q["name_b"] if first else q["name_a"]}  # fmt: skip
            if is_negligible(p, p):
                e["negligible"] += 1
                continue
            e["images"] += 1
            e["p"] += p
            e["coverage"] += max(float(x["coverage"]) for x in group)
            share = _group_share(group)
            if share is not None:
                e["shared"] += 1
                e["share"] += share
                e["share_max"] = max(e["share_max"], share)
            item = (p, -int(r["i"]), r["source"], -1.0 if share is None else share)
            if len(e["heap"]) < examples:
                heapq.heappush(e["heap"], item)
            else:
                heapq.heappushpop(e["heap"], item)
    rows = [
        {"a": a, "b": b, "name_a": e["name_a"], "name_b": e["name_b"], "images": e["images"],
         "negligible": e["negligible"], "competition": e["p"] / e["images"] if e["images"] else 0.0,
         "coverage": e["coverage"] / e["images"] if e["images"] else 0.0,
         "share_mean": e["share"] / e["shared"] if e["shared"] else None,
         "share_max": e["share_max"] if e["shared"] else None,
         "run_share": e["share"] / with_shares if e["shared"] else None,
         "examples": [(p, -j, src, None if sh < 0 else sh) for p, j, src, sh in sorted(e["heap"], reverse=True)]}
        for (a, b), e in stats.items()
    ]  # fmt: skip
    rows.sort(key=rank_key)
    return rows


def rank_key(row: Mapping[str, Any]) -> tuple:
    """The pairs page's order: the pair's part of the run's ambiguity (``run_share``), most first; then the images
    where it competes, the competition, the class indices. Without shares (older folders): the images first."""
    return (-(row["run_share"] or 0.0), -row["images"], -row["competition"], row["a"], row["b"])


def _group_share(group: Sequence[Mapping[str, Any]]) -> float | None:
    """The share of an image's ambiguity in a pair's region (the largest when the pair has two), None if unknown."""
    shares = [q.get("share") for q in group]
    return None if any(v is None for v in shares) else max(float(v) for v in shares)


def _pairs_of(r: Mapping[str, Any]) -> dict[tuple[int, int], list[Mapping[str, Any]]]:
    """A record's insecurities grouped by unordered class pair (an image counts once per pair)."""
    groups: dict[tuple[int, int], list] = {}
    for q in r.get("insecurities", ()):
        groups.setdefault((min(q["a"], q["b"]), max(q["a"], q["b"])), []).append(q)
    return groups


def render_pairs(
    pairs: Sequence[Mapping[str, Any]],
    *,
    total: int,
    thumbs: Mapping[str, str | None] | None = None,
    figures: Mapping[str, str | None] | None = None,
    shares: Mapping[tuple[str, int, int], float | None] | None = None,
    root: str | None = None,
    limit: int | None = None,
    pages: Sequence[tuple[str, str]] = (),
    title: str = "Class pairs the model hesitates between",
) -> str:
    """The HTML text of the pairs page from `pair_statistics` rows (the first ``limit`` shown); ``thumbs`` /
    ``figures``: source -> path relative to the page; ``shares``: (source, a, b) -> the share of that image's
    ambiguity in the pair's region (`Explanation.shares`), shown under an example whose record holds none."""
    thumbs, figures, shares = thumbs or {}, figures or {}, shares or {}
    shown = list(pairs if limit is None else pairs[:limit])
    have_shares = any(p.get("run_share") is not None for p in pairs)
    rows = []
    for rank, p in enumerate(shown):
        cells = []
        for _, _, source, *known in p["examples"]:
            name = relative_name(source, root) if root is not None else Path(source).name
            share = known[0] if known and known[0] is not None else shares.get((source, p["a"], p["b"]))
            caption = f"{name}" + ("" if share is None else f" ({share:.0%})")
            thumb, figure = thumbs.get(source), figures.get(source)
            img = (f'<img class="small" loading="lazy" src="{_href(thumb)}" alt="{_e(name)}" title="{_e(caption)}">'
                   if thumb else "")  # fmt: skip
            img = f'<a href="{_href(figure)}">{img}</a>' if figure and thumb else img
            label = "" if share is None else _percent(share)
            cells.append(f'<figure class="example">{img}<figcaption title="{_e(caption)}">{_e(label or name)}'
                         "</figcaption></figure>")  # fmt: skip
        run_share, mean, top = p.get("run_share"), p.get("share_mean"), p.get("share_max")
        if run_share is None:
            ambiguity = "<span class='muted'>unavailable</span>"
        else:
            per_image = "" if mean is None else (
                f"<br><span class='muted'>{_percent(mean)} per image<br>at most {_percent(top)}</span>")  # fmt: skip
            ambiguity = f"{_percent(run_share)}{per_image}"
        rows.append(
            f'<tr data-rank="{rank}" data-images="{p["images"]}" data-competition="{p["competition"]:.6g}" '
            f'data-ambiguity="{run_share or 0.0:.6g}" data-pair="{_e(p["name_a"])} {_e(p["name_b"])}">'
            f'<td class="num">{rank + 1}</td><td>{_e(p["name_a"])} <span class="muted">vs</span> {_e(p["name_b"])}</td>'
            f'<td class="num">{p["images"]}<br>'
            f'<span class="muted">{p["images"] / max(total, 1):.1%} of images</span></td>'
            f'<td class="num">{ambiguity}</td>'
            f'<td class="num">{p["competition"]:.0%}<br><span class="muted">covers {p["coverage"]:.0%}</span></td>'
            f'<td class="num">{p["negligible"]}</td><td class="examples">{"".join(cells)}</td></tr>'
        )
    more = f" (the first {len(shown)} of {len(pairs)} listed)" if len(shown) < len(pairs) else ""
    if have_shares:
        order = (
            "Pairs are ranked by their <i>part of the run's ambiguity</i> (column <i>ambiguity</i>): the share of "
            "each image's ambiguity that lies in the pair's region (the readable strength of its insecurity), summed "
            "over the images where the pair competes and divided by the number of images, so that 5% means that on "
            "average 5% of an image's ambiguity is this pair's; under it the mean share over the images where the "
            "pair competes, and the largest. Ties: more images first."
        )
    else:
        order = (
            "<b>Shares unavailable</b>: this folder's records were written before the share of each image's "
            "ambiguity was stored, so the pairs are ranked by the number of images where they compete (ties: "
            "competition); run <code>delib explain</code> again into a new folder for the shares."
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f"{_nav('pairs.html', pages)}<h1>{_e(title)}</h1>"
        f"<p>{len(pairs)} pairs of classes compete in some of the {total} images{more}. A pair competes in an image "
        f"when it is one of its insecurities and both classes have probability at least {NEGLIGIBLE_PROBABILITY:.0%}"
        "; <i>competition</i> is the mean probability of the less probable class of the two, <i>covers</i> the "
        "mean fraction of the image in the region; the examples are the images where the two compete most, "
        "each with the share of that image's ambiguity in the pair's region. Click a column header to sort.</p>"
        f"<p id='ranking'>{order}</p>"
        "<table id='pairs'><thead><tr>"
        "<th class='sort' data-key='rank' data-numeric='1' onclick='sortBy(\"rank\", true, \"pairs\")'>#</th>"
        "<th class='sort' data-key='pair' onclick='sortBy(\"pair\", false, \"pairs\")'>classes</th>"
        "<th class='sort' data-key='images' data-numeric='1' onclick='sortBy(\"images\", true, \"pairs\")'>"
        "images</th><th class='sort' data-key='ambiguity' data-numeric='1' "
        "title=\"the pair's part of the run's ambiguity (the ranking rule above)\" "
        'onclick=\'sortBy("ambiguity", true, "pairs")\'>ambiguity</th>'
        "<th class='sort' data-key='competition' data-numeric='1' "
        'onclick=\'sortBy("competition", true, "pairs")\'>competition</th><th>negligible</th><th>examples</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>\n"
    )


def write_pairs(out_dir: str | Path, pairs: Sequence[Mapping[str, Any]], **kw: Any) -> Path:
    """Write ``out_dir/pairs.html`` (atomically); keywords as `render_pairs`. Returns its path."""
    page = render_pairs(pairs, **kw)
    return atomic_write(Path(out_dir) / "pairs.html", lambda f: f.write(page), binary=False)


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


__all__ = [
    "common_root", "pair_statistics", "rank_key", "relative_name", "render_index", "render_pairs", "summary",
    "thumbnail_name", "write_human_study", "write_pairs", "write_report", "write_thumbnail",
]  # fmt: skip
