"""The machines a plan runs on: nodes, their GPUs, and the bandwidth between every two of them.

Inter-node bandwidth defaults by where two nodes are (same zone, same region, other region, other
cloud) and can be overridden for all links (``inter_node_gbps``) or per pair (a pool YAML's ``links``).
Inside a node, GPUs talk over the GPU type's own link (NVLink or PCIe, from ``planner.gpus``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.gpus import GPUS, GpuSpec, UnknownGpu, canonical_gpu

GpuId = tuple[str, int]

# Default inter-node bandwidth, Gbit/s. Cloud VMs of the GPU sizes used here get 10-100 Gbps NICs
# inside a zone; across zones of one region a few to ~10 Gbps per flow; across regions or clouds, a
# few Gbps at best over the public internet. Override with --inter-node-gbps or a pool file.
DEFAULT_GBPS = {"zone": 25.0, "region": 10.0, "cross_region": 2.0, "cross_cloud": 1.0}
LINK_LATENCY_S = {"intra": 5e-6, "inter": 50e-6}


class PoolError(ValueError):
    """A --pool spec or pool file that cannot be read."""


@dataclass(frozen=True)
class Node:
    """One machine: GPUs of one type, where it is, what it costs."""

    id: str
    gpu_type: str
    gpu_count: int
    price_per_hour: float = 0.0
    spot: bool = False
    region: str = ""
    zone: str = ""
    cloud: str = ""
    instance_type: str = ""

    @property
    def gpu(self) -> GpuSpec:
        return GPUS[self.gpu_type]

    def gpu_ids(self) -> list[GpuId]:
        return [(self.id, i) for i in range(self.gpu_count)]


@dataclass
class Cluster:
    """Nodes plus a bandwidth model; bandwidths in bytes/s."""

    nodes: list[Node]
    inter_node_gbps: float | None = None  # overrides the location defaults for every inter-node pair
    links_gbps: dict[tuple[str, str], float] = field(default_factory=dict)  # per pair, both directions

    def __post_init__(self) -> None:
        self._by_id = {n.id: n for n in self.nodes}

    def node(self, node_id: str) -> Node:
        return self._by_id[node_id]

    def gpus(self) -> list[GpuId]:
        return [g for n in self.nodes for g in n.gpu_ids()]

    def gpu_spec(self, gpu: GpuId) -> GpuSpec:
        return self._by_id[gpu[0]].gpu

    def inter_gbps(self, a: str, b: str) -> float:
        """Inter-node Gbit/s between two distinct nodes."""
        if (a, b) in self.links_gbps:
            return self.links_gbps[(a, b)]
        if (b, a) in self.links_gbps:
            return self.links_gbps[(b, a)]
        if self.inter_node_gbps is not None:
            return self.inter_node_gbps
        na, nb = self._by_id[a], self._by_id[b]
        if na.cloud != nb.cloud:
            return DEFAULT_GBPS["cross_cloud"]
        if na.region != nb.region:
            return DEFAULT_GBPS["cross_region"]
        if na.zone and nb.zone and na.zone != nb.zone:
            return DEFAULT_GBPS["region"]
        return DEFAULT_GBPS["zone"]

    def bandwidth(self, a: str, b: str) -> float:
        """Bytes/s from node a to node b (the GPU link when a == b)."""
        if a == b:
            return self._by_id[a].gpu.link_bytes_per_s
        return self.inter_gbps(a, b) * 1e9 / 8

    def latency(self, a: str, b: str) -> float:
        return LINK_LATENCY_S["intra" if a == b else "inter"]

    @property
    def cost_per_hour(self) -> float:
        return sum(n.price_per_hour for n in self.nodes)

    def network_dict(self) -> dict[str, Any]:
        """What a Plan keeps so rescheduling and simulation see the same network."""
        return {
            "inter_node_gbps": self.inter_node_gbps,
            "links": [[a, b, g] for (a, b), g in sorted(self.links_gbps.items())],
            "zones": {n.id: n.zone for n in self.nodes if n.zone},
        }


def _parse_entry(entry: str) -> tuple[int, int, str]:
    """'3*2xL40S' -> (3 nodes, 2 GPUs each, 'L40S'); '2xL40S' -> (1, 2, ...); 'L4' -> (1, 1, ...)."""
    nodes = 1
    if "*" in entry:
        head, entry = entry.split("*", 1)
        nodes = int(head)
    count = 1
    low = entry.lower()
    if "x" in low and low.split("x", 1)[0].isdigit():
        head, entry = entry[: low.index("x")], entry[low.index("x") + 1 :]
        count = int(head)
    if nodes < 1 or count < 1:
        raise ValueError("counts must be positive")
    return nodes, count, entry.strip()


MAX_POOL_GPUS = 256  # as many as the planner rents at most (``offers.MAX_GPUS``): its search is sized for that


def _positive_gbps(value: Any, where: str) -> float:
    """A link's Gbit/s as a positive, finite float: zero would divide the KV and pipeline transfer times."""
    try:
        gbps = float(value)
    except (TypeError, ValueError):
        raise PoolError(f"{where} must be a number of Gbit/s, not {value!r}") from None
    if not 0 < gbps < math.inf:
        raise PoolError(f"{where} must be positive and finite Gbit/s, not {value!r}")
    return gbps


