"""``python -m train.hardness``: a run's hardness head trained alone on its frozen classifier. The classifier's logits
stay bit for bit, the head trains (its validation loss falls), the run's checkpoints and config.json gain it (and a
kill at any point leaves the run loadable), resume after Ctrl-C or a kill is exact, errors are one line."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from delib_jax.checkpoint import RunCheckpoints, RunConfig, load_model, load_run_config, save_run_config
from delib_jax.data import load_cub
from delib_jax.data.synthetic import make_cub
from delib_jax.train.cli import hardness_main
from delib_jax.train.hardness import HARDNESS_DIR, _exchange, _swapped, fit_hardness, head_model
from delib_jax.train.loop import create_train_state

STEPS = dict(steps=30, checkpoint_every=10, eval_every=10, batch_size=4, lr=3e-3)  # a few seconds


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_cub(tmp_path_factory.mktemp("data"), classes=3, images_per_class=8, size=40)


def make_run(path: Path, data: Path, *, hardness: str = "none", num_classes: int = 3, latest: bool = True) -> Path:
    """A run folder as training leaves it (config.json, 'best' and 'latest' with the optimizer state), with an
    untrained small CNN: what an imported run looks like, made in a second."""
    names = list(load_cub(data).class_names)[:num_classes] + [f"extra {i}" for i in range(num_classes - 3)]
    config = RunConfig(
        arch="small", num_classes=num_classes, class_names=names, crop=32, resize=36, hardness=hardness,
        data_dir=str(data), synthetic=True, optimizer="adamw", lr=3e-3, schedule="cosine", batch_size=4, steps=2,
        checkpoint_every=2, seed=1,
    )  # fmt: skip
    state = create_train_state(config, total_steps=2)
    save_run_config(path, config)
    best = {"accuracy": 0.5, "loss": 1.0, "step": 2}
    with RunCheckpoints(path, async_save=False) as ckpt:
        ckpt.save("best", 2, params=state.params, model_state=state.model_state, meta={"best": best})
        if latest:
            ckpt.save("latest", 2, params=state.params, model_state=state.model_state, opt_state=state.opt_state,
                      meta={"best": best, "epoch": 1.0})  # fmt: skip
    return path


def config_only(path: Path, data: Path, *, num_classes: int = 3, hardness: str = "none") -> Path:
    """`make_run`'s config.json with an empty 'best' checkpoint folder: enough for the errors found before the
    classifier is read (no compilation)."""
    names = list(load_cub(data).class_names)
    names += [f"extra {i}" for i in range(num_classes - len(names))]
    config = RunConfig(arch="small", class_names=names, num_classes=num_classes, crop=32, resize=36, data_dir=str(data),
                       synthetic=True, batch_size=4, hardness=hardness)  # fmt: skip
    save_run_config(path, config)
    (path / "checkpoints" / "best" / "2").mkdir(parents=True)
    return path


IMAGES = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))


def logits(run: Path, which: str = "best") -> np.ndarray:
    model, _ = load_model(run, which=which)
    return np.asarray(model(IMAGES).logits)


def _array(x) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def leaves(tree) -> dict:
    """{path: array} of a model's state (PRNG keys as their data)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): _array(x) for p, x in flat}


