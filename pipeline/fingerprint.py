"""Fingerprints of the code that determines a stage's output, for the stage cache.

A stage's hash covers its config, its inputs and this fingerprint, so that a change to the training
code invalidates the stages it affects instead of handing back results of the old code. What counts
is the code itself: each source is parsed and hashed without its comments, docstrings and layout,
so a reworded comment or a reformatted line invalidates nothing. The CLI, tracking, the backends
and the docs are outside every fingerprint: they do not change what a stage computes.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The sources whose code decides each stage's output (globs relative to the project root). The
# config module is among them: ``Config.terms()`` decides which losses a stage trains with.
_TRAINING = (
    "model/*.py",
    "data_prep/*.py",
    "pipeline/config/schema.py",
    "pipeline/training/engine.py",
    "pipeline/training/inference.py",
    "pipeline/training/metrics.py",
    "pipeline/training/optimization.py",
    "pipeline/training/stages.py",
    "pipeline/training/terms.py",
)
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "warmup": _TRAINING,
    "train": _TRAINING,
    "evaluate": (*_TRAINING, "pipeline/training/pictures.py"),
    "pretrain": (
        "model/backbones.py",
        "data_prep/corpus.py",
        "data_prep/shapes.py",
        "data_prep/augment.py",
        "pipeline/training/standin.py",
    ),
}


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def source_digest(path: Path) -> str:
    """The hash of one source file's code: its syntax tree without docstrings (comments are not in it)."""
    tree = _without_docstrings(ast.parse(Path(path).read_text(), filename=str(path)))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def code_fingerprint(stage: str, root: Path = ROOT) -> str:
    """One hash over the code of every source that decides ``stage``'s output.

    It covers the code only, not where it sits: the sources' digests are hashed in sorted order,
    without their paths, so that moving or renaming a file (within the globs) reruns nothing."""
    files = {path for pattern in STAGE_CODE[stage] for path in root.glob(pattern)}
    digests = sorted(source_digest(path) for path in files)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    """The hash of a file's bytes (a weights file), read once per (path, size, modification time)."""
    info = Path(path).stat()
    return _bytes_digest(str(path), info.st_size, info.st_mtime_ns)


@cache
def _bytes_digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
