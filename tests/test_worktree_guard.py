"""The working-tree check (`worktree_guard`, run by conftest.py around the session) names what a test wrote or
removed, and leaves the tools' own folders alone."""

from worktree_guard import changes, snapshot


def test_changes_name_new_and_removed_paths(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("a")
    (tmp_path / "old.txt").write_text("old")
    before = snapshot(tmp_path)
    assert changes(before, snapshot(tmp_path)) == []

    (tmp_path / "interactions.png").write_bytes(b"png")
    (tmp_path / "runs" / "cub").mkdir(parents=True)
    (tmp_path / "runs" / "cub" / "config.json").write_text("{}")
    (tmp_path / "old.txt").unlink()
    (tmp_path / "pkg" / "a.py").write_text("ab")  # an edit (an editor's, while the suite runs) is not counted
    assert changes(before, snapshot(tmp_path)) == [
        "new interactions.png",
        "new runs/",
        "new runs/cub/",
        "new runs/cub/config.json",
        "removed old.txt",
    ]


def test_the_tools_folders_are_left_out(tmp_path):
    before = snapshot(tmp_path)
    for name in (".venv/bin", ".ci-venv/lib", "pkg/__pycache__", ".pytest_cache/v", ".hypothesis/examples",
                 "delib_jax.egg-info", ".ruff_cache/0"):  # fmt: skip
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "f").write_text("x")
    assert changes(before, snapshot(tmp_path)) == ["new pkg/"]
