"""The ``delib`` command: one subcommand per task, registered in `COMMANDS`.

    delib explain photos/ --checkpoint runs/cub_vgg16 --out explained/
    delib explain a.jpg b.png --checkpoint runs/cub_vgg16 --out explained/ --coverage 30% --max-insecurities 3

A subcommand is a `Command` (`delib_jax._command`: name, help, how to add its arguments, what to run) listed at the
end of this module; ``main`` builds the parser from `COMMANDS`. Errors a user can fix print one line and exit with 2;
nothing explained exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from delib_jax import demo, figures_command, import_command, verify
from delib_jax._command import Command, UsageError, check_out_dir, make_out_dir
from delib_jax._entry import exit_process  # noqa: F401  (re-exported: the entry points' exit)
from delib_jax._multihost import add_flags, init_distributed

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

Writes OUT/explanations/ (a JSON Lines index with one small record per image, and binary shards with the maps and
masks: read them with delib_jax.load_explanations), OUT/figures/*.png (a figure per image; with --no-figures,
draw them later with delib figures OUT), OUT/index.html (an offline report of the hardest images with thumbnails
in OUT/thumbs/, sortable by difficulty and prediction, and the skipped files), OUT/pairs.html (the class pairs the
model hesitates between most over the whole run) and, with --json and up to
--json-limit images, OUT/insecurities.json (every explanation in one file, maps included). Images are resized and
centre-cropped as the run was evaluated. Unreadable files are reported and skipped. Finished images are recorded
every few seconds: run the same command again after a crash or kill and it resumes where it stopped (files changed
since are explained again).

The difficulty score is the run's hardness predictor; a run without one (delib import) is scored by entropy unless
--score says otherwise.

examples:
  delib explain photos/ --checkpoint runs/cub_vgg16 --out explained/ --coverage 10%
  delib explain --data-dir /data/CUB_200_2011 --split test --checkpoint runs/cub_vgg16 --out explained_test/
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
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files, or folders searched recursively")
    p.add_argument(
        "--data-dir", metavar="DIR", default=None,
        help="explain a split of the run's dataset instead: its release folder or a TFDS build, its class folders, "
        "or the TFDS data folder of its catalog dataset (as for training); records name the dataset, split and "
        "example index",
    )  # fmt: skip
    p.add_argument("--dataset", choices=("cub", "ade20k", "folder"), default=None,
                   help="with --data-dir: what it holds when it is not the run's data (required for a run imported "
                        "from weights): cub, ade20k, or folder (class folders; val and test carved as training "
                        "carves them, 0.1 each, seed 0); its classes must be the run's, or each one of them by "
                        "name")  # fmt: skip
    p.add_argument("--tfds", metavar="NAME[:VERSION]", default=None,
                   help="with --data-dir (a TFDS data folder): a TFDS catalog dataset to explain instead of the run's "
                        "data")  # fmt: skip
    p.add_argument(
        "--split", default="test", metavar="SPLIT",  # delib_jax.job.inputs.SPLITS
        help="with --data-dir: test, train, or for class folders and TFDS catalog datasets also val (the splits as "
        "the run recorded them; default: test; ADE20K's validation images are its test split)",
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="run directory (config.json): a training run, or one made by delib import")  # fmt: skip
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
        default=None,
        help="difficulty score (default: hardness when the run has a hardness predictor, else entropy, said in one "
        "line)",
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
    p.add_argument(
        "--precision", choices=("float32", "bfloat16"), default="float32",
        help="the backbone's arithmetic; bfloat16 is faster on GPUs, heads and maps stay float32 (default: float32)",
    )  # fmt: skip
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
        "shown next to each insecurity (default: the training image the model finds most typical of each class, "
        "chosen once per run and kept in RUN_DIR/class_examples/, when the training data is reachable)",
    )
    p.add_argument("--no-examples", action="store_true", help="no example images in the figures")
    p.add_argument(
        "--study",
        action="store_true",
        help="also write a human study (OUT/study: questions.json, answer_key.json); needs --examples",
    )
    p.add_argument("--no-figures", action="store_true", help="skip the per-image figures (faster)")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="reader processes decoding images (default: one per CPU core but one; 0: threads)",
    )  # fmt: skip
    p.add_argument(
        "--compilation-cache", metavar="DIR", default=None,
        help="keep compiled programs here for the next run, or 'off' (default: $DELIB_COMPILATION_CACHE or "
        "~/.cache/delib_jax/xla)",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true",
        help="also write OUT/insecurities.json: every explanation in one file, maps included (~60 KB per image)",
    )  # fmt: skip
    p.add_argument(
        "--json-limit", type=int, default=1000, metavar="N",
        help="with --json, write insecurities.json only up to N images (default: 1000)",
    )  # fmt: skip
    p.add_argument(
        "--report-limit", type=int, default=1000, metavar="N",
        help="index.html lists the N hardest images (default: 1000)",
    )  # fmt: skip
    add_flags(p, "process I explains every N-th file from the I-th on and writes its own index and shards into the "
                 "shared --out, process 0 also the report")  # fmt: skip


def _check_explain_args(args: argparse.Namespace) -> None:
    if bool(args.inputs) == bool(args.data_dir):
        raise UsageError("give image files or folders, or --data-dir DIR (a dataset's split), not both"
                         if args.inputs else "give image files or folders to explain, or --data-dir DIR")  # fmt: skip
    if (args.dataset or args.tfds) and not args.data_dir:
        raise UsageError(f"--{'dataset' if args.dataset else 'tfds'} says what --data-dir holds: give --data-dir DIR")
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
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    if args.json_limit < 0 or args.report_limit < 1:
        raise UsageError("--json-limit must be 0 or more and --report-limit at least 1")
    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint directory {args.checkpoint} does not exist (give a training run directory)")
    if args.study and not args.examples:
        raise UsageError("--study needs --examples (an example image per class)")
    check_out_dir(args.out)


def image_files(inputs: Iterable[str], report: Callable[[str], None], missing: list[Path] | None = None):
    """Files named directly, plus image files (by extension) found recursively in folders, in sorted order, each once,
    as a `PathList` (flat memory: a few bytes more than the paths' own per file). Inputs that do not exist are left
    out and reported (or appended to ``missing``); repeated files are reported.

    Nothing is kept as a Python object per file: the walk holds one folder's image names at a time, and the files
    met twice are found afterwards from an array of 8-byte hashes of the resolved paths (a set of digests and a
    folder's `os.DirEntry` objects left 30 MB of scattered memory behind at 100,000 files)."""
    from array import array

    import numpy as np
    from PIL import Image

    from delib_jax.job.folder import PathList
    from delib_jax.store import source_hash

    extensions = {e.lower() for e in Image.registered_extensions()}

    def kind(entry: os.DirEntry) -> str:
        """'d' a folder to enter, 'f' an image file, 'l' a link to an image file, '' anything else."""
        if entry.name.startswith("."):
            return ""  # hidden, as Path.rglob
        if entry.is_dir(follow_symlinks=False):
            return "d"
        if os.path.splitext(entry.name)[1].lower() not in extensions:
            return ""
        link = entry.is_symlink()
        return ("l" if link else "f") if entry.is_file() else ""  # a link to a folder is not entered

    def walk(top: str):
        """(path, resolved path) of the image files under ``top``, in the order of sorted Paths (by parts): each
        folder's names sorted and folders entered where they sort, so that no list of all the files is ever
        made. A folder is resolved once; only a file that is itself a link is resolved on its own."""
        try:
            with os.scandir(top) as entries:  # "NAME\0K" sorts as NAME does (no name holds a NUL)
                names = sorted(f"{e.name}\0{k}" for e in entries if (k := kind(e)))
        except OSError:
            return
        real_top = os.path.realpath(top)
        for entry in names:
            name, k = entry[:-2], entry[-1]
            path = os.path.join(top, name)
            if k == "d":
                yield from walk(path)
            else:
                yield path, os.path.realpath(path) if k == "l" else os.path.join(real_top, name)

    def found(name: str):
        path = Path(name)
        if path.is_dir():
            yield from walk(str(path))
        elif path.is_file():
            yield str(path), os.path.realpath(path)
        elif missing is not None:
            missing.append(path)  # the caller reports them
        else:
            report(f"skipping {path}: no such file or directory")

    keys = array("q")  # source_hash of each file's resolved path, in the order met

    def listed():
        for name in inputs:
            for f, real in found(name):
                keys.append(source_hash(real))
                yield f

    every = PathList(listed())
    _, first = np.unique(np.frombuffer(keys, np.int64) if keys else np.zeros(0, np.int64), return_index=True)
    if len(first) == len(every):
        return every
    kept = np.zeros(len(every), bool)
    kept[first] = True
    for i in np.flatnonzero(~kept).tolist():
        report(f"{every.source(i)} is given more than once: explained once")
    return PathList(every.source(i) for i in np.flatnonzero(kept).tolist())


def _score(args: argparse.Namespace, model) -> tuple[str, str | None]:
    """--score, resolved for the run, and a line to say about it (or None): as given; by default 'hardness' where
    the run has a hardness predictor, else 'entropy' (said). --score hardness on a run without one: `UsageError`
    saying what to do instead."""
    if model.hardness_kind != "none":
        return args.score or "hardness", None
    if args.score == "hardness":
        raise UsageError(
            f"--score hardness needs a hardness predictor and {args.checkpoint} has none: pass --score entropy or "
            f"--score hesitancy, or train one with python -m train.hardness --checkpoint {args.checkpoint} ..."
        )
    if args.score is None:
        return "entropy", (f"{args.checkpoint} has no hardness predictor: difficulty scored by entropy (--score "
                           "entropy; --score hesitancy is the other choice)")  # fmt: skip
    return args.score, None


def _explain_data(args: argparse.Namespace, config) -> tuple[str, dict | None]:
    """--dataset / --tfds against the run's data: (the kind to read --data-dir as, its `load_dataset` options: the
    run's where it is the run's data, else the defaults)."""
    if args.tfds and args.dataset:
        raise UsageError("give --dataset or --tfds NAME, not both")
    if args.tfds:
        kind, given = "tfds", {"name": args.tfds}
    elif args.dataset:
        kind, given = args.dataset, None
    elif config.dataset is None:
        source = f" (imported from {config.imported_from})" if config.imported_from else ""
        raise UsageError(f"--data-dir: {args.checkpoint}{source} names no dataset: say what {args.data_dir} holds "
                         "(--dataset folder for class folders, --tfds NAME, --dataset cub or ade20k), or explain "
                         "image files or folders instead")  # fmt: skip
    else:
        return config.dataset, config.data_options
    from delib_jax.data.catalog import names_same

    same = bool(config.data_dir) and Path(args.data_dir).absolute() == Path(config.data_dir).absolute()
    if (
        same
        and kind == config.dataset
        and (kind != "tfds" or names_same(args.tfds, (config.data_options or {}).get("name", "")))
    ):
        return kind, config.data_options  # the run's own data: its splits as training carved them
    return kind, given


def _dataset_inputs(args: argparse.Namespace, config, report: Callable[[str], None]):
    """--data-dir, --split (--dataset, --tfds): the examples of that split of the run's dataset, or of the data
    named (`delib_jax.job.inputs.DatasetInputs`), checked against the model's classes; one line for anything
    wrong."""
    from delib_jax.data import DatasetError, dataset_kind
    from delib_jax.job.inputs import check_classes, dataset_inputs

    kind, options = _explain_data(args, config)
    if not Path(args.data_dir).exists():
        raise UsageError(f"--data-dir {args.data_dir} does not exist (give {dataset_kind(kind).needs})")
    found: list[str] = []  # which form the folder holds: said once the data is known to fit (errors come first)
    try:
        inputs = dataset_inputs(kind, args.data_dir, args.split, options=options, report=found.append)
        note = check_classes(inputs, config.class_names, f"the model of {args.checkpoint}",
                             by_index=config.imported_from is not None)  # fmt: skip
    except DatasetError as e:  # names the folder and what is wrong
        raise UsageError(str(e)) from None
    except (ValueError, OSError) as e:
        raise UsageError(f"--data-dir {args.data_dir}: {e}") from None
    if not len(inputs):
        raise UsageError(f"--data-dir {args.data_dir}: the {kind} data there has no {inputs.split} images")
    for line in found:
        report(line)
    if note:
        report(note)
    report(f"{len(inputs)} {inputs.split} images of {kind} ({inputs.form} in {args.data_dir})")
    return inputs


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


_IMAGE_HINT = (".jpg", ".png", ".tif", ".bmp", ".webp")


def _run_explain(args: argparse.Namespace) -> int:
    _check_explain_args(args)
    from delib_jax import _malloc

    _malloc.bound_heap()  # before the model is loaded (`delib_jax._malloc`)
    from tqdm import tqdm

    from delib_jax import _xla
    from delib_jax._reader import decode
    from delib_jax.checkpoint import check_model_config, load_model
    from delib_jax.class_examples import class_examples
    from delib_jax.explanation import preprocess, read_image
    from delib_jax.job.folder import PathList, inputs_outside
    from delib_jax.job.inputs import RecordPayloads
    from delib_jax.report import write_human_study
    from delib_jax.store import load_explanations, read_manifest, read_records
    from delib_jax.stream import JobError, JobOptions, explain_files

    def report(message: str) -> None:
        tqdm.write(f"delib explain: {message}", file=sys.stderr)

    _xla.compilation_cache(args.compilation_cache)
    init_distributed(args)
    try:
        model, config = load_model(args.checkpoint, which=args.which)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot load a model from {args.checkpoint}: {e}") from None
    try:
        check_model_config(model, config)
    except ValueError as e:
        raise UsageError(f"{args.checkpoint}: {e}") from None
    args.score, score_note = _score(args, model)
    if args.k > (config.num_classes if args.top_n is None else min(args.top_n, config.num_classes)):
        raise UsageError(f"--k ({args.k}) exceeds the classes considered (the model has {config.num_classes})")
    missing: list[Path] = []
    if args.data_dir:
        files = _dataset_inputs(args, config, report)
    else:
        files = image_files(args.inputs, report, missing)
        if len(missing) == len(args.inputs):
            raise UsageError(f"no such file or directory: {', '.join(map(str, missing))} (give images or folders)")
        files = inputs_outside(files, Path(args.out))  # never our own figures
        if not files:
            given = ", ".join(str(p) for p in args.inputs if Path(p) not in missing)
            raise UsageError(f"no image files in {given} (looked for {', '.join(_IMAGE_HINT)}, ... recursively)")
    if args.examples:
        examples = _read_examples(args.examples, config.class_names)
    elif args.no_examples or args.no_figures:
        examples = {}
    elif config.imported_from is not None and not config.data_dir and args.data_dir:
        from delib_jax.data import class_correspondence
        from delib_jax.data import class_names as names_of

        names = list(names_of(files.ds))  # its classes checked against the model's already: the mapping, if any
        mapping, _ = class_correspondence(names, config.class_names, "the data", "the model", by_index=True)
        examples = class_examples(args.checkpoint, model, config, which=args.which, report=report,
                                  data=(files.dataset, args.data_dir, files.options, mapping))  # fmt: skip
    elif config.imported_from is not None and not config.data_dir:
        report(f"no class examples in the figures: {args.checkpoint} was imported (delib import) and has no training "
               "data; give --examples JSON to show some")  # fmt: skip
        examples = {}
    else:  # the training split's most typical image of each class, chosen once per run (delib_jax.class_examples)
        examples = class_examples(args.checkpoint, model, config, which=args.which, report=report)

    if score_note:
        report(score_note)
    out = make_out_dir(args.out)
    options = JobOptions(
        batch_size=args.batch_size, workers=args.workers, figures=not args.no_figures, json=args.json,
        json_limit=args.json_limit, report_limit=args.report_limit,
    )  # fmt: skip
    model_id = {"checkpoint": str(Path(args.checkpoint).resolve()), "which": args.which}
    try:
        summary = explain_files(
            model, config, PathList([*files, *missing]) if missing else files, out, options=options, model_id=model_id,
            examples=examples, report=report,
            method=args.method, score=args.score, top_n=args.top_n, k=args.k, coverage=args.coverage,
            threshold=args.threshold, max_insecurities=args.max_insecurities,
            difficulty_channels=args.difficulty_channels, precision=args.precision,
        )  # fmt: skip
    except KeyboardInterrupt:  # the job kept every finished image: say how many, and how to go on
        kept = sum(1 for _ in read_records(out)) if out.is_dir() else 0
        print(f"delib explain: interrupted; {kept} images explained are kept in {out}: run the same command again "
              "to continue", file=sys.stderr, flush=True)  # fmt: skip
        return 130
    except JobError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # options the explanation refuses
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot write to {out}: {e.strerror or e}") from None
    total = len(files) + len(missing)
    done = summary.explained + summary.resumed
    if args.num_processes is not None and args.num_processes > 1:  # this process's share of the files
        total, share = summary.total, f"process {args.process_id} of {args.num_processes}: "
        if not total:
            report(f"{share}no files in this share ({len(files) + len(missing)} files)")
            return 0
    else:
        share = ""
    if not done:
        report(f"nothing could be explained ({len(summary.skipped)} unreadable or missing of {total} files)")
        return 1
    if args.study and not args.process_id:  # one study, by process 0, of every process's explanations
        choices = min(5, config.num_classes)

        def pairs():
            if args.data_dir:  # a dataset's examples: the pixels as the job read them
                payloads = RecordPayloads(read_manifest(out) or {}, files, report)
                records = {r["source"]: r for r in read_records(out)}
            for e in load_explanations(out):
                if args.data_dir:
                    pixels, _ = decode(payloads(records[e.source]), resize=config.resize, crop=config.crop)
                    if pixels is None:
                        continue
                else:
                    pixels, _ = preprocess(read_image(e.source), resize=config.resize, crop=config.crop,
                                           normalization=config.normalization)  # fmt: skip
                yield e, pixels

        study = write_human_study(out / "study", pairs(), examples, class_names=config.class_names,
                                  num_choices=choices)  # fmt: skip
        count = len(json.loads(study["questions"].read_text(encoding="utf-8")))
        report(
            f"human study: {count} questions of {choices} choices in {out / 'study'}"
            + ("" if count else f" (each needs {choices} classes with an example image)")
        )
    print(f"{share}explained {done} of {total} images ({len(summary.skipped)} skipped) -> {out}", file=sys.stderr)
    return 0


EXPLAIN = Command(
    "explain", "explain images with a trained model", EXPLAIN_DESCRIPTION, _configure_explain, _run_explain
)

# The subcommands, in the order `delib --help` lists them. A new one: a module that builds a `Command` (importing
# `delib_jax._command`, never this module), added here.
for _command in (EXPLAIN, figures_command.COMMAND, import_command.COMMAND, demo.COMMAND, verify.COMMAND):
    register(_command)

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "check_out_dir", "main", "make_out_dir", "register"]

if __name__ == "__main__":  # python -m delib_jax.cli: run the imported module, where the subcommands registered
    from delib_jax.cli import console

    console()
