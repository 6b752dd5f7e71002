"""The peer implementation of Integrated Hessians: path-explain's PyTorch explainer (Janizek et al.), loaded by file.

path-explain 0.0.7's package ``__init__`` imports TensorFlow (not installed beside the CPU PyTorch build here), so
`path_explainer_torch` loads its torch module directly; None with the reason where the package is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def path_explainer_torch():
    """(PathExplainerTorch class, None) or (None, the one-line reason it is unavailable)."""
    try:
        spec = importlib.util.find_spec("path_explain")
    except (ImportError, ValueError) as e:  # pragma: no cover - a broken install
        return None, f"path-explain not importable: {e}"
    if spec is None or not spec.submodule_search_locations:
        return None, "path-explain is not installed (pip install path-explain==0.0.7)"
    file = Path(next(iter(spec.submodule_search_locations))) / "explainers" / "path_explainer_torch.py"
    if not file.is_file():
        return None, f"path-explain has no PyTorch explainer at {file}"
    try:
        module_spec = importlib.util.spec_from_file_location("_path_explainer_torch", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except ImportError as e:
        return None, f"path-explain's PyTorch explainer does not import: {e}"
    return module.PathExplainerTorch, None
