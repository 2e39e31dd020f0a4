"""A stage's two workers placed on the two nodes of a Ray cluster."""

import json

import pytest

from tests.conftest import tiny_args
from tests.pipeline.backends.test_ray_pipeline import s4mim
from tests.pipeline.ray_helpers import env_for, start_cluster

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.slow
def test_two_node_cluster_runs_one_worker_per_node(tiny_shapes, tmp_path):
    cluster = start_cluster(nodes=2, cpus_per_node=1)
    try:
        runs = tmp_path / "runs"
        args = tiny_args(tiny_shapes, "scaling.workers=2")
        done = s4mim("warmup", "shapes-1/8", *args, env=env_for(runs, cluster.address))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "2 node(s)" in done.stdout
        result = json.loads(next((runs / "stages" / "shapes-1_8").glob("warmup-*/result.json")).read_text())
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        assert len(nodes) == 2 and set(result["worker_nodes"]) == nodes
    finally:
        cluster.shutdown()
