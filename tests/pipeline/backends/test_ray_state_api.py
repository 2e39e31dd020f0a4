"""A private Ray's state API works while another Ray runs on the same host.

Ray Train's placement-group cleaner and Tune's release of stopped trials ask the state API from inside
the cluster; left to find it by the Ray running on the host, they fail as soon as there are two."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.pipeline.ray_helpers import RayHead

pytestmark = pytest.mark.filterwarnings("ignore")

PROBE = textwrap.dedent(
    """
    import os
    import ray
    from pipeline.backends.ray_train import connect

    print(connect(None))

    @ray.remote(num_cpus=0)
    class Watched:
        def ping(self):
            return True

    @ray.remote(num_cpus=0)
    def state_of(actor_id):
        from ray.util.state import get_actor

        try:
            return get_actor(actor_id, timeout=30).state
        except Exception as exc:  # what Ray Train's cleaner would die of
            return f"{type(exc).__name__}: {exc}"

    watched = Watched.remote()
    ray.get(watched.ping.remote())
    print("state:", ray.get(state_of.remote(watched._actor_id.hex())))
    """
)


JOIN = textwrap.dedent(
    """
    import os
    import sys
    from pipeline.backends.ray_train import connect

    os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"  # inherited from a private Ray, say
    print(connect(sys.argv[1]))
    print("api:", os.environ.get("RAY_API_SERVER_ADDRESS"))
    """
)


def test_a_private_rays_state_api_is_found_beside_another_ray():
    from pipeline.tracking.ui import free_port

    head = RayHead(free_port(), cpus=1)  # someone else's cluster on this host, without a dashboard
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
        # A process that joins a cluster drops the state API address it inherited: it is another cluster's.
        joined = subprocess.run([sys.executable, "-c", JOIN, head.address], capture_output=True, text=True,
                                timeout=300, env={**os.environ, **head.env})  # fmt: skip
    finally:
        head.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ray local (private to this command)" in done.stdout
    assert "state: ALIVE" in done.stdout, done.stdout[-2000:]
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert f":{head.port}: 1 node(s)" in joined.stdout and "api: None" in joined.stdout, joined.stdout
