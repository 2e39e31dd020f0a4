"""The commit every run and results table records, in a checkout and in a ``git archive`` copy of one."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest

from pipeline.tracking.runs import ROOT, git_sha, source_tags


def _head() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    return done.stdout.strip()


def test_a_checkout_records_its_head():
    head = _head()
    assert git_sha() in (head[:12], f"{head[:12]}-dirty")
    assert source_tags()["mlflow.source.git.commit"] == head


def test_a_git_archive_copy_records_the_commit_it_was_made_from(tmp_path):
    head = _head()
    outer = tmp_path / "experiments"  # a checkout of its own, with a commit, that the copy is unpacked in
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=outer, check=True)  # fmt: skip
    copy = outer / "tree"
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(copy, filter="data")
    probe = (
        "import pipeline.tracking.runs as runs; "
        "print(runs.__file__); print(runs.git_sha()); print(runs.source_tags()['mlflow.source.git.commit'])"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=copy, env={"PYTHONPATH": str(copy)},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    module, sha, commit = done.stdout.split()
    assert module.startswith(str(copy))  # the copy's code, not the checkout's
    assert sha == f"{head[:12]}-archive" and commit == head
