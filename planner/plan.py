"""The deployment plan: what to rent, how to group GPUs into replicas, and how to route between them.

This is the contract between the planner (writes plans), the controller (makes the cluster match the
plan), and the gateway (routes by the plan's weights). It is plain data with no heavy imports, so the
gateway can use it without the search code.

Plan JSON (``Plan.to_json()``), every field documented here and in the README:

```
{
  "version": 3,                      # bumped by the state store on every publish (0 = never published)
  "model": "llama-3.1-8b",           # model catalog name (or a HF config path)
  "strategy": "thunderserve",        # thunderserve | colocated | distserve | hexgen | greedy | no-bandwidth
  "seed": 0,
  "allow_mixed_chunk": true,         # optional (absent = true): the engine may mix prefill chunks into
                                     # colocated replicas' decode steps; false: prefill first only, and
                                     # a reschedule keeps it so (`tsctl plan --no-mixed-chunk`)
  "instances": [                     # what is rented (or, with --pool, what is already owned)
    {"id": "n0", "instance_type": "1x_L40S_SECURE", "gpu_type": "L40S", "gpu_count": 1,
     "spot": true, "price_per_hour": 0.86, "region": "US", "cloud": "runpod"}
  ],
  "replicas": [                      # one model copy each; GPUs of a replica are used by it alone
    {"id": "r0", "node_ids": ["n0"], "gpus": [["n0", 0]], "tp": 1, "pp": 1,
     "layer_split": [32], "role": "prefill"}          # role: prefill | decode | both (colocated)
                                     # optional, colocated replicas only (absent = engine defaults):
                                     # "prefill_chunk": 512 (SGLang --chunked-prefill-size),
                                     # "mixed_chunk": true (--enable-mixed-chunk: prefill chunks ride
                                     # with the running decodes instead of stalling them)
  ],
  "routing": [                       # joint distribution over (prefill, decode) pairs; weights sum to 1
    {"prefill": "r0", "decode": "r1", "weight": 0.6, "kv_compression": "none"}
  ],                                 # a colocated replica r is the pair (r, r)
  "expected": {"goodput_rps": 3.2, "slo_attainment": 0.93, "cost_per_hour": 4.1,
               "goodput_per_dollar": 0.78,
               "ttft_quantile": 0.94, "tpot_quantile": 0.94},  # optional: the quantiles capacities were checked at
  "workload": {...}, "slo": {...},   # what the plan was made for (free-form, from the planner)
  "network": {"inter_node_gbps": 25.0, "links": [["n0", "n1", 5.0]], "zones": {}},  # optional: the
                                     # bandwidths the plan assumed (planner.cluster); {} = defaults
  "created_at": 1764290000.0,
  "next_replica_id": 2               # ids r0..r1 were issued (lost ones too): the next new replica is r2
}
```
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

Role = Literal["prefill", "decode", "both"]
KvCompression = Literal["none", "int8", "int4"]
ROLES: tuple[str, ...] = ("prefill", "decode", "both")
KV_COMPRESSIONS: tuple[str, ...] = ("none", "int8", "int4")


def replica_number(replica_id: str) -> int | None:
    """``n`` of a planner-issued replica id ``r<n>``; None for any other id."""
    return int(replica_id[1:]) if replica_id[:1] == "r" and replica_id[1:].isdigit() else None


class PlanError(ValueError):
    """A plan that breaks its own invariants (unknown ids, bad weights, a GPU used twice)."""


@dataclass(frozen=True)
class Instance:
    """One rented machine (a node). ``id`` is stable for the life of the node."""

    id: str
    instance_type: str
    gpu_type: str
    gpu_count: int
    spot: bool
    price_per_hour: float
    region: str = ""
    cloud: str = ""


@dataclass(frozen=True)
class ReplicaSpec:
    """One model replica: the GPUs it owns, its parallelism, its phase."""

    id: str
    node_ids: list[str]
    gpus: list[tuple[str, int]]
    tp: int
    pp: int
    role: Role
    layer_split: list[int] = field(default_factory=list)
    prefill_chunk: int = 0  # prompt tokens per prefill pass (SGLang --chunked-prefill-size); 0: engine default
    mixed_chunk: bool = False  # colocated: prefill chunks batched with the decodes (SGLang --enable-mixed-chunk)

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """JSON shape; the engine-setting fields only when they are not the defaults (older readers)."""
        d = {**asdict(self), "gpus": [list(g) for g in self.gpus]}
        if not self.prefill_chunk:
            del d["prefill_chunk"]
        if not self.mixed_chunk:
            del d["mixed_chunk"]
        return d


@dataclass(frozen=True)
class Route:
    """Fraction of all requests whose prefill runs on ``prefill`` and decode on ``decode``."""

    prefill: str
    decode: str
    weight: float
    kv_compression: KvCompression = "none"


@dataclass
class Plan:
    """A complete deployment decision. See the module docstring for the JSON layout."""

    model: str
    instances: list[Instance]
    replicas: list[ReplicaSpec]
    routing: list[Route]
    strategy: str = "thunderserve"
    seed: int = 0
    version: int = 0
    expected: dict[str, float] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    slo: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    network: dict[str, Any] = field(default_factory=dict)  # optional, added by the planner (issue 3)
    # Replica ids r0..r{n-1} have been issued over the deployment's life (lost ones included): a new
    # replica gets r{n}, so an id never names two different processes (gateway breakers, metrics,
    # controller records and the events stream key on it). 0 = derive from ``replicas``.
    next_replica_id: int = 0
    allow_mixed_chunk: bool = True  # False: no colocated replica may run mixed chunks (the engine lacks them)

    # -- derived views -------------------------------------------------------------------------
    @property
    def cost_per_hour(self) -> float:
        return round(sum(i.price_per_hour for i in self.instances), 6)

    def first_free_replica_number(self) -> int:
        """The number of the next replica id: past every id issued so far, never one that was lost."""
        used = [n for n in (replica_number(r.id) for r in self.replicas) if n is not None]
        return max(self.next_replica_id, 1 + max(used, default=-1))

    def replica(self, replica_id: str) -> ReplicaSpec:
        for r in self.replicas:
            if r.id == replica_id:
                return r
        raise KeyError(replica_id)

    def instance(self, node_id: str) -> Instance:
        for i in self.instances:
            if i.id == node_id:
                return i
        raise KeyError(node_id)

    def replicas_with_role(self, role: str) -> list[ReplicaSpec]:
        return [r for r in self.replicas if r.role == role]

    def per_prefill_weights(self) -> dict[str, dict[str, float]]:
        """Routing as a conditional distribution: for each prefill, decode -> weight (sums to 1)."""
        rows: dict[str, dict[str, float]] = defaultdict(dict)
        for r in self.routing:
            rows[r.prefill][r.decode] = rows[r.prefill].get(r.decode, 0.0) + r.weight
        out: dict[str, dict[str, float]] = {}
        for p, row in rows.items():
            total = sum(row.values())
            out[p] = {d: (w / total if total > 0 else 0.0) for d, w in row.items()}
        return out

    # -- checks --------------------------------------------------------------------------------
    def validate(self, budget_per_hour: float | None = None, tol: float = 1e-6) -> None:
        """Raise PlanError if an invariant does not hold (ids, GPU ownership, weights, budget)."""
        node_ids = [i.id for i in self.instances]
        if len(set(node_ids)) != len(node_ids):
            raise PlanError("duplicate instance id")
        for i in self.instances:
            if i.gpu_count < 1 or not 0 <= i.price_per_hour < math.inf:
                raise PlanError(f"instance {i.id}: gpu_count must be >= 1 and price_per_hour a finite $/h >= 0")
        nodes = {i.id: i for i in self.instances}
        replica_ids = [r.id for r in self.replicas]
        if len(set(replica_ids)) != len(replica_ids):
            raise PlanError("duplicate replica id")
        used: set[tuple[str, int]] = set()
        for r in self.replicas:
            if r.role not in ROLES:
                raise PlanError(f"replica {r.id}: unknown role {r.role!r}")
            if r.tp < 1 or r.pp < 1 or r.tp * r.pp != len(r.gpus):
                raise PlanError(f"replica {r.id}: tp*pp={r.tp * r.pp} but {len(r.gpus)} GPUs")
            if r.prefill_chunk < 0 or (r.mixed_chunk and r.role != "both"):
                raise PlanError(f"replica {r.id}: prefill_chunk must be >= 0 and mixed_chunk is for colocated replicas")
            if r.mixed_chunk and not self.allow_mixed_chunk:
                raise PlanError(f"replica {r.id}: mixed_chunk, but the plan has allow_mixed_chunk false")
            for node, idx in r.gpus:
                if node not in nodes:
                    raise PlanError(f"replica {r.id}: unknown node {node}")
                if not 0 <= idx < nodes[node].gpu_count:
                    raise PlanError(f"replica {r.id}: node {node} has no GPU {idx}")
                if (node, idx) in used:
                    raise PlanError(f"GPU {node}:{idx} used by two replicas")
                used.add((node, idx))
            if set(r.node_ids) != {n for n, _ in r.gpus}:
                raise PlanError(f"replica {r.id}: node_ids do not match its GPUs")
            if r.layer_split and (len(r.layer_split) != r.pp or min(r.layer_split) < 1):
                raise PlanError(f"replica {r.id}: layer_split {r.layer_split} must give >= 1 layer to each of {r.pp} "
                                "stages")
        roles = {r.id: r.role for r in self.replicas}
        for route in self.routing:
            if route.weight < -tol:
                raise PlanError("negative routing weight")
            if route.kv_compression not in KV_COMPRESSIONS:
                raise PlanError(f"unknown kv_compression {route.kv_compression!r}")
            p, d = roles.get(route.prefill), roles.get(route.decode)
            if p is None or d is None:
                raise PlanError(f"route {route.prefill}->{route.decode}: unknown replica")
            colocated = route.prefill == route.decode and p == "both"
            if not colocated and (p != "prefill" or d != "decode"):
                raise PlanError(f"route {route.prefill}->{route.decode}: roles {p}->{d}")
        if self.routing:
            total = sum(r.weight for r in self.routing)
            if abs(total - 1.0) > 1e-4:
                raise PlanError(f"routing weights sum to {total}, not 1")
        self._validate_network(set(node_ids))
        if budget_per_hour is not None and self.cost_per_hour > budget_per_hour + tol:
            raise PlanError(f"plan costs ${self.cost_per_hour:.2f}/h, over the ${budget_per_hour:.2f}/h budget")

    def _validate_network(self, node_ids: set[str]) -> None:
        """The network a plan was made for: Gbit/s that the transfer times can divide by, links between its nodes."""
        net = self.network
        gbps = net.get("inter_node_gbps")
        if gbps is not None and not (isinstance(gbps, int | float) and 0 < gbps < math.inf):
            raise PlanError(f"network.inter_node_gbps must be positive Gbit/s or null, not {gbps!r}")
        for link in net.get("links") or []:
            if not (isinstance(link, list | tuple) and len(link) == 3 and {link[0], link[1]} <= node_ids
                    and isinstance(link[2], int | float) and 0 < link[2] < math.inf):
                raise PlanError(f"network.links entries are [node, node, positive Gbit/s] of the plan's nodes, "
                                f"not {link!r}")
        if not isinstance(net.get("zones") or {}, dict):
            raise PlanError("network.zones must map node ids to zones")

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["replicas"] = [r.to_dict() for r in self.replicas]
        d["expected"] = {**self.expected, "cost_per_hour": self.cost_per_hour}
        return d

    def to_json(self, indent: bool = False) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 if indent else 0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        try:
            return cls(
                model=d["model"],
                instances=[Instance(**i) for i in d["instances"]],
                replicas=[
                    ReplicaSpec(
                        id=r["id"],
                        node_ids=list(r["node_ids"]),
                        gpus=[(str(n), int(i)) for n, i in r["gpus"]],
                        tp=int(r["tp"]),
                        pp=int(r["pp"]),
                        role=r["role"],
                        layer_split=list(r.get("layer_split", [])),
                        prefill_chunk=int(r.get("prefill_chunk", 0) or 0),
                        mixed_chunk=bool(r.get("mixed_chunk", False)),
                    )
                    for r in d["replicas"]
                ],
                routing=[Route(**r) for r in d.get("routing", [])],
                strategy=d.get("strategy", "thunderserve"),
                seed=int(d.get("seed", 0)),
                version=int(d.get("version", 0)),
                expected={k: v for k, v in d.get("expected", {}).items() if k != "cost_per_hour"},
                workload=dict(d.get("workload", {})),
                slo=dict(d.get("slo", {})),
                created_at=float(d.get("created_at", time.time())),
                network=dict(d.get("network") or {}),
                next_replica_id=int(d.get("next_replica_id", 0) or 0),
                allow_mixed_chunk=bool(d.get("allow_mixed_chunk", True)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan JSON: {e!r}") from e

    @classmethod
    def from_json(cls, data: bytes | str) -> Plan:
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise PlanError(f"plan is not JSON: {e}") from e
        return cls.from_dict(raw)
