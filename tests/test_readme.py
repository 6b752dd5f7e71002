"""Every code block of README.md and docs/*.md, run as a test, so that the documentation and the code cannot drift
apart; and every page of docs/ reachable from the README through links that resolve.

- ``python`` blocks run: a page's blocks in order, as one script, in a temporary folder (the current directory) that
  holds stand-ins for what a user brings: ``runs/cub`` (a small CNN trained for no steps, 6 classes, 32 px),
  ``vgg16.safetensors`` (a torchvision-format state dict of a VGG16 of the same layout but narrow layers, with
  `delib_jax.models.ARCHS["vgg16"]` swapped for the test), image files ``a.jpg``, ``b.png`` and ``photos/``, an
  ``explained/`` folder written by the streaming job when a page reads one without writing it (``cub_test/``: a
  generated CUB test split explained the same way), and the names
  ``images`` (a random normalised batch (2, 32, 32, 3)) and ``pixels`` (a uint8 image (32, 32, 3)).
- ``bash`` blocks are checked command by command without running them (they train for hours or read datasets the
  user brings): ``delib ...`` and ``python -m MODULE ...`` must reach their argument parser and parse their options
  (the module runs as ``__main__`` and stops once its arguments are parsed), ``python -m pytest -m EXPR`` may name
  registered markers only, ``bash FILE`` must name a file of the repository, and any other program must exist.
  The set-up commands (venv, ``.``, pip) are checked against the README's install block, which stays as it is.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import shutil
import signal
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from delib_jax import models
from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config
from delib_jax.models import backbones
from delib_jax.models.weights import torchvision_entries

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY_VGG = (8, "M", 8, "M", 16, "M", 16, "M", 16)  # VGG16's layout (conv blocks, 4 pools in the backbone), narrow
INSTALL = 'python3 -m venv .venv && . .venv/bin/activate\npip install -e ".[test]"'
BLOCK = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(path: Path, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) of each fenced block of ``path`` in ``languages``."""
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start(2)) + 1, m.group(2))
        for m in BLOCK.finditer(text)
        if m.group(1).lower() in languages
    ]


def page_script(path: Path) -> str:
    """The page's python blocks as one script, each block on its own lines of the page (tracebacks point there)."""
    lines: list[str] = []
    for first, code in code_blocks(path, ("python", "py")):
        lines += [""] * (first - 1 - len(lines)) + code.rstrip("\n").split("\n")
    return "\n".join(lines)


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# Pages whose python blocks need stand-ins of their own run in a dedicated test instead (named here).
DEDICATED = {"docs/reading-explanations.md": "tests/test_docs_reading.py"}


def _pages_with(languages: tuple[str, ...]) -> list[Path]:
    return [p for p in PAGES if code_blocks(p, languages) and _name(p) not in DEDICATED]


def test_pages_with_a_dedicated_test_are_run_there():
    for page, test in DEDICATED.items():
        assert Path(page).name in (ROOT / test).read_text(encoding="utf-8"), (page, test)


def _tiny_vgg_spec():
    def head(d, c, *, rngs):
        return models.PoolMLPHead(
            d,
            c,
            hidden=(32, 32),
            pooled_size=(7, 7),
            pool_window=2,
            pool_stride=2,
            dropout=0.5,
            dropout_before=(1, 2),
            rngs=rngs,
        )

    return models.ArchSpec(lambda **kw: backbones.VGG(TINY_VGG, batch_norm=False, **kw), head, 32)


