"""`delib explain` end to end: a checkpointed run, images of every kind (and broken ones), exit codes, outputs."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config
from delib_jax.cli import COMMANDS, main

NAMES = ["sparrow", "wren", '<b>&"x"', "finch"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = RunConfig(arch="small", num_classes=4, class_names=NAMES, crop=48, resize=56, dataset="cub")
    save_run_config(root / "run", config)
    model = build_model(config, rngs=nnx.Rngs(3))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(root / "run") as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(images / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8)).save(images / "grey.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8), "RGBA").save(images / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16)).save(images / "sixteen.png")
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).convert("CMYK").save(images / "cmyk.jpg")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 100, dtype=np.uint8)))
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image: ignored in folders")
    broken = root / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.jpg").write_bytes(b"garbage")
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_explain_end_to_end(workspace, capsys):
    out = workspace / "out"
    code, err = _run(
        [
            "explain",
            workspace / "images",
            "--json",
            "--checkpoint",
            workspace / "run",
            "--out",
            out,
            "--batch-size",
            "3",
            "--coverage",
            "20%",
            "--max-insecurities",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    skipped_lines = [line for line in err.splitlines() if "skipping" in line]
    assert len(skipped_lines) == 2 and any("corrupt.png" in s for s in skipped_lines)
    assert any("empty.jpg" in s and "empty file" in s for s in skipped_lines)
    assert "Traceback" not in err
    data = json.loads((out / "insecurities.json").read_text())
    sources = sorted(Path(e["source"]).name for e in data["images"])
    assert sources == ["cmyk.jpg", "grey.png", "rgb.jpg", "rgba.png", "sixteen.png"]
    assert sorted(Path(s["path"]).name for s in data["skipped"]) == ["corrupt.png", "empty.jpg"]
    assert data["settings"]["coverage"] == pytest.approx(0.2) and data["settings"]["max_insecurities"] == 2
    assert data["class_names"] == NAMES
    for e in data["images"]:
        assert e["image_size"] == [48, 48] and len(e["probs"]) == 4
        assert 1 <= len(e["insecurities"]) <= 2
        assert (out / e["figure"]).is_file()
        with Image.open(out / e["figure"]) as figure:
            assert figure.format == "PNG"
        for q in e["insecurities"]:
            assert sum(q["mask"]["counts"]) == 48 * 48
            assert {q["name_a"], q["name_b"]} <= set(NAMES)
    page = (out / "index.html").read_text()
    assert page.count("<tr data-index=") == 5
    assert '<b>&"x"' not in page
    leftovers = [p for p in out.rglob("*") if (p.name.startswith(".") and not p.name.startswith(".lock-"))]
    assert not leftovers and not list(out.rglob("*.tmp"))  # no temp files left (the lock file stays, empty of work)


@pytest.mark.slow
def test_sharded_over_two_devices_gives_the_same_explanations(workspace, capsys):
    """A fresh process with two host devices: batches are sharded and padded (5 images, batch 3 -> 4)."""
    one = workspace / "one"
    files = [workspace / "images" / n for n in ("rgb.jpg", "grey.png", "sixteen.png", "cmyk.jpg")]
    files.append(workspace / "images" / "sub" / "rgba.png")
    args = ["explain", *files, "--checkpoint", workspace / "run", "--batch-size", "3", "--no-figures", "--json"]
    code, err = _run([*args, "--out", one], capsys)
    assert code == 0, err
    two = workspace / "two"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    script = (
        "import sys, jax; from delib_jax.cli import main; assert jax.device_count() == 2; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args), "--out", str(two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    a = json.loads((one / "insecurities.json").read_text())["images"]
    b = json.loads((two / "insecurities.json").read_text())["images"]
    assert [e["source"] for e in a] == [e["source"] for e in b] == [str(f) for f in files]
    for x, y in zip(a, b):
        assert x["prediction"] == y["prediction"]
        np.testing.assert_allclose(x["probs"], y["probs"], rtol=1e-4, atol=1e-6)
        assert [(q["a"], q["b"]) for q in x["insecurities"]] == [(q["a"], q["b"]) for q in y["insecurities"]]


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_nothing_explained_exits_1(workspace, capsys):
    code, err = _run(
        [
            "explain",
            workspace / "broken",
            workspace / "missing.png",
            "--checkpoint",
            workspace / "run",
            "--out",
            workspace / "out_broken",
        ],
        capsys,
    )
    assert code == 1
    assert "nothing could be explained" in err and "missing.png" in err and "Traceback" not in err
    assert not (workspace / "out_broken" / "insecurities.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--coverage", "0.95"], "--coverage must lie between 1% and 90%"),
        (["--coverage", "0.5%"], "--coverage must lie between 1% and 90%"),
        (["--k", "1"], "--k must be at least 2"),
        (["--top-n", "2"], "--top-n (2) must be at least --k (3)"),
        (["--k", "5", "--top-n", "all"], "--k (5) exceeds the classes"),
        (["--max-insecurities", "0"], "--max-insecurities"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_options_exit_2_with_one_line(workspace, capsys, extra, message):
    code, err = _run(
        ["explain", workspace / "images", "--checkpoint", workspace / "run", "--out", workspace / "never", *extra],
        capsys,
    )
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (workspace / "never").exists()


def test_missing_or_invalid_checkpoint_exits_2(workspace, capsys):
    code, err = _run(
        ["explain", workspace / "images", "--checkpoint", workspace / "nope", "--out", workspace / "never"], capsys
    )
    assert code == 2 and "checkpoint directory" in err and len(err.strip().splitlines()) == 1
    code, err = _run(
        ["explain", workspace / "images", "--checkpoint", workspace / "images", "--out", workspace / "never"], capsys
    )
    assert code == 2 and "cannot load a model" in err and len(err.strip().splitlines()) == 1


def test_usage(capsys):
    assert "explain" in COMMANDS
    assert main(["explain", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out
    assert main(["explain", "x.png"]) == 2  # --checkpoint and --out are required (argparse's message)
    assert main([]) == 2


@pytest.mark.slow
def test_examples_and_human_study(workspace, capsys):
    examples = workspace / "examples.json"
    images = workspace / "images"
    examples.write_text(
        json.dumps(
            {
                "sparrow": "images/rgb.jpg",
                "wren": "images/grey.png",
                NAMES[2]: "images/cmyk.jpg",
                "3": "images/sixteen.png",
            }
        )
    )
    out = workspace / "study_out"
    code, err = _run(
        [
            "explain",
            images / "rgb.jpg",
            images / "grey.png",
            "--checkpoint",
            workspace / "run",
            "--out",
            out,
            "--examples",
            examples,
            "--study",
            "--max-insecurities",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    questions = json.loads((out / "study" / "questions.json").read_text())
    key = json.loads((out / "study" / "answer_key.json").read_text())
    assert len(questions) == 2 == len(key)
    assert all(len(q["choices"]) == 4 for q in questions)  # a 4-class model: all of its classes
    code, err = _run(["explain", images, "--checkpoint", workspace / "run", "--out", out, "--study"], capsys)
    assert code == 2 and "--study needs --examples" in err
    bad = workspace / "bad_examples.json"
    bad.write_text(json.dumps({"albatross": "images/rgb.jpg"}))
    code, err = _run(["explain", images, "--checkpoint", workspace / "run", "--out", out, "--examples", bad], capsys)
    assert code == 2 and "'albatross' is not a class" in err


def _explain_two_images(workspace, tmp_path, capsys):
    """Explain rgb.jpg and grey.png into tmp_path/out (no figures); (out, images folder, the command's arguments)."""
    out = tmp_path / "out"
    images = workspace / "images"
    base = ["explain", "--checkpoint", workspace / "run", "--out", out, "--batch-size", "2", "--no-figures", "--json"]
    code, _ = _run([*base, images / "rgb.jpg", images / "grey.png"], capsys)
    assert code == 0
    return out, images, base


INDEX = Path("explanations") / "index-00000.jsonl"


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_finished_images(workspace, capsys, tmp_path):
    out, images, base = _explain_two_images(workspace, tmp_path, capsys)
    lines = (out / INDEX).read_text().splitlines()
    assert len(lines) == 2  # one record per image
    # a kill while writing leaves a torn last line: it is dropped, its image explained again
    (out / INDEX).write_text(lines[0] + "\n" + lines[1][:40])
    code, err = _run([*base, images], capsys)
    assert code == 0 and "resuming: 1 images already explained" in err, err
    data = json.loads((out / "insecurities.json").read_text())
    sources = [Path(r["source"]).name for r in data["images"]]
    assert sorted(sources) == sorted(["rgb.jpg", "grey.png", "rgba.png", "sixteen.png", "cmyk.jpg"])
    assert len(set(sources)) == len(sources)
    # other settings into the same folder are refused, not mixed
    code, err = _run([*base, "--k", "2", images], capsys)
    assert code == 2 and "other settings" in err and "Traceback" not in err


def _single_line_error(code, err, *needles):
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err


@pytest.mark.slow
def test_diverged_model_stops_before_recording_nan(workspace, capsys, tmp_path):
    """NaN weights (a diverged training): one line, exit 2, and the index keeps no NaN record to replay."""
    config = RunConfig(arch="small", num_classes=4, class_names=NAMES, crop=48, resize=56, dataset="cub")
    save_run_config(tmp_path / "nan_run", config)
    model = build_model(config, rngs=nnx.Rngs(3))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x * np.nan, params)
    with RunCheckpoints(tmp_path / "nan_run") as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    out = tmp_path / "out"
    argv = ["explain", workspace / "images" / "rgb.jpg", "--checkpoint", tmp_path / "nan_run", "--out", out]
    for _ in range(2):  # the rerun gives the same line, not a crash on a poisoned index
        code, err = _run(argv, capsys)
        _single_line_error(code, err, "not finite (NaN/inf)", "rgb.jpg", "retrain")
        assert not (out / INDEX).exists() or not (out / INDEX).read_text().strip()
    assert not (out / "insecurities.json").exists()


