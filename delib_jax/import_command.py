"""``delib import WEIGHTS --arch ARCH --out RUN``: a run folder from a torchvision state dict, so that the classifier
you already have is explained like a trained run.

    delib import resnet50.pth --arch resnet50 --out runs/imagenet              # ImageNet-1k's 1,000 classes
    delib import birds.safetensors --arch resnet50 --classes names.txt --out runs/birds
    delib explain photos/ --checkpoint runs/imagenet --out explained/         # difficulty: entropy

The weights (.pth / .pt read with torch's weights_only loader, .safetensors or .npz; `read_state_dict`) are loaded
exactly into ``create_model(ARCH, C, hardness='none')`` (every key of the architecture, its last Linear included;
`load_torchvision`), and RUN is written as `delib_jax.checkpoint.write_run` writes a run: config.json (the class
names, the preprocessing, ``imported_from``: the weights file, ``dataset``: null, ``hardness``: 'none') and a 'best'
checkpoint. C is the number of outputs of the weights' last Linear; the class names are ImageNet-1k's (torchvision's,
shipped with the package) unless --classes names a file with one name per line. Preprocessing: the architecture's
torchvision evaluation (shorter side to ``ArchSpec.resize``, centre crop ``ArchSpec.crop``, ImageNet mean and std),
each overridable. Everything is checked before RUN is touched, and RUN is written as a temporary folder beside it,
renamed at the end: an error leaves nothing behind.

An imported run has no hardness predictor: explain it with ``--score entropy`` or ``--score hesitancy`` (what
``delib explain`` uses by default for such a run), or train one with ``python -m train.hardness --checkpoint RUN``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from delib_jax._command import Command, UsageError

DESCRIPTION = __doc__
TRAINED_ONLY = ("small",)  # this library's own CNN for synthetic data: no torchvision counterpart


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", metavar="WEIGHTS", help="a torchvision state dict: .pth / .pt, .safetensors or .npz")
    p.add_argument("--arch", required=True, help="its torchvision architecture, e.g. resnet50, vgg16, vit_b_16")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder to write (must not exist, or be "
                   "empty, unless --force)")  # fmt: skip
    p.add_argument("--classes", metavar="FILE", help="class names, one a line in class-index order (default: "
                   "ImageNet-1k's 1,000, as torchvision names them)")  # fmt: skip
    p.add_argument("--resize", type=int, metavar="N", help="shorter side before the centre crop (default: the "
                   "architecture's torchvision value, scaled with --crop)")  # fmt: skip
    p.add_argument("--crop", type=int, metavar="N", help="centre crop, the network's input side (default: the "
                   "architecture's torchvision value, 224)")  # fmt: skip
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel mean of RGB in [0, 1] (default: ImageNet's 0.485 0.456 0.406)")  # fmt: skip
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel standard deviation (default: ImageNet's 0.229 0.224 0.225)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace RUN_DIR when it exists and is not empty")


def read_class_names(path: str | Path) -> list[str]:
    """One class name a line (surrounding spaces and trailing empty lines dropped); `UsageError` (one line) for a
    file that cannot be read, is empty, has an empty line among the names or a name twice."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"--classes {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"--classes {path} cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or e})"
        ) from None
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise UsageError(f"--classes {path} holds no class names (one name a line)")
    if "" in names:
        raise UsageError(f"--classes {path}: line {names.index('') + 1} is empty (one class name a line, none empty)")
    first: dict[str, int] = {}
    for line, name in enumerate(names, 1):
        if name in first:
            shown = name if len(name) <= 60 else name[:55] + " ..."
            raise UsageError(f"--classes {path} names {shown!r} twice (lines {first[name]} and {line}): class names "
                             "must be unique")  # fmt: skip
        first[name] = line
    return names


def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise UsageError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not force:
            what = "a run folder" if (out / "config.json").exists() else "a folder that is not empty"
            raise UsageError(f"--out {out} is {what}: choose another folder, or replace it with --force")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise UsageError(
            f"--out {out} cannot be created: {parent} is {'a file' if not parent.is_dir() else 'not writable'}"
        )