def _torchvision_state_dict(model) -> dict[str, np.ndarray]:
    """``model``'s backbone and hidden class-head layers under torchvision's names and layouts (the inverse of the
    import's conversions; the last class layer left out, as classifier_output=False allows)."""
    last = len(model.classifier.linears) - 1
    out = {}
    for key, path, kind in torchvision_entries(model):
        if path[:3] == ("classifier", "linears", last):
            continue
        node = model
        for p in path:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        w = np.asarray(node[...], np.float32)
        if kind == "conv":
            w = w.transpose(3, 2, 0, 1)
        elif kind == "linear":
            w = w.T
        elif kind == "linear_nchw":  # ours (h*w*D, O) in NHWC order -> torch (O, D*h*w)
            d = model.backbone.out_channels
            side = int(round((w.shape[0] // d) ** 0.5))
            w = w.reshape(side, side, d, -1).transpose(3, 2, 0, 1).reshape(w.shape[1], -1)
        out[key] = np.ascontiguousarray(w)
    return out


def _write_run(run: Path) -> RunConfig:
    names = [f"bird {i}" for i in range(6)]
    config = RunConfig(arch="small", num_classes=6, class_names=names, crop=32, resize=36, seed=0)
    save_run_config(run, config)
    _, params, rest = nnx.split(build_model(config), nnx.Param, ...)
    with RunCheckpoints(run) as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    return config


def _write_images(folder: Path, names: list[str], seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in names]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
    return paths


def _write_explained(root: Path, run: Path, files: list[Path]) -> None:
    from delib_jax.checkpoint import load_model
    from delib_jax.stream import JobOptions, explain_files

    model, config = load_model(run)
    explain_files(model, config, [str(f) for f in files], root / "explained", options=JobOptions(batch_size=2))


def _write_dataset_run(root: Path, run: Path) -> None:
    """cub_test/: the test split of a small generated CUB release explained by the run (its classes unchecked)."""
    from delib_jax.checkpoint import load_model
    from delib_jax.data.synthetic import make_cub
    from delib_jax.job.inputs import dataset_inputs
    from delib_jax.stream import JobOptions, explain_files

    model, config = load_model(run)
    make_cub(root / "cub_data", classes=2, images_per_class=2, size=40, seed=0)
    inputs = dataset_inputs("cub", root / "cub_data", "test")
    explain_files(model, config, inputs, root / "cub_test", options=JobOptions(batch_size=2), report=lambda m: None)


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """The folder a page's python blocks run in, and the names they start with."""
    _write_run(tmp_path / "runs" / "cub")
    monkeypatch.setitem(models.ARCHS, "vgg16", _tiny_vgg_spec())
    source = models.create_model("vgg16", 1000, hardness="none", rngs=nnx.Rngs(7))  # "ImageNet" weights
    save_file(_torchvision_state_dict(source), str(tmp_path / "vgg16.safetensors"))
    _write_images(tmp_path, ["a.jpg", "b.png"], 0)
    _write_images(tmp_path / "photos", ["1.jpg", "2.png", "3.jpg"], 1)
    monkeypatch.chdir(tmp_path)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3), jnp.float32)
    pixels = np.asarray(jax.random.randint(jax.random.key(1), (32, 32, 3), 0, 256), np.uint8)
    return tmp_path, {"__name__": "__docs__", "images": images, "pixels": pixels, "source_model": source}


def run_page(path: Path, root: Path, namespace: dict) -> dict:
    """Run the page's python blocks in ``root`` (the current directory) with ``namespace``; returns it."""
    script = page_script(path)
    if "explained/" in script and "explain_files(" not in script:
        _write_explained(root, root / "runs" / "cub", sorted((root / "photos").iterdir()))
    if "cub_test/" in script and "explain_dataset(" not in script:
        _write_dataset_run(root, root / "runs" / "cub")
    exec(compile(script, str(path), "exec"), namespace)
    return namespace


# Slow: the stand-ins (a run, a narrow VGG16 and its weights file) and the programs a page compiles took 28 s of
# CPU and more per page on the 2-core CPU; the shell, link and install checks below are the fast tier's.
@pytest.mark.slow
@pytest.mark.parametrize("page", [pytest.param(p, id=_name(p)) for p in _pages_with(("python", "py"))])
def test_python_blocks_run(page, stand_ins):
    root, namespace = stand_ins
    namespace = run_page(page, root, namespace)
    check = PAGE_CHECKS.get(_name(page))
    if check is not None:
        check(namespace)


def _check_readme(ns: dict) -> None:
    images = ns["images"]
    assert len(ns["explanations"]) == 2
    assert {n for e in ns["explanations"] for n in e.class_names} <= {f"bird {i}" for i in range(6)}
    assert ns["attr"].maps.shape == (2, 7, *ns["a"].shape[1:3])  # 6 classes, then the difficulty map
    assert ns["pixel_maps"].shape == (2, 2, *images.shape[1:3])


def _check_research_api(ns: dict) -> None:
    from delib_jax.attribution import attribute

    images, vgg, source = ns["images"], ns["vgg"], ns["source_model"]
    # the imported weights are in the VGG16, and its compiled maps are attribute()'s
    np.testing.assert_array_equal(vgg.backbone.convs[0].kernel[...], source.backbone.convs[0].kernel[...])
    a = vgg.features(images)
    assert ns["cams"].shape == (2, 200, *a.shape[1:3])
    ref = attribute(vgg.classifier, a, hardness_head=vgg.hardness_head, method="gradient_hessian").maps
    np.testing.assert_allclose(ns["explain_fn"](images).maps, ref, rtol=1e-4, atol=1e-6 * float(np.abs(ref).max()))
    assert [Path(e.source).name for e in ns["stored"]] == ["a.jpg", "b.png"]
    assert ns["pix"].maps.shape == (2, 5, *images.shape[1:3])
    assert ns["curves"].shape == (2, 1, 21)
    assert ns["rows"].shape == (2, *ns["grid"])
    assert Path("interactions.png").stat().st_size > 0


PAGE_CHECKS = {"README.md": _check_readme, "docs/research-api.md": _check_research_api}


# ------------------------------------------------------------------------------------------------ shell blocks


class _Parsed(Exception):
    """Raised by the patched ``ArgumentParser.parse_args`` once a command's options parsed: stop there."""


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at ``&&``, ``||``, ``;``
    and ``|``."""
    commands = []
    for line in code.replace("\\\n", " ").split("\n"):
        current: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in ("&&", "||", ";", "|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def _registered_markers(config: pytest.Config) -> set[str]:
    return {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}


def _parse_only(run, monkeypatch, capsys, what: str) -> None:
    """Run ``run()`` (a command's entry) until its argument parser has parsed its options."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    handler = signal.getsignal(signal.SIGINT)  # the entry points install their own
    try:
        status = run()
    except _Parsed:
        return
    except SystemExit as e:
        status = e.code
    finally:
        signal.signal(signal.SIGINT, handler)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    pytest.fail(f"{what}: its options did not parse (exit {status}): {capsys.readouterr().err.strip()[-800:]}")


def check_command(argv: list[str], monkeypatch, capsys, config: pytest.Config) -> None:
    """Fail unless ``argv`` is a command this repository documents correctly (see the module's docstring)."""
    what = shlex.join(argv)
    if argv[0] in ("python", "python3") and argv[1:2] == ["-m"]:
        module, args = argv[2], argv[3:]
        if module in ("venv", "pip"):
            return  # set-up: test_install_commands_unchanged
        if module == "pytest":
            if "-m" in args:
                words = set(re.findall(r"\w+", args[args.index("-m") + 1])) - {"and", "or", "not"}
                assert words <= _registered_markers(config), f"{what}: markers not registered: {words}"
            return
        monkeypatch.setattr(sys, "argv", [module, *args])
        with warnings.catch_warnings():  # runpy's note that an earlier test imported the module already
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            _parse_only(
                lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), monkeypatch, capsys, what
            )
    elif argv[0] == "delib":
        from delib_jax import cli

        _parse_only(lambda: cli.main(argv[1:]), monkeypatch, capsys, what)
    elif argv[0] in (".", "source", "pip"):
        return  # set-up: test_install_commands_unchanged
    elif argv[0] == "bash":
        assert (ROOT / argv[1]).is_file(), f"{what}: no file {argv[1]} in the repository"
    else:
        assert shutil.which(argv[0]), f"{what}: no program {argv[0]!r} (nor a check for it in tests/test_readme.py)"


@pytest.mark.parametrize("page", [pytest.param(p, id=_name(p)) for p in _pages_with(("bash", "sh", "shell"))])
def test_shell_blocks_name_real_commands_and_options(page, monkeypatch, capsys, pytestconfig):
    commands = [c for _, code in code_blocks(page, ("bash", "sh", "shell")) for c in shell_commands(code)]
    assert commands
    for argv in commands:
        check_command(argv, monkeypatch, capsys, pytestconfig)


@pytest.mark.parametrize(
    "argv",
    [
        ["delib", "explain", "photos/", "--out", "x"],  # --checkpoint missing
        ["delib", "explian", "photos/"],
        ["python", "-m", "train.cub", "--synthetic", "--out", "x", "--no-such-flag"],
        ["python", "-m", "eval.cub", "--checkpoint"],
        ["python", "-m", "pytest", "-q", "-m", "not quick"],
        ["bash", "benchmarks/no_such_script.sh"],
        ["no-such-program-here", "--help"],
    ],
)
def test_shell_check_fails_on_wrong_commands(argv, monkeypatch, capsys, pytestconfig):
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_command(argv, monkeypatch, capsys, pytestconfig)


def test_shell_check_accepts_right_commands(monkeypatch, capsys, pytestconfig):
    for argv in (
        ["delib", "explain", "photos/", "--checkpoint", "r", "--out", "x"],
        ["python", "-m", "train.cub", "--synthetic", "--out", "x"],
        ["python", "-m", "delib_jax.data.tfds", "build", "cub", "--manual-dir", "m", "--data-dir", "d"],
    ):
        check_command(argv, monkeypatch, capsys, pytestconfig)


def test_install_commands_unchanged():
    blocks = [code.strip() for _, code in code_blocks(ROOT / "README.md", ("bash",))]
    assert blocks[0] == INSTALL
    assert 'pip install -e ".[test]"' in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ links


def links(path: Path) -> list[str]:
    """The targets of the page's relative links (web addresses and anchors left out), without their anchors."""
    targets = [t.split("#")[0] for t in LINK.findall(path.read_text(encoding="utf-8"))]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", [pytest.param(p, id=_name(p)) for p in PAGES])
def test_links_resolve(page):
    missing = [t for t in links(page) if not (page.parent / t).exists()]
    assert not missing, f"{_name(page)} links to missing files: {missing}"


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        todo += [(page.parent / t).resolve() for t in links(page) if t.endswith(".md")]
    unreachable = [_name(p) for p in PAGES if p.resolve() not in seen]
    assert not unreachable, f"not reachable from README.md by links: {unreachable}"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 120