def split(run: Path, which: str = "best") -> tuple[dict, dict]:
    """(classifier leaves, head leaves) of a run's checkpoint."""
    model, _ = load_model(run, which=which)
    state = leaves(nnx.state(model))
    return {k: v for k, v in state.items() if "hardness_head" not in k}, {
        k: v for k, v in state.items() if "hardness_head" in k
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A run without a hardness predictor, copied, and its copy given a head by 30 steps of training."""
    root = tmp_path_factory.mktemp("trained")
    before = make_run(root / "before", data)
    shutil.copytree(before, root / "run")
    summary = fit_hardness(root / "run", progress=False, num_threads=2, **STEPS)
    return before, root / "run", summary


# ------------------------------------------------------------------------------------------------------ errors


def _error(argv, capsys) -> str:
    assert hardness_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_errors_are_one_line_and_write_nothing(data, tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    assert "does not exist" in _error(["--checkpoint", nowhere, "--synthetic"], capsys)
    assert "--checkpoint RUN_DIR is required" in _error(["--synthetic"], capsys)
    assert "--steps must be >= 1, got 0" in _error(["--checkpoint", nowhere, "--steps", "0"], capsys)
    assert "--lr must be positive" in _error(["--checkpoint", nowhere, "--lr", "nan"], capsys)

    empty = tmp_path / "empty"  # config.json, no checkpoint
    save_run_config(empty, RunConfig(arch="small", num_classes=3, class_names=list("abc"), crop=32, resize=36,
                                     hardness="none"))  # fmt: skip
    assert "has no checkpoint yet" in _error(["--checkpoint", empty, "--synthetic"], capsys)

    network = tmp_path / "network"
    save_run_config(network, RunConfig(arch="small", num_classes=3, class_names=list("abc"), hardness="network"))
    assert "separate hardness network" in _error(["--checkpoint", network], capsys)

    four = config_only(tmp_path / "four", data, num_classes=4)  # a classifier of 4 classes, a dataset of 3
    config = load_run_config(four)
    save_run_config(four, dataclasses.replace(config, class_names=["a", *config.class_names[1:]]))  # one not its
    err = _error(["--checkpoint", four, "--steps", "2"], capsys)
    assert "has 3 classes and the classifier of" in err and " has 4; class '001.Pink_Winged_Finch' is not one" in err
    assert "nothing to resume" in _error(["--checkpoint", four, "--resume"], capsys)

    head = config_only(tmp_path / "head", data, hardness="head")
    assert "has a hardness head already: add --retrain" in _error(["--checkpoint", head], capsys)
    for run in (empty, network, four, head):
        assert not (run / HARDNESS_DIR).exists()
    assert load_run_config(four).hardness == "none"


def _live_and_staged(root: Path) -> tuple[Path, Path]:
    live, staged = root / "run" / "checkpoints", root / "work" / "commit" / "checkpoints"
    (live / "best" / "old").mkdir(parents=True)
    (staged / "best" / "new").mkdir(parents=True)
    (staged / "staged_by_train_hardness").write_text("")
    return live, staged


def test_a_swap_cut_between_two_renames_is_completed(tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames (the live folder aside, the staged one in); a kill between them
    leaves no live folder, and `_swapped` moves the staged one in."""
    import ctypes

    live, staged = _live_and_staged(tmp_path / "a")
    assert not _swapped(live, staged)
    with monkeypatch.context() as m:
        m.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no renameat2")))
        _exchange(live, staged)
    assert (live / "best" / "new").is_dir() and (staged / "best" / "old").is_dir() and _swapped(live, staged)
    live, staged = _live_and_staged(tmp_path / "b")
    live.rename(staged.parent / "previous")  # killed here
    assert _swapped(live, staged) and (live / "best" / "new").is_dir()
    live, staged = _live_and_staged(tmp_path / "c")
    _exchange(live, staged)  # renameat2: one step
    assert (live / "best" / "new").is_dir() and (staged / "best" / "old").is_dir() and _swapped(live, staged)


# -------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_only_the_head_trains_and_the_logits_stay_bit_identical(trained, data):
    before, run, summary = trained
    assert load_run_config(run).hardness == "head"
    assert load_run_config(run) == RunConfig(**{**load_run_config(before).__dict__, "hardness": "head"})
    for which in ("best", "latest"):
        np.testing.assert_array_equal(logits(before, which), logits(run, which))  # bit for bit
        old, _ = split(before, which)
        new, head = split(run, which)
        assert old.keys() == new.keys() and head
        for k in old:  # every array of the classifier (parameters, batch-norm statistics) as it was
            np.testing.assert_array_equal(old[k], new[k], err_msg=k)
        assert all(np.isfinite(v).all() for v in head.values())
    # the head changed from its initialisation, and its training loss (means over 10 steps) fell
    config = load_run_config(run / HARDNESS_DIR)
    start = leaves(nnx.state(head_model(before, config).hardness_head, nnx.Param))
    end = leaves(nnx.state(load_model(run)[0].hardness_head, nnx.Param))
    assert any(not np.array_equal(start[k], end[k]) for k in start)
    records = [json.loads(x) for x in (run / HARDNESS_DIR / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train) == 3 and train[-1] < train[0], train
    assert all(r["loss"] == r["hardness_loss"] for r in records if r["split"] == "train")
    val = [r["hardness_loss"] for r in records if r["split"] == "val"]
    assert len(val) == 3 and np.isfinite(val).all() and len(set(val)) == 3, val
    assert summary["steps"] == 30 and summary["best_step"] in (10, 20, 30)
    assert summary["val_hardness_loss"] == min(val) and np.isfinite(summary["test_hardness_loss"])
    assert sorted(p.name for p in (run / HARDNESS_DIR).iterdir()) == ["config.json", "metrics.jsonl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "latest"]
    # the hardness predictor the explanations read
    model, _ = load_model(run)
    z = np.asarray(model(IMAGES).hardness_logit)
    assert model.hardness_kind == "head" and z.shape == (3,) and np.isfinite(z).all()


@pytest.mark.slow
def test_ctrl_c_and_kill_then_resume_give_the_uninterrupted_head(trained, data, tmp_path, capsys):
    """Ctrl-C after step 14 saves it; the run stays as it was meanwhile; a kill of the resumed training at step 15
    loses step 15 only; ``--resume`` finishes with the head an uninterrupted training gives, bit for bit."""
    before, straight, _ = trained
    run = shutil.copytree(before, tmp_path / "run")

    def interrupt(step, state):
        if step == 14:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_hardness(run, progress=False, num_threads=2, on_step=interrupt, **STEPS)
    assert "step 14 saved: --resume continues from step 14" in capsys.readouterr().err
    assert load_run_config(run).hardness == "none"
    np.testing.assert_array_equal(logits(before), logits(run))
    assert "unfinished hardness training" in _error(["--checkpoint", run, "--steps", "30"], capsys)

    class Killed(Exception):
        pass

    def kill(step, state):
        if step == 15:
            raise Killed

    with pytest.raises(Killed):
        fit_hardness(run, resume=True, progress=False, num_threads=2, on_step=kill)
    assert load_run_config(run).hardness == "none"
    argv = ["--checkpoint", run, "--resume", "--no-progress", "--threads", "2"]
    assert hardness_main([str(a) for a in argv]) == 0
    out = capsys.readouterr()
    assert "resuming" in out.err and "from step 14 of 30" in out.err and "done: 30 steps" in out.out
    for which in ("best", "latest"):
        a, b = (
            leaves(nnx.state(load_model(straight, which=which)[0])),
            leaves(nnx.state(load_model(run, which=which)[0])),
        )
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert hardness_main([str(a) for a in argv]) == 0  # finished: nothing left to do
    assert "nothing to resume" in capsys.readouterr().out


@pytest.mark.slow
def test_a_kill_during_the_commit_leaves_the_run_loadable(trained, data, tmp_path, monkeypatch, capsys):
    """Killed after the run's checkpoints were swapped for those with the head, before config.json says so: the run
    loads as the classifier it was; ``--resume`` finishes the commit."""
    import delib_jax.train.hardness as hardness

    before, straight, _ = trained
    run = shutil.copytree(before, tmp_path / "run")

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(hardness, "save_run_config", killed)
        with pytest.raises(Killed):
            fit_hardness(run, progress=False, num_threads=2, **STEPS)
    assert load_run_config(run).hardness == "none" and (run / "checkpoints" / hardness.STAGED_MARK).is_file()
    model, _ = load_model(run)  # the checkpoint holds a head config.json does not name yet: left out
    assert model.hardness_kind == "none"
    np.testing.assert_array_equal(logits(before), logits(run))
    assert hardness_main(["--checkpoint", str(run), "--resume", "--no-progress"]) == 0
    assert "finished committing" in capsys.readouterr().err
    assert load_run_config(run).hardness == "head" and not (run / "checkpoints" / hardness.STAGED_MARK).exists()
    np.testing.assert_array_equal(
        load_model(run)[0](IMAGES).hardness_logit, load_model(straight)[0](IMAGES).hardness_logit
    )


@pytest.mark.slow
def test_retrain_replaces_the_head_and_the_joint_run_still_resumes(trained, tmp_path):
    """--retrain: a new head (other steps, another head), the classifier untouched; and ``train.cub --resume`` of the
    run reads its 'latest' checkpoint, optimizer state included, after the head was added."""
    from delib_jax.train import fit

    _, straight, _ = trained
    run = shutil.copytree(straight, tmp_path / "run")
    fit_hardness(run, retrain=True, progress=False, num_threads=2, **{**STEPS, "steps": 10})
    assert load_run_config(run / HARDNESS_DIR).steps == 10
    np.testing.assert_array_equal(logits(straight), logits(run))
    old, new = split(straight)[1], split(run)[1]
    assert any(not np.array_equal(old[k], new[k]) for k in old)
    summary = fit(run, resume=True, progress=False, num_threads=2)  # the finished joint run: tests its best model
    assert summary["steps"] == 2


@pytest.mark.slow
def test_delib_explain_scores_hardness_after_the_head_is_trained(trained, tmp_path, capsys):
    from delib_jax.cli import main

    before, run, _ = trained
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--score", "hardness", "--no-figures", "--json", "--workers", "0"]
    assert main(["explain", *args, "--checkpoint", str(before), "--out", str(tmp_path / "no")]) != 0
    assert "hardness" in capsys.readouterr().err
    assert main(["explain", *args, "--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "insecurities.json").is_file()


@pytest.mark.slow
def test_an_imported_run_gets_a_head_from_the_dataset_named(trained, data, tmp_path, capsys):
    """A run made by ``delib import`` (no dataset recorded, a 'best' checkpoint only): --dataset is required, then
    the head is trained and committed to 'best' alone."""
    import dataclasses

    from delib_jax.checkpoint import write_run

    before, _, _ = trained
    model, config = load_model(before)
    imported = dataclasses.replace(config, dataset=None, data_dir=None, synthetic=False, imported_from="/x/w.pth")
    run = write_run(tmp_path / "run", model, imported)
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "records no dataset (an imported run): give --dataset" in _error(["--checkpoint", run], capsys)
    argv = ["--checkpoint", run, "--dataset", "cub", "--data-dir", data, "--steps", "10", "--batch-size", "4",
            "--no-progress", "--threads", "2"]  # fmt: skip
    assert hardness_main([str(a) for a in argv]) == 0
    assert "done: 10 steps" in capsys.readouterr().out
    assert load_run_config(run) == dataclasses.replace(imported, hardness="head")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == folders
    with RunCheckpoints(run, create=False) as ckpt:
        assert ckpt.step("latest") is None and ckpt.step("best") == 0
    np.testing.assert_array_equal(logits(before), logits(run))
    assert load_model(run)[0].hardness_kind == "head"


# --------------------------------------------------------------------------------------- classes matched by name


def test_match_classes_by_name_never_guesses():
    from delib_jax.data import match_classes

    model = ["tench", "great white shark", "crane", "Tiger Cat", "crane"]  # ImageNet names "crane" twice
    mapping, why = match_classes(["great_white_shark", "tiger-cat", "tench"], model)
    assert why == "" and mapping.tolist() == [1, 3, 0] and mapping.dtype == np.int64
    assert match_classes(["Tiger Cat", "tench"], model)[0].tolist() == [3, 0]  # exact names first
    assert match_classes(["shark", "tench"], model) == (None, "class 'shark' is not one of the model's 5 classes")
    assert match_classes(["crane"], model) == (None, "class 'crane' could be the model's class 2 ('crane') and 4 "
                                                     "('crane')")  # fmt: skip
    assert match_classes(["tench", "TENCH "], model) == (None, "classes 'tench' and 'TENCH ' are both the model's "
                                                               "'tench'")  # fmt: skip


def test_relabel_maps_a_subset_by_name_and_a_full_set_by_index(data, tmp_path):
    from delib_jax.train.hardness import relabel
    from delib_jax.train.run import load_splits

    folders = tmp_path / "folders"
    for k, name in enumerate(("002.yellow winged warbler", "EXTRA_1")):
        (folders / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (40 * k, 9 * i, 0)).save(folders / name / f"{i}.png")
    splits = load_splits("folder", folders, val_fraction=0.1, seed=0, options={"test_fraction": 0.2})
    model = [*load_cub(data).class_names, "extra 0", "extra 1"]
    moved, note = relabel(splits, model, "the folders", Path("RUN"))
    assert note == ("the 2 classes of the folders are matched by name to those of the classifier of RUN (5 classes); "
                    "'002.yellow winged warbler' is '002.Yellow_Winged_Warbler'")  # fmt: skip
    assert moved.class_names == ["002.Yellow_Winged_Warbler", "extra 1"]
    for a, b in ((moved.train, splits.train), (moved.val, splits.val), (moved.test, splits.test)):
        np.testing.assert_array_equal(a.labels, np.array([1, 4])[b.labels])
        assert a.image_paths == b.image_paths
    same, note = relabel(splits, ["x", "y"], "the folders", Path("RUN"))  # as many classes, other names
    assert same is splits and note.endswith("labels are matched by index") and "class '002.yellow" in note
    assert relabel(splits, list(splits.class_names), "the folders", Path("RUN")) == (splits, "")


@pytest.mark.slow
def test_an_imported_run_gets_a_head_from_class_folders_of_some_of_its_classes(trained, data, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    """Class folders named as two of an imported classifier's three classes (spelled as folders are): the head
    trains on labels that are the classifier's indices, said in one note."""
    from delib_jax.checkpoint import write_run
    from delib_jax.train import hardness

    before, _, _ = trained
    model, config = load_model(before)
    imported = dataclasses.replace(config, dataset=None, data_dir=None, synthetic=False, imported_from="/x/w.pth")
    run = write_run(tmp_path / "run", model, imported)
    folders = tmp_path / "folders"
    cub = load_cub(data)
    for c, name in ((2, "003.green winged sparrow"), (0, "001.PINK_WINGED_FINCH")):
        (folders / name).mkdir(parents=True)
        for i in np.flatnonzero(cub.labels == c):
            Image.open(cub.image_paths[i]).save(folders / name / f"{i}.png")
    seen = []

    def pipelines(config, splits, *args, **kwargs):
        seen.append(splits)
        return make_pipelines(config, splits, *args, **kwargs)

    make_pipelines = hardness.make_pipelines
    monkeypatch.setattr(hardness, "make_pipelines", pipelines)
    argv = ["--checkpoint", run, "--dataset", "folder", "--data-dir", folders, "--steps", "4", "--batch-size", "4",
            "--no-progress", "--threads", "2"]  # fmt: skip
    assert hardness_main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert (
        f"note: the 2 classes of {folders} (folder) are matched by name to those of the classifier of {run} (3 "
        "classes); " in err
    )
    assert "'001.PINK_WINGED_FINCH' is '001.Pink_Winged_Finch'" in err  # the first class named otherwise
    (splits,) = seen
    for source in (splits.train, splits.val, splits.test):
        want = [0 if "/001.PINK_WINGED_FINCH/" in p else 2 for p in map(str, source.image_paths)]
        assert source.labels.tolist() == want and len(want)
    assert load_model(run)[0].hardness_kind == "head"
