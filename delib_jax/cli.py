"""The ``delib`` command: one subcommand per task, registered in `COMMANDS`.

    delib explain photos/ --checkpoint runs/cub_vgg16 --out explained/
    delib explain a.jpg b.png --checkpoint runs/cub_vgg16 --out explained/ --coverage 30% --max-insecurities 3

A subcommand is a `Command` (name, help, how to add its arguments, what to run) added with `register`; ``main``
builds the parser from the registry. Errors a user can fix print one line and exit with 2; nothing explained exits 1.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from delib_jax._entry import exit_process  # noqa: F401  (re-exported: the entry points' exit)


class UsageError(Exception):
    """A problem the user can fix (bad option, missing file): printed as one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    """A ``delib`` subcommand: ``configure`` adds its arguments, ``run`` gets the parsed namespace, returns the exit
    status (raising `UsageError` for a one-line error with status 2)."""

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a subcommand to `COMMANDS` (names are unique)."""
    if command.name in COMMANDS:
        raise ValueError(f"a delib subcommand named {command.name!r} is already registered")
    COMMANDS[command.name] = command
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delib", description="Deliberative explanations (Wang & Vasconcelos, NeurIPS 2019) in JAX."
    )
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.configure(p)
        p.set_defaults(command=command)
    return parser


def console() -> None:
    """The ``delib`` console script: `main`, then `exit_process` (Ctrl-C at any moment: one line, 130)."""
    from delib_jax._entry import delib

    delib()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``delib`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2)
        return int(e.code or 0)
    try:
        return int(args.command.run(args))
    except UsageError as e:
        print(f"delib {args.command_name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"delib {args.command_name}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------------ delib explain

EXPLAIN_DESCRIPTION = """\
Explain images with a trained model: per image the prediction, its difficulty, and the insecurities (regions where
the network hesitated between two classes, ranked by strength).

