import os
from pathlib import Path

# Tests run on the CPU, in float32 unless a test asks for float64 explicitly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# Command-line runs inside the tests do not write the user's persistent compilation cache (tests that check the
# cache give their own folder).
os.environ.setdefault("DELIB_COMPILATION_CACHE", "off")
# One persistent XLA compilation cache for the whole session, in a temporary folder shared by the xdist workers and
# the command-line runs they start (made by the first process that reads this, removed when the session ends): the
# suite compiles many identical programs (the same small models in many tests and commands); measured on
# test_attribution.py and test_evaluation_run.py, 406 s without it, 326 s with it (2-core CPU). A test that
# checks the cache gives its own folder (`delib_jax._xla.compilation_cache`), which replaces this one there.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="delib-test-xla-")
    os.environ["DELIB_TEST_XLA_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Property tests draw the same examples on every run (a suite that passed passes again: CI gates on it); search
# afresh with DELIB_HYPOTHESIS=explore (each run then draws new examples, as when the float32-tie cases were found).
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("DELIB_HYPOTHESIS") == "explore" else "repeatable")


# The suite must write nothing into the working tree (tests write into tmp_path): the repository is listed when the
# session starts and again when it ends, and any new or removed path fails the run, named.
import pytest  # noqa: E402
from worktree_guard import changes, snapshot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_TREE = pytest.StashKey[set]()


def pytest_sessionstart(session):
    session.config.stash[_TREE] = snapshot(REPO)


def pytest_unconfigure(config):
    if os.environ.get("DELIB_TEST_XLA_CACHE_OWNER") == str(os.getpid()):  # the process that made the folder
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_TREE, None)
    if before is None:
        return
    lines = changes(before, snapshot(REPO))
    if lines:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the test suite wrote into the working tree {REPO} (tests write into tmp_path):\n  " + "\n  ".join(
            lines
        )
        if reporter is not None:
            reporter.write("\n")
            reporter.write_sep("=", "working tree changed", red=True)
            reporter.write_line(message)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def small_cub_run(tmp_path_factory):
    """A tiny training run (small CNN, 2 steps) on a generated CUB of 3 classes, its data folder recorded in the
    run's config.json (``--synthetic`` finds it): the run the evaluation jobs' tests read (and never write)."""
    from delib_jax.checkpoint import RunConfig
    from delib_jax.data import load_cub, synthetic
    from delib_jax.data.transforms import CUB_STATS
    from delib_jax.train.run import fit

    tmp = tmp_path_factory.mktemp("small_cub_run")
    data = synthetic.make_cub(tmp / "data", classes=3, images_per_class=6, size=40, seed=0)
    config = RunConfig(
        arch="small", num_classes=3, class_names=list(load_cub(data).class_names), dataset="cub", crop=32,
        resize=36, mean=CUB_STATS.mean, std=CUB_STATS.std, data_dir=str(data), synthetic=True, optimizer="adamw",
        lr=1e-3, schedule="cosine", batch_size=8, steps=2, checkpoint_every=2, val_fraction=0.2,
    )  # fmt: skip
    fit(tmp / "run", config, progress=False, num_threads=2)
    return tmp / "run"
