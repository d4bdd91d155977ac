"""The SkyPilot task for one node: resources (the plan's GPUs, spot, candidate offers, price cap, ports),
setup (install SGLang and ThunderServe), run (the node agent).

``node_task_config`` builds the task as the YAML dict SkyPilot reads (``sky.Task.from_yaml_config``);
``deploy/skypilot-node.yaml`` is the same task as a readable template, and a test checks that the two
agree. Per-node values travel as ``envs`` (the Redis URL as a ``secret``, redacted in SkyPilot's logs),
so setup and run are the same text for every node. This module does not import ``sky``; ``build_task``
does, lazily.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from provisioner.base import Offer

if TYPE_CHECKING:
    import sky

_CLUSTER_NAME_OK = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_CLUSTER_NAME = 40


def _package_version() -> str:
    try:
        return metadata.version("thunderserve")
    except metadata.PackageNotFoundError:
        return "0.1.0"


# Same text for every node; the values come from the task's envs and secrets.
SETUP = """\
set -euo pipefail
python -m pip install -U pip
python -m pip install "$TS_SGLANG_SPEC"
python -m pip install "$TS_PACKAGE_SPEC"
"""

RUN = """\
exec python -m replicas.agent \\
  --node-id "$TS_NODE_ID" --host 0.0.0.0 --port "$TS_AGENT_PORT" \\
  --advertise-host "${TS_ADVERTISE_HOST:-$(hostname -I | awk '{print $1}')}" \\
  --redis-url "$TS_REDIS_URL" --deployment "$TS_DEPLOYMENT" \\
  --gpu-type "$TS_GPU_TYPE" --gpu-count "$TS_GPU_COUNT" \\
  --heartbeat-ttl "$TS_HEARTBEAT_TTL"
"""


@dataclass(frozen=True)
class NodeTaskSettings:
    """Deployment-wide settings of every node's task."""

    redis_url: str  # as the nodes reach it: must be reachable from the cloud (a public, password-protected Redis)
    deployment: str
    agent_port: int = 8700
    worker_ports: str = "30000-30031"  # engine HTTP and PD bootstrap ports the agent hands out
    heartbeat_ttl_s: float = 15.0
    package_spec: str = f"thunderserve[engine]=={_package_version()}"
    sglang_spec: str = "sglang[all]>=0.5"
    disk_size_gb: int = 256
    # Take the cluster down after this long with no job running (the agent died and nobody noticed):
    # a safety net against paying for a lost node; None disables it.
    autodown_idle_minutes: int | None = 10
    image_id: str | None = None

    @property
    def ports(self) -> list[int | str]:
        return [self.agent_port, self.worker_ports]


@dataclass(frozen=True)
class NodeTaskInput:
    """One node's part of the task: what the provisioner decided for it."""

    node_id: str
    gpu_type: str
    gpu_count: int
    spot: bool
    max_hourly_cost: float
    candidates: tuple[Offer, ...] = ()  # empty: let SkyPilot search every enabled cloud for the GPUs


def cluster_name(deployment: str, node_id: str) -> str:
    """SkyPilot cluster name of a node: ``ts-<deployment>-<node>``, lower-case and SkyPilot-valid.

    A name changed by the cleanup (or cut to length) gets a short hash of the original, so two nodes
    never share a cluster.
    """
    raw = f"ts-{deployment}-{node_id}"
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if name != raw or len(name) > MAX_CLUSTER_NAME:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:6]
        name = f"{name[: MAX_CLUSTER_NAME - 7].rstrip('-')}-{digest}"
    if not _CLUSTER_NAME_OK.match(name):
        raise ValueError(f"cannot make a SkyPilot cluster name from deployment {deployment!r}, node {node_id!r}")
    return name


def candidate_resources(offer: Offer) -> dict[str, Any]:
    """One ``any_of`` entry: where (infra) and which instance type; SkyPilot infers the GPUs from it."""
    infra = f"{offer.cloud}/{offer.region}" if offer.region else offer.cloud
    return {"infra": infra, "instance_type": offer.instance_type}


def node_task_config(node: NodeTaskInput, settings: NodeTaskSettings) -> dict[str, Any]:
    """The task YAML (as a dict) for one node."""
    resources: dict[str, Any] = {
        "use_spot": node.spot,
        "max_hourly_cost": round(node.max_hourly_cost, 6),
        "ports": list(settings.ports),
        "disk_size": settings.disk_size_gb,
    }
    if node.candidates:
        resources["any_of"] = [candidate_resources(o) for o in node.candidates]
    else:
        resources["accelerators"] = {node.gpu_type: node.gpu_count}
    if settings.autodown_idle_minutes is not None:
        resources["autostop"] = {"idle_minutes": settings.autodown_idle_minutes, "down": True}
    if settings.image_id:
        resources["image_id"] = settings.image_id
    return {
        "name": cluster_name(settings.deployment, node.node_id),
        "envs": {
            "TS_NODE_ID": node.node_id,
            "TS_DEPLOYMENT": settings.deployment,
            "TS_GPU_TYPE": node.gpu_type,
            "TS_GPU_COUNT": str(node.gpu_count),
            "TS_AGENT_PORT": str(settings.agent_port),
            "TS_HEARTBEAT_TTL": f"{settings.heartbeat_ttl_s:g}",
            "TS_PACKAGE_SPEC": settings.package_spec,
            "TS_SGLANG_SPEC": settings.sglang_spec,
        },
        "secrets": {"TS_REDIS_URL": settings.redis_url},
        "resources": resources,
        "setup": SETUP,
        "run": RUN,
    }


def build_task(config: dict[str, Any]) -> sky.Task:
    """A ``sky.Task`` from the config, validated by SkyPilot's own schema and resource checks."""
    import sky

    return sky.Task.from_yaml_config(copy.deepcopy(config))  # it consumes the dict it is given
