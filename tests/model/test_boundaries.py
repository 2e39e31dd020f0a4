"""model/ and the engine are pure torch: no Ray, no MLflow."""

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


def test_model_and_engine_import_neither_ray_nor_mlflow():
    files = list((ROOT / "model").glob("*.py")) + [ROOT / "pipeline" / "engine.py", ROOT / "pipeline" / "stages.py"]
    offenders = {str(f.relative_to(ROOT)): _imports(f) & FORBIDDEN for f in files if _imports(f) & FORBIDDEN}
    assert not offenders