def _check_size(gpus: int, where: str) -> None:
    if gpus > MAX_POOL_GPUS:
        raise PoolError(f"{where}: {gpus} GPUs; the planner takes pools of at most {MAX_POOL_GPUS}")


def pool_from_spec(spec: str, inter_node_gbps: float | None = None) -> Cluster:
    """A pool of owned nodes from ``2xL40S,4xRTX4090`` (each entry one node; ``3*2xL40S`` = three
    such nodes) or from a YAML file (see ``pool_from_yaml``)."""
    path = Path(spec).expanduser()
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        return pool_from_yaml(path, inter_node_gbps)
    nodes: list[Node] = []
    for raw in [s.strip() for s in spec.split(",") if s.strip()]:
        try:
            n_nodes, count, gpu = _parse_entry(raw)
            canon = canonical_gpu(gpu)
        except UnknownGpu as e:
            raise PoolError(f"--pool {raw!r}: {e}") from None
        except ValueError:
            raise PoolError(f"--pool entry {raw!r}: expected [NODES*][COUNTx]GPU, e.g. 2xL40S or 3*1xL4") from None
        _check_size(sum(n.gpu_count for n in nodes) + n_nodes * count, f"--pool {spec!r}")
        for _ in range(n_nodes):
            nid = f"n{len(nodes)}"
            nodes.append(Node(nid, canon, count, round(GPUS[canon].ref_price * count, 4), False, "pool", "", "owned",
                              f"{count}x_{canon}"))
    if not nodes:
        raise PoolError("--pool is empty")
    return Cluster(nodes, inter_node_gbps=inter_node_gbps if inter_node_gbps is not None else DEFAULT_GBPS["zone"])


def pool_from_yaml(path: Path, inter_node_gbps: float | None = None) -> Cluster:
    """Pool file::

        nodes:
          - {id: a, gpu: L40S, count: 2, price: 1.7, region: us}   # price, region optional
          - {id: b, gpu: RTX4090, count: 4}
        inter_node_gbps: 10          # optional, default 25
        links: [[a, b, 5]]           # optional per-pair Gbit/s
    """
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PoolError(f"cannot read pool file {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not doc["nodes"]:
        raise PoolError(f"pool file {path}: expected a mapping with a non-empty 'nodes' list")
    nodes: list[Node] = []
    for i, raw in enumerate(doc["nodes"]):
        if not isinstance(raw, dict) or "gpu" not in raw:
            raise PoolError(f"pool file {path}: nodes[{i}] needs at least 'gpu'")
        try:
            canon = canonical_gpu(str(raw["gpu"]))
            count = int(raw.get("count", 1))
            price = float(raw.get("price", GPUS[canon].ref_price * count))
        except UnknownGpu as e:
            raise PoolError(f"pool file {path}: nodes[{i}]: {e}") from None
        except (TypeError, ValueError):
            raise PoolError(f"pool file {path}: nodes[{i}]: count and price must be numbers") from None
        if count < 1:
            raise PoolError(f"pool file {path}: nodes[{i}].count must be >= 1")
        if not 0 <= price < math.inf:
            raise PoolError(f"pool file {path}: nodes[{i}].price must be a finite $/h >= 0, not {raw['price']!r}")
        nid = str(raw.get("id", f"n{i}"))
        nodes.append(Node(nid, canon, count, price, bool(raw.get("spot", False)), str(raw.get("region", "pool")),
                          str(raw.get("zone", "")), "owned", f"{count}x_{canon}"))
    if len({n.id for n in nodes}) != len(nodes):
        raise PoolError(f"pool file {path}: node ids must be unique")
    _check_size(sum(n.gpu_count for n in nodes), f"pool file {path}")
    ids = {n.id for n in nodes}
    links: dict[tuple[str, str], float] = {}
    for link in doc.get("links") or []:
        try:
            a, b, gbps = str(link[0]), str(link[1]), link[2]
        except (TypeError, IndexError, KeyError):
            raise PoolError(f"pool file {path}: links entries are [node, node, gbps], got {link!r}") from None
        if a not in ids or b not in ids:
            raise PoolError(f"pool file {path}: link {link!r} names an unknown node")
        links[(a, b)] = _positive_gbps(gbps, f"pool file {path}: link {link!r}")
    gbps = doc.get("inter_node_gbps", inter_node_gbps if inter_node_gbps is not None else DEFAULT_GBPS["zone"])
    return Cluster(nodes, inter_node_gbps=_positive_gbps(gbps, f"pool file {path}: inter_node_gbps"), links_gbps=links)


def cluster_from_instances(instances: list[Any], network: dict[str, Any] | None = None) -> Cluster:
    """The cluster of a Plan's instances (``planner.plan.Instance``), with the network it was planned for."""
    network = network or {}
    zones = network.get("zones", {})
    nodes = [Node(i.id, canonical_gpu(i.gpu_type), i.gpu_count, i.price_per_hour, i.spot, i.region,
                  zones.get(i.id, ""), i.cloud, i.instance_type) for i in instances]
    links = {(str(a), str(b)): float(g) for a, b, g in network.get("links", [])}
    return Cluster(nodes, inter_node_gbps=network.get("inter_node_gbps"), links_gbps=links)
