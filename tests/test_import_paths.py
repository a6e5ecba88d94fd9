"""The package's dependency rules, checked on the source: what may import what.

- data_pipelines never imports mermed_jax (the data side stands alone; the modality table and
  the batch layout live there and the model side reads them);
- the train step's import path (what bench/gpu.sh runs on a bare accelerator host) pulls in none
  of grain, OpenCV, TensorFlow or clu;
- no module edits sys.path.
"""

import ast
import pathlib
import subprocess
import sys

from repo import ROOT

HEAVY = ("grain", "cv2", "tensorflow", "clu", "tensorflow_datasets")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_data_pipelines_never_imports_mermed_jax():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] == "mermed_jax")
                 for p in (ROOT / "data_pipelines").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_module_edits_sys_path():
    roots = ("mermed_jax", "data_pipelines", "bench", "configs", "tests")
    offenders = [str(p.relative_to(ROOT)) for r in roots for p in (ROOT / r).rglob("*.py")
                 if "sys.path." in p.read_text() and p.name != pathlib.Path(__file__).name]
    assert not offenders


def test_the_train_step_import_path_is_light():
    """Imports bench/train_step.py's modules with the heavy packages made unimportable."""
    blocker = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is not allowed on the train step's import path")
sys.meta_path.insert(0, Block())
import runpy
sys.argv = ["train_step.py", "--help"]
try:
    runpy.run_path({str(ROOT / "bench" / "train_step.py")!r}, run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
"""
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
