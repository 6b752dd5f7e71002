"""``python -m delib_jax.data.tfds build cub|ade20k --manual-dir RELEASE --data-dir OUT [--resize [N]]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from delib_jax.data._text import DatasetError

DESCRIPTION = """\
Build CUB-200-2011 or ADE20K (ADEChallengeData2016) as a TensorFlow Datasets build (ArrayRecord shards, no
TensorFlow) from the official release folder, carrying everything delib_jax uses. Give OUT as --data-dir to
python -m train.*, eval.*, benchmarks.pipeline and delib demo.

examples:
  python -m delib_jax.data.tfds build cub --manual-dir /data/CUB_200_2011 --data-dir /data/tfds --resize
  python -m delib_jax.data.tfds build ade20k --manual-dir /data/ADEChallengeData2016 --data-dir /data/tfds"""


def build_parser() -> argparse.ArgumentParser:
    from delib_jax.data.tfds._builders import DEFAULT_QUALITY, DEFAULT_RESIZE

    p = argparse.ArgumentParser(
        prog="python -m delib_jax.data.tfds",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build",
        help="build a dataset from its release folder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("dataset", choices=("cub", "ade20k"))
    b.add_argument(
        "--manual-dir",
        type=Path,
        required=True,
        metavar="RELEASE",
        help="the release folder: CUB_200_2011 or ADEChallengeData2016 (or its parent)",
    )
    b.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        metavar="OUT",
        help="TFDS data directory to write into (OUT/delib_cub/CONFIG/1.0.0)",
    )
    b.add_argument(
        "--resize",
        type=int,
        nargs="?",
        const=DEFAULT_RESIZE,
        metavar="N",
        help=f"store images with a shorter side above N px resized to N (default N {DEFAULT_RESIZE}) as "
        "JPEG; without it the release's files are stored as they are",
    )
    b.add_argument(
        "--quality",
        type=int,
        help=f"JPEG quality of resized images (default {DEFAULT_QUALITY})",
    )
    b.add_argument("--threads", type=int, help="decoding / encoding threads (default: the CPU count)")
    return p


def run(args: argparse.Namespace) -> int:
    from delib_jax.data.tfds._builders import DEFAULT_QUALITY

    if args.resize is not None and args.resize < 1:
        raise ValueError(f"--resize must be >= 1, got {args.resize}")
    if args.quality is None:
        args.quality = DEFAULT_QUALITY
    elif args.resize is None:
        raise ValueError("--quality sets the JPEG quality of resized images: give it with --resize")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must lie in [1, 100], got {args.quality}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not args.manual_dir.is_dir():
        raise ValueError(f"--manual-dir {args.manual_dir}: no such folder (give the {args.dataset} release folder)")
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is a file: give a folder")
    from delib_jax.data.ade20k import find_ade20k_root
    from delib_jax.data.cub import find_cub_root
    from delib_jax.data.tfds import build, build_path

    target = build_path(args.dataset, args.data_dir, resize=args.resize, quality=args.quality)
    if not (target / "dataset_info.json").is_file():
        root = (find_cub_root if args.dataset == "cub" else find_ade20k_root)(args.manual_dir)  # a wrong folder: error
        print(f"building {target} from {root}", file=sys.stderr)
    found, built = build(args.dataset, args.manual_dir, args.data_dir, resize=args.resize, quality=args.quality,
                         num_threads=args.threads, progress=True)  # fmt: skip
    if not built:
        print(f"{found} is already built at {found.path} (delete that folder to build it again)", file=sys.stderr)
    print(f"{found}: {found.path}; train and evaluate with --data-dir {args.data_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input is one line on stderr and exit status 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to build from the start", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from delib_jax._entry import exit_process

    exit_process(main())