@pytest.mark.slow
def test_damaged_index_lines_are_dropped_and_redone(workspace, capsys, tmp_path):
    out, images, base = _explain_two_images(workspace, tmp_path, capsys)
    first, second = (out / INDEX).read_text().splitlines()
    nan = {**json.loads(second), "difficulty": float("nan")}
    other = {**json.loads(second), "row": "x"}
    deep = "[" * 10000 + "]" * 10000
    damaged = ["123", first, '{"source": "x", "prediction": 1}', json.dumps(nan), "[]", json.dumps(other), deep]
    (out / INDEX).write_text("\n".join(damaged) + "\n")
    code, err = _run([*base, images / "rgb.jpg", images / "grey.png"], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "dropped 6 record(s)" in err and "resuming: 1 images already explained" in err
    assert "explained 2 of 2 images" in err
    data = json.loads((out / "insecurities.json").read_text())
    assert sorted(Path(r["source"]).name for r in data["images"]) == ["grey.png", "rgb.jpg"]
    lines = (out / INDEX).read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in "".join(lines)  # rewritten clean: the next run drops nothing
    code, err = _run([*base, images / "rgb.jpg", images / "grey.png"], capsys)
    assert code == 0 and "dropped" not in err and "resuming: 2 images" in err


def test_folder_without_images_is_a_usage_error(workspace, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    argv = ["explain", tmp_path / "empty", "--checkpoint", workspace / "run", "--out", tmp_path / "o"]
    code, err = _run(argv, capsys)
    _single_line_error(code, err, "no image files in", "empty")
    assert not (tmp_path / "o").exists()


def test_bad_examples_entries_exit_2_naming_class_and_path(workspace, capsys, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    for entry, needles in [
        ({"sparrow": "missing.jpg"}, ["'sparrow'", "missing.jpg"]),
        ({"0": 5}, ["'0'", "must map to an image path", "5"]),
        ({"wren": "junk.jpg"}, ["'wren'", "junk.jpg", "cannot read image"]),
    ]:
        examples = tmp_path / "examples.json"
        examples.write_text(json.dumps(entry))
        code, err = _run(
            ["explain", workspace / "images" / "rgb.jpg", "--checkpoint", workspace / "run", "--out",
             tmp_path / "never", "--examples", examples],
            capsys,
        )  # fmt: skip
        _single_line_error(code, err, *needles)


def test_out_that_cannot_be_created_exits_2(workspace, capsys, tmp_path):
    (tmp_path / "afile").write_text("hi")
    code, err = _run(
        ["explain", workspace / "images", "--checkpoint", workspace / "run", "--out", tmp_path / "afile" / "sub"],
        capsys,
    )
    _single_line_error(code, err, "--out", "afile", "is a file")


@pytest.mark.slow
def test_missing_repeated_nan_and_odd_inputs(workspace, capsys, tmp_path):
    """Missing paths are counted (all missing: exit 2), a file given twice is explained once, a NaN float image is
    skipped, a sliver of an image is explained with a note, a large image without Pillow's multi-line warning."""
    images = workspace / "images"
    code, err = _run(["explain", tmp_path / "nope.jpg", "--checkpoint", workspace / "run", "--out", tmp_path / "o"],
                     capsys)  # fmt: skip
    _single_line_error(code, err, "no such file or directory", "nope.jpg")
    Image.fromarray(np.full((8, 8), np.nan, np.float32), "F").save(tmp_path / "nan.tiff")
    Image.fromarray(np.zeros((2, 300, 3), np.uint8)).save(tmp_path / "sliver.png")
    out = tmp_path / "out"
    argv = [
        "explain",
        "--json",
        images / "rgb.jpg",
        images / "rgb.jpg",
        images,
        tmp_path / "nan.tiff",
        tmp_path / "sliver.png",
        tmp_path / "nope.jpg",
        "--checkpoint",
        workspace / "run",
        "--out",
        out,
        "--no-figures",
        "--workers",
        "0",
    ]  # fmt: skip  (threads: the patched limit below is seen by the reader)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # rgb.jpg (4800 px) is now "large" but under the 2x error limit
        code, err = _run(argv, capsys)
    assert code == 0 and "Traceback" not in err, err
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "rgb.jpg is given more than once" in err and "megapixels" in err
    assert "nan.tiff: float image with NaN" in err and "sliver.png (300x2)" in err and "centre crop keeps" in err
    data = json.loads((out / "insecurities.json").read_text())
    names = [Path(r["source"]).name for r in data["images"]]
    assert sorted(names) == ["cmyk.jpg", "grey.png", "rgb.jpg", "rgba.png", "sixteen.png", "sliver.png"]
    assert sorted(Path(s["path"]).name for s in data["skipped"]) == ["corrupt.png", "empty.jpg", "nan.tiff", "nope.jpg"]
    assert "explained 6 of 10 images (4 skipped)" in err


@pytest.mark.slow
def test_python_dash_m(tmp_path):
    for command in ("explain", "demo"):
        done = subprocess.run([sys.executable, "-m", "delib_jax.cli", command, "--help"], capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0 and "--out" in done.stdout, done.stderr


def test_demo_explains_what_blocks_it_in_demo_terms(capsys, tmp_path):
    """A foreign OUT/data, a damaged OUT/run/metrics.jsonl, an --out under a file: one line each, exit 2."""
    demo = ["demo", "--epochs", "1", "--crop", "32", "--out"]
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "a" / "data" / "x").write_text("")
    code, err = _run([*demo, tmp_path / "a"], capsys)
    assert code == 2 and "Traceback" not in err and "--data-dir" not in err
    assert err.strip().splitlines()[-1].endswith(f"remove {tmp_path / 'a' / 'data'} or choose another --out")
    (tmp_path / "b" / "data" / "CUB_200_2011").mkdir(parents=True)
    (tmp_path / "b" / "data" / "CUB_200_2011" / "images.txt").write_text("")  # an earlier demo's data (not read)
    (tmp_path / "b" / "run").mkdir()
    (tmp_path / "b" / "run" / "metrics.jsonl").write_text("garbage\n")
    code, err = _run([*demo, tmp_path / "b"], capsys)
    assert code == 2 and f"{tmp_path / 'b' / 'run' / 'metrics.jsonl'}:1: not JSON" in err.strip().splitlines()[-1]
    (tmp_path / "afile").write_text("hi")
    code, err = _run([*demo, tmp_path / "afile" / "sub"], capsys)
    _single_line_error(code, err, "--out", "afile is a file")


@pytest.mark.slow
def test_exit_process_flushes_and_leaves_with_the_status():
    """Ctrl-C (130) leaves through os._exit, after flushing what was printed; other statuses through sys.exit."""
    import subprocess
    import sys

    for status in (130, 0, 2):
        code = f"from delib_jax.cli import exit_process; print('bye', end=''); exit_process({status})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout) == (status, "bye")


@pytest.mark.slow
def test_output_folder_inside_the_input_folder_is_not_read(workspace, capsys, tmp_path):
    """The figures the first run wrote under images/out are not inputs of the second run (same count, resumed)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("rgb.jpg", "grey.png"):
        (images / name).write_bytes((workspace / "images" / name).read_bytes())
    argv = ["explain", images, "--checkpoint", workspace / "run", "--out", images / "out", "--workers", "0"]
    code, err = _run(argv, capsys)
    assert code == 0 and "explained 2 of 2 images" in err, err
    assert len(list((images / "out" / "figures").glob("*.png"))) == 2
    code, err = _run(argv, capsys)
    assert code == 0 and "explained 2 of 2 images" in err and "resuming: 2 images" in err, err


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"\\u00b2": "x.png"}', "is not a class"),  # '²' is a digit to str.isdigit, not to int()
        ('{"' + "9" * 5000 + '": "x.png"}', "is not a class"),  # past int()'s digit limit
        ('{"a": [[[[1]]]]}', "must map to an image path"),
        ('{"a": "x\\u0000.png"}', "cannot read image"),
    ],
)
def test_hostile_examples_json_is_one_clear_line(tmp_path, content, match):
    from delib_jax.cli import UsageError, _read_examples

    path = tmp_path / "examples.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=match) as e:
        _read_examples(str(path), ["a", "b"])
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.slow
def test_bfloat16_backbone_is_recorded_in_the_manifest(workspace, capsys, tmp_path):
    out = tmp_path / "bf16"
    argv = ["explain", workspace / "images" / "rgb.jpg", "--checkpoint", workspace / "run", "--out", out,
            "--no-figures", "--json", "--precision", "bfloat16"]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 0, err
    data = json.loads((out / "insecurities.json").read_text())
    assert data["settings"]["precision"] == "bfloat16" and len(data["images"]) == 1
    code, err = _run([*argv[:-1], "float32"], capsys)  # the same folder with other maps: refused, one line
    assert code == 2 and "precision" in err and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_of_delib_explain_is_one_line_and_leaks_nothing(workspace, tmp_path):
    """SIGINT to the whole process group (as a terminal sends it) while reader and figure processes run: exit 130,
    one line, no traceback, no "resource_tracker: ... leaked semaphore objects" from the pools' queues."""
    import signal
    import time

    images = tmp_path / "images"
    images.mkdir()
    for j in range(30):
        for name in ("rgb.jpg", "grey.png", "cmyk.jpg"):
            (images / f"{j}_{name}").write_bytes((workspace / "images" / name).read_bytes())
    out = tmp_path / "out"
    argv = ["explain", images, "--checkpoint", workspace / "run", "--out", out, "--batch-size", "1", "--workers", "1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = "from delib_jax.cli import console; console()"
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not len(list((out / "figures").glob("*.png"))) >= 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("delib explain: interrupted"), err
    assert "Traceback" not in err and "leaked" not in err and "resource_tracker" not in err, err
