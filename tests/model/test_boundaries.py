"""model/, the config and the training layer are pure torch: no Ray, no MLflow."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"ray", "mlflow"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_model_and_training_import_neither_ray_nor_mlflow():
    files = [*(ROOT / "model").glob("*.py"), *(ROOT / "pipeline" / "training").glob("*.py"),
             *(ROOT / "pipeline" / "config").glob("*.py")]  # fmt: skip
    assert ROOT / "pipeline" / "training" / "engine.py" in files
    offenders = {str(f.relative_to(ROOT)): _imports(f) & FORBIDDEN for f in files if _imports(f) & FORBIDDEN}
    assert not offenders