Writes OUT/insecurities.json (every explanation; masks run-length encoded), OUT/figures/*.png (a figure per image)
and OUT/index.html (an offline report, sortable by difficulty and prediction). Images are resized and centre-cropped
as the run was evaluated. Unreadable files are reported and skipped. Each finished image is recorded in
OUT/progress.jsonl at once: run the same command again after a crash or kill and it resumes where it stopped.

example:
  delib explain photos/ --checkpoint runs/cub_vgg16 --out explained/ --coverage 10%
"""


def _fraction(text: str) -> float:
    """'0.1' or '10%' -> 0.1."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or 10%, got {text!r}") from None


def _top_n(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of classes or 'all', got {text!r}") from None


def _configure_explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders searched recursively")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="training run directory (config.json)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (created)")
    p.add_argument("--which", choices=("best", "latest"), default="best", help="checkpoint to load (default: best)")
    p.add_argument(
        "--method",
        choices=("gradient_hessian", "gradient", "integrated_gradients"),
        default="gradient_hessian",
        help="attribution method (default: gradient_hessian, Eq. 2)",
    )
    p.add_argument(
        "--score",
        choices=("hardness", "entropy", "hesitancy"),
        default="hardness",
        help="difficulty score (default: hardness; needs a model with a hardness predictor)",
    )
    p.add_argument(
        "--top-n",
        type=_top_n,
        default=5,
        metavar="N",
        help="classes considered: the N most probable, or 'all' (default: 5)",
    )
    p.add_argument("--k", type=int, default=3, help="candidate classes per location, 2 <= k <= N (default: 3)")
    p.add_argument(
        "--difficulty-channels",
        choices=("positive", "signed"),
        default="positive",
        help="difficulty map from the channels that make the prediction harder (the authors', default) or from all "
        "channels (Eq. 2 as written)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--coverage",
        type=_fraction,
        default=None,
        help="fraction of the image each insecurity covers, 1%%..90%% (default: 10%%)",
    )
    group.add_argument("--threshold", type=float, default=None, help="a value threshold on the ambiguity maps instead")
    p.add_argument("--max-insecurities", type=int, default=4, metavar="Q", help="per image (default: 4)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step, over all devices (default: 32)")
    p.add_argument(
        "--examples",
        metavar="JSON",
        help="JSON object: class name (or index) -> example image path (relative to the JSON file); "
        "shown next to each insecurity",
    )
    p.add_argument(
        "--study",
        action="store_true",
        help="also write a human study (OUT/study: questions.json, answer_key.json); needs --examples",
    )
    p.add_argument("--no-figures", action="store_true", help="skip the per-image figures (faster)")


def _check_explain_args(args: argparse.Namespace) -> None:
    if args.coverage is not None and not 0.01 <= args.coverage <= 0.90:
        raise UsageError(f"--coverage must lie between 1% and 90% (0.01..0.9), got {args.coverage:g}")
    if args.k < 2:
        raise UsageError(f"--k must be at least 2 (insecurities are pairs of classes), got {args.k}")
    if args.top_n is not None and args.top_n < args.k:
        raise UsageError(f"--top-n ({args.top_n}) must be at least --k ({args.k})")
    if args.max_insecurities < 1:
        raise UsageError(f"--max-insecurities must be at least 1, got {args.max_insecurities}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint directory {args.checkpoint} does not exist (give a training run directory)")
    if args.study and not args.examples:
        raise UsageError("--study needs --examples (an example image per class)")
    check_out_dir(args.out)


def check_out_dir(out: str | Path, flag: str = "--out") -> None:
    """Refuse early an output folder that cannot be created: it, or the nearest existing folder above it, is a file
    or not writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a directory")
    parent = next((p for p in [path, *path.absolute().parents] if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        why = "is a file" if not parent.is_dir() else "is not writable"
        raise UsageError(f"{flag} {out} cannot be created: {parent} {why}; choose another folder")


def make_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Create the output folder, a failure (permissions, a read-only or virtual file system) as one line."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {out} cannot be created ({e.strerror or e}); choose another folder") from None
    return path


def image_files(inputs: Iterable[str], report: Callable[[str], None], missing: list[Path] | None = None) -> list[Path]:
    """Files named directly, plus image files (by extension) found recursively in folders, in sorted order, each once.
    Inputs that do not exist are left out and reported (or appended to ``missing``); repeated files are reported."""
    from PIL import Image

    extensions = {e.lower() for e in Image.registered_extensions()}
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = [
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in extensions
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            files.extend(sorted(found))
        elif path.is_file():
            files.append(path)
        elif missing is not None:
            missing.append(path)  # the caller reports them
        else:
            report(f"skipping {path}: no such file or directory")
    unique: dict[Path, Path] = {}
    for path in files:
        key = path.resolve()
        if key in unique:
            report(f"{path} is given more than once: explained once")
        else:
            unique[key] = path
    return list(unique.values())


def _read_examples(path: str | None, class_names: Sequence[str]) -> dict:
    """--examples: class index -> example image path; every entry checked now (a string naming a readable image)."""
    from delib_jax.explanation import ImageReadError, read_image

    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read --examples {path}: {e}") from None
    except RecursionError:
        raise UsageError(f"cannot read --examples {path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise UsageError(f"--examples {path} must hold a JSON object: class name -> image path")
    base, index = Path(path).parent, {n: i for i, n in enumerate(class_names)}
    examples = {}

    def shown(x) -> str:  # a key or value of an untrusted file, kept short
        text = repr(x) if not isinstance(x, (list, dict)) else type(x).__name__
        return text if len(text) <= 60 else text[:55] + " ..."

    for key, value in data.items():
        if key in index:
            c = index[key]
        elif key.isdecimal() and len(key) <= 9 and int(key) < len(class_names):
            c = int(key)
        else:
            raise UsageError(f"--examples: {shown(key)} is not a class of this model")
        if not isinstance(value, str) or not value:
            raise UsageError(
                f"--examples {path}: class {shown(key)} must map to an image path (a string), got {shown(value)}"
            )
        try:
            read_image(base / value)
        except ImageReadError as e:
            raise UsageError(f"--examples {path}: class {shown(key)}: {e}") from None
        examples[c] = base / value
    return examples


def _batches(files: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield list(files[start : start + size])


def _figure_name(index: int, path: Path) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.stem)[:60]
    return f"figures/{index:05d}_{stem}.png"


PROGRESS_FILE = "progress.jsonl"
_IMAGE_HINT = (".jpg", ".png", ".tif", ".bmp", ".webp")


def _valid_record(line: str, figures: bool, out: Path) -> dict | None:
    """A progress line as a record, or None if it is not one (torn, not JSON, missing fields, NaN values, or its
    figure gone)."""
    from delib_jax.explanation import Explanation

    try:
        record = json.loads(line)
        if not (isinstance(record, dict) and isinstance(record.get("source"), str)):
            return None
        if not Explanation.from_json(record).is_finite():
            return None
        json.dumps(record, allow_nan=False)  # NaN / Infinity in any other field: not a record we wrote
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    figure = record.get("figure")
    if figures and not (isinstance(figure, str) and (out / figure).is_file()):
        return None
    return record


def _read_progress(path: Path, header: dict, report: Callable[[str], None]) -> list[dict]:
    """Records of a previous, interrupted run into the same folder. Damaged lines (a torn last line, a line that is
    not a complete record, NaN values) are dropped, with a note, and the file rewritten without them: their images
    are explained again.

    A folder explained with another model or other settings is refused rather than mixed."""
    from delib_jax.explanation import atomic_write

    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path} ({e}); delete it to start afresh") from None
    try:
        previous = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        previous = None
    if previous != header:
        raise UsageError(
            f"{path.parent} holds explanations made with another checkpoint or other settings "
            f"({path.name}); choose another --out or delete that file"
        )
    records, dropped = [], 0
    for line in lines[1:]:
        record = _valid_record(line, bool(header.get("figures")), path.parent)
        if record is None:
            dropped += bool(line.strip())
        else:
            records.append(record)
    if dropped:
        report(f"{path}: dropped {dropped} damaged line(s) (torn, incomplete or NaN); their images are explained again")
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in [header, *records])
        atomic_write(path, lambda f: f.write(text), binary=False)
    return records


def _size_note(path: Path, width: int, height: int, resize: int, crop: int) -> str | None:
    """A one-line note for an image the evaluation transform treats badly: far smaller than the crop (blown up), or
    so elongated that the centre crop keeps a small part of it; None for ordinary images."""
    from PIL import Image

    notes = []
    if width * height > Image.MAX_IMAGE_PIXELS:
        notes.append(f"{width * height / 1e6:.3g} megapixels, slow to read")
    if min(width, height) < crop / 4:
        notes.append(f"far smaller than the {crop}-pixel crop, blown up")
    kept = (crop / resize) ** 2 * min(width, height) / max(width, height)
    if kept < 0.2:
        notes.append(f"the centre crop keeps {kept * 100:.2g}% of it")
    return f"note: {path} ({width}x{height}): " + "; ".join(notes) if notes else None


def _check_finite(items: Sequence, checkpoint: str) -> None:
    """Stop before recording explanations with NaN/inf values (a diverged or damaged model): they would poison the
    progress file and the JSON outputs."""
    bad = [str(e.source) for e in items if not e.is_finite()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UsageError(
            f"the model's outputs are not finite (NaN/inf) for {shown}: the checkpoint {checkpoint} is broken, retrain"
        )


def _run_explain(args: argparse.Namespace) -> int:
    _check_explain_args(args)
    import jax
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from delib_jax import explanation as ex
    from delib_jax.checkpoint import load_model
    from delib_jax.report import write_human_study, write_report
    from delib_jax.visualize import save_figure

    def report(message: str) -> None:
        tqdm.write(f"delib explain: {message}", file=sys.stderr)

    try:
        model, config = load_model(args.checkpoint, which=args.which)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot load a model from {args.checkpoint}: {e}") from None
    if args.k > (config.num_classes if args.top_n is None else min(args.top_n, config.num_classes)):
        raise UsageError(f"--k ({args.k}) exceeds the classes considered (the model has {config.num_classes})")
    examples = _read_examples(args.examples, config.class_names)
    mesh = ex.batch_mesh()
    try:
        explain_fn, settings = ex.make_explain_fn(
            model, method=args.method, score=args.score, top_n=args.top_n, k=args.k, coverage=args.coverage,
            threshold=args.threshold, max_insecurities=args.max_insecurities, mesh=mesh,
            difficulty_channels=args.difficulty_channels,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None

    missing: list[Path] = []
    files = image_files(args.inputs, report, missing)
    if len(missing) == len(args.inputs):
        raise UsageError(f"no such file or directory: {', '.join(map(str, missing))} (give images or folders)")
    if not files:
        given = ", ".join(str(p) for p in args.inputs if Path(p) not in missing)
        raise UsageError(f"no image files in {given} (looked for {', '.join(_IMAGE_HINT)}, ... recursively)")
    for path in missing:
        report(f"skipping {path}: no such file or directory")
    out = make_out_dir(args.out)
    batch = -(-args.batch_size // mesh.size) * mesh.size  # a multiple of the device count
    skipped = [{"path": str(p), "reason": f"{p}: no such file or directory"} for p in missing]
    records, figures = [], []
    # Every finished image is appended to OUT/progress.jsonl at once: a killed run resumes without redoing them.
    header = json.loads(json.dumps({  # as it reads back from the file
        "checkpoint": str(Path(args.checkpoint).resolve()), "which": args.which, "settings": settings.to_json(),
        "figures": not args.no_figures,
    }))
    progress = out / PROGRESS_FILE
    if args.study:  # the study samples from every explanation of this run: start afresh
        progress.unlink(missing_ok=True)
    records.extend(_read_progress(progress, header, report))
    figures.extend(r.get("figure") for r in records)
    used_figures = set(figures)
    total = len(files) + len(missing)  # before the files explained by an earlier run are left out
    if records:
        done = {r.get("source") for r in records}
        files = [f for f in files if str(f) not in done]
        report(f"resuming: {len(records)} images already explained in {out}, {len(files)} to go")
    if not progress.is_file():
        progress.write_text(json.dumps(header) + "\n")
    progress_log = progress.open("a", encoding="utf-8")
    # Large images (over Pillow's 89-megapixel warning limit, under its error limit) are read without a warning.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    def load(path: Path):
        try:
            image = ex.read_image(path)
            note = _size_note(path, image.width, image.height, config.resize, config.crop)
            pixels = ex.preprocess(image, resize=config.resize, crop=config.crop, normalization=config.normalization)
            return (*pixels, note)
        except ex.ImageReadError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 -- a decoder failing in an unexpected way: skip the file, say why
            return f"{path}: cannot read image ({type(e).__name__}: {e})"

    def figure_name(path: Path) -> str:
        index = len(records)
        while (name := _figure_name(index, path)) in used_figures:  # kept records of a resumed run hold theirs
            index += 1
        used_figures.add(name)
        return name

    def explained() -> Iterator[tuple[ex.Explanation, np.ndarray]]:
        with (
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
            tqdm(total=len(files), unit="img", desc="explain", file=sys.stderr, disable=None) as bar,
        ):
            for paths in _batches(files, batch):
                good, pixels, inputs = [], [], []
                for path, result in zip(paths, pool.map(load, paths)):
                    if isinstance(result, str):
                        report(f"skipping {result}")
                        skipped.append({"path": str(path), "reason": result})
                    else:
                        if result[2]:
                            report(result[2])
                        good.append(path)
                        pixels.append(result[0])
                        inputs.append(result[1])
                if good:
                    x = np.stack(inputs + [inputs[-1]] * (batch - len(inputs)))  # pad: one compiled shape
                    outputs = jax.tree.map(operator.itemgetter(slice(0, len(good))), explain_fn(x))  # drop padding
                    items = ex.to_explanations(
                        outputs, settings, class_names=config.class_names, sources=[str(p) for p in good]
                    )
                    _check_finite(items, args.checkpoint)
                    for e, pix in zip(items, pixels):
                        figure = None
                        if not args.no_figures:
                            figure = figure_name(Path(e.source))
                            save_figure(e, pix, out / figure, examples=examples)
                        records.append({**e.to_json(), "figure": figure})
                        figures.append(figure)
                        progress_log.write(json.dumps(records[-1], allow_nan=False) + "\n")
                        progress_log.flush()
                        yield e, pix
                bar.update(len(paths))

    stream = explained()
    with progress_log:
        if args.study:
            choices = min(5, config.num_classes)
            study = write_human_study(
                out / "study", stream, examples, class_names=config.class_names, num_choices=choices
            )
            count = len(json.loads(study["questions"].read_text(encoding="utf-8")))
            report(
                f"human study: {count} questions of {choices} choices in {out / 'study'}"
                + ("" if count else f" (each needs {choices} classes with an example image)")
            )
        else:
            for _ in stream:
                pass

    if not records:
        report(f"nothing could be explained ({len(skipped)} unreadable or missing of {total} files)")
        return 1
    meta = {
        "checkpoint": str(args.checkpoint), "which": args.which, "arch": config.arch,
        "crop": config.crop, "resize": config.resize, "settings": settings.to_json(),
    }  # fmt: skip
    ex.write_json(
        out / "insecurities.json",
        {**meta, "class_names": list(config.class_names), "skipped": skipped, "images": records},
    )
    shown = {
        "method": settings.method,
        "score": settings.score,
        "top_n": settings.top_n or "all",
        "k": settings.k,
        "coverage": settings.coverage,
        "threshold": settings.threshold,
    }
    write_report(out, records, figures, settings={k: v for k, v in shown.items() if v is not None})
    print(f"explained {len(records)} of {total} images ({len(skipped)} skipped) -> {out}", file=sys.stderr)
    return 0


register(
    Command("explain", "explain images with a trained model", EXPLAIN_DESCRIPTION, _configure_explain, _run_explain)
)

# Further subcommands register themselves on import.
from delib_jax import demo as _demo  # noqa: E402,F401  (delib demo)

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "check_out_dir", "main", "make_out_dir", "register"]

if __name__ == "__main__":  # python -m delib_jax.cli: run the imported module, where the subcommands registered
    from delib_jax.cli import console

    console()