def _preprocessing(args: argparse.Namespace, spec) -> dict:
    """resize, crop, mean, std: the architecture's torchvision evaluation unless given; a --crop alone scales the
    default resize with it (256 / 224 for most architectures)."""
    from delib_jax.data.transforms import IMAGENET_STATS

    crop = spec.crop if args.crop is None else args.crop
    if args.resize is not None:
        resize = args.resize
    else:
        resize = spec.resize if args.crop is None else max(crop, round(crop * spec.resize / spec.crop))
    mean = IMAGENET_STATS.mean if args.mean is None else tuple(args.mean)
    std = IMAGENET_STATS.std if args.std is None else tuple(args.std)
    return {"resize": resize, "crop": crop, "mean": mean, "std": std}


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _keys_summary(name: str, arch: str, expected: set[str], found: set[str]) -> str:
    """One line: the state dict is not torchvision's ``arch`` (counts and first keys missing / not expected)."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {arch}'s {len(expected)} keys missing ({', '.join(missing[:3])}"
                     f"{', ...' if len(missing) > 3 else ''})")  # fmt: skip
    if unexpected:
        parts.append(f"{len(unexpected)} keys {arch} does not have ({', '.join(unexpected[:3])}"
                     f"{', ...' if len(unexpected) > 3 else ''})")  # fmt: skip
    return f"{name} is not a torchvision {arch} state dict: {'; '.join(parts)}; is --arch right?"


def _output_key(abstract) -> str:
    """The torch key of the weight of ``abstract``'s last class-head Linear (C outputs)."""
    from delib_jax.models.weights import output_layer, torchvision_entries

    try:
        last = ("classifier", *output_layer(abstract.classifier))
    except AttributeError:  # a head that does not say: its last Linear
        last = ("classifier",)
    keys = [
        k for k, path, kind in torchvision_entries(abstract) if path[: len(last)] == last and kind.startswith("linear")
    ]
    return keys[-1]


def loaded_model(arch: str, num_classes: int, state: dict):
    """``create_model(arch, num_classes, hardness='none')`` with the torchvision state dict ``state`` loaded
    (`load_torchvision`: every key, exactly; ValueError naming what does not fit).

    The model is made as shapes (``nnx.eval_shape``) and filled from ``state``: a random initialisation would be
    overwritten anyway, and compiles one program per parameter shape (17 s of a resnet18's import on the 2-core
    CPU). The few variables no torchvision key fills (a dropout's random stream) are made by one compiled
    initialisation that computes nothing else."""
    import jax
    from flax import nnx

    from delib_jax.models import create_model, load_torchvision

    def make():
        return create_model(arch, num_classes, hardness="none")

    model = load_torchvision(nnx.eval_shape(make), state)
    graphdef, variables = nnx.split(model)
    leaves, treedef = jax.tree.flatten(variables)
    unset = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unset:
        fresh = jax.jit(lambda: [jax.tree.leaves(nnx.state(make()))[i] for i in unset])()
        for i, value in zip(unset, fresh):
            leaves[i] = value
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    model.eval()
    return model


