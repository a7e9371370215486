"""The node provider of a simulated cluster: Ray's fake multi-node provider, with one change.

Every simulated node is a raylet on this one machine, in the head's session folder. Each
node's runtime-env agent unpacks a job's working directory the first time one of its
workers needs it, deleting any copy already there; with one shared `runtime_resources`
folder, a node that joins deletes the folder the job's driver runs in (its next
`os.getcwd()` fails with ENOENT). Here each simulated node unpacks into a folder of its
own, as separate machines do. Ray's autoscaler loads this class by name (`provider.type:
external`), in its own process.
"""

from __future__ import annotations

import threading
from typing import Any

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

_RayParams = ray._private.parameter.RayParams
_swap = threading.Lock()


class SimulatedNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # Ray's provider builds the node's RayParams itself; give them this node's folder.
        def params(*args: Any, **kwargs: Any) -> _RayParams:
            return _RayParams(*args, runtime_env_dir_name=folder, **kwargs)

        with _swap:
            folder = f"runtime_resources_node{self._next_node_id + 1}"
            ray._private.parameter.RayParams = params
            try:
                super()._create_node_with_resources_and_labels(
                    node_config, tags, count, resources, labels
                )
            finally:
                ray._private.parameter.RayParams = _RayParams