def import_run(args: argparse.Namespace, report=print) -> Path:
    """The command's work (module docstring): checks everything, then writes RUN; returns its path."""
    out = Path(args.out)
    weights = Path(args.weights)
    # cheap checks first, before JAX is even imported: the folder, the class names, the weights file
    _check_out(out, args.force)
    names = read_class_names(args.classes) if args.classes else None
    if not weights.is_file():
        raise UsageError(f"weights file {weights} not found" if not weights.exists() else f"{weights} is not a file")

    from flax import nnx

    from delib_jax.checkpoint import RunConfig, imagenet_class_names, write_run
    from delib_jax.models import ARCHS, create_model
    from delib_jax.models.weights import read_state_dict

    importable = [a for a in ARCHS if a not in TRAINED_ONLY]
    if args.arch not in importable:
        why = "has no torchvision counterpart (train it: python -m train.cub)" if args.arch in ARCHS else "is unknown"
        raise UsageError(f"--arch {args.arch} {why}; choose one of {', '.join(importable)}")
    spec = ARCHS[args.arch]
    pre = _preprocessing(args, spec)
    if getattr(spec, "fixed_size", False) and pre["crop"] != spec.default_size:
        size = spec.default_size
        raise UsageError(f"--crop {pre['crop']}: {args.arch} takes only {size} px inputs: give --crop {size} or "
                         "leave it out")  # fmt: skip
    try:  # the preprocessing as a run checks it (crop <= resize, a crop the backbone takes, mean / std), classes aside
        RunConfig(arch=args.arch, num_classes=2, class_names=["a", "b"], hardness="none", dataset=None, **pre)
    except ValueError as e:
        raise UsageError(str(e).replace("invalid run configuration: ", "invalid preprocessing: ")) from None

    try:
        state = read_state_dict(weights)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    abstract = nnx.eval_shape(lambda: create_model(args.arch, 2, hardness="none"))
    from delib_jax.models.weights import torchvision_entries

    expected = {k for k, _, _ in torchvision_entries(abstract)}
    found = {k for k in state if not k.endswith("num_batches_tracked")}
    if expected != found:
        raise UsageError(_keys_summary(weights.name, args.arch, expected, found))
    key = _output_key(abstract)
    if state[key].ndim != 2 or state[key].shape[0] < 2:
        raise UsageError(f"{weights.name}: the classifier's {key} has shape {tuple(state[key].shape)}, not "
                         "(classes >= 2, features)")  # fmt: skip
    num_classes = int(state[key].shape[0])
    if names is None:
        names = imagenet_class_names()
        if num_classes != len(names):
            raise UsageError(f"the weights' classifier has {num_classes} outputs, not ImageNet-1k's {len(names)}: "
                             "give their class names with --classes FILE (one a line)")  # fmt: skip
    elif len(names) != num_classes:
        raise UsageError(f"{Path(args.classes).name} has {len(names)} names, the weights' classifier has "
                         f"{num_classes} outputs")  # fmt: skip

    try:
        model = loaded_model(args.arch, num_classes, state)
    except ValueError as e:  # mis-shaped keys: another width or depth of the family
        reason = str(e).split(" (is this a torchvision state dict")[0]
        raise UsageError(_short(f"{weights.name}: {reason}") + "; is --arch right?") from None
    config = RunConfig(
        arch=args.arch, num_classes=num_classes, class_names=names, hardness="none", dataset=None,
        imported_from=str(weights.resolve()), **pre,
    )  # fmt: skip
    _write_atomically(out, lambda folder: write_run(folder, model, config, meta={"imported_from": str(weights)}),
                      force=args.force)  # fmt: skip
    classes = "ImageNet-1k's 1,000 classes" if not args.classes else f"{num_classes} classes of {args.classes}"
    report(f"delib import: {args.arch} with {classes} from {weights} -> {out} (resize {pre['resize']}, crop "
           f"{pre['crop']}, no hardness predictor); explain with: delib explain IMAGES --checkpoint {out} "
           "--out OUT")  # fmt: skip
    return out


def _write_atomically(out: Path, write, *, force: bool) -> None:
    """``write(folder)`` into a temporary folder beside ``out``, then renamed onto it (an existing ``out`` -- empty,
    or any with ``force`` -- is moved aside first and removed once the new one is in place); on any failure nothing
    is left: neither the temporary folder nor a changed ``out``."""
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700 folders: RUN gets the permissions of a folder made by mkdir
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created ({e.strerror or e}); choose another folder") from None
    old = None
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=parent))
            os.replace(out, old / "run")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / "run", out)  # the previous folder back
            raise
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    import_run(args, report=lambda line: print(line, file=sys.stderr))
    return 0


COMMAND = Command("import", "a run folder from a torchvision state dict (a classifier trained elsewhere)",
                  DESCRIPTION, _configure, _run)  # fmt: skip

__all__ = ["COMMAND", "TRAINED_ONLY", "import_run", "read_class_names"]
