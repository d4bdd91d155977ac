"""What the controller asks a node agent to run: the body of ``POST /replicas``, validated field by field."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

ENGINES = ("reference", "sglang")
ROLES = ("prefill", "decode", "both")
KV_COMPRESSIONS = ("none", "int8", "int4")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class SpecError(ValueError):
    """A bad replica request; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ReplicaRequest:
    id: str
    model: str
    role: str
    engine: str = "reference"
    tp: int = 1
    pp: int = 1
    gpus: list[int] = field(default_factory=list)
    kv_compression: str = "none"
    max_batch: int | None = None
    port: int | None = None
    bootstrap_port: int | None = None
    extra_args: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    # multi-node SGLang replicas: every node runs the same command with its own rank
    node_ids: list[str] = field(default_factory=list)  # order = node rank; empty = this node only
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    transfer_backend: str = "mooncake"
    layer_split: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(body: dict[str, Any], key: str, low: int, high: int | None = None, default: Any = None) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SpecError(f"{key} must be an integer {bound}, got {v!r}", key)
    return v


def _str_list(body: dict[str, Any], key: str) -> list[str]:
    v = body.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SpecError(f"{key} must be a list of strings", key)
    return list(v)


def _int_list(body: dict[str, Any], key: str) -> list[int]:
    v = body.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise SpecError(f"{key} must be a list of non-negative integers", key)
    return list(v)


LAUNCH_HINTS = ("nnodes", "node_rank", "node_ids", "dist_init_addr", "layer_split", "transfer_backend")


def _fold_launch_hints(body: dict[str, Any]) -> dict[str, Any]:
    """``extra_args`` may be an object of multi-node launch hints instead of engine flags: fold it in."""
    extra = body.get("extra_args")
    if not isinstance(extra, dict):
        return body
    unknown = sorted(set(extra) - set(LAUNCH_HINTS))
    if unknown:
        raise SpecError(f"extra_args: unknown launch hints {unknown}; known: {', '.join(LAUNCH_HINTS)}",
                        "extra_args")
    return {**body, **{k: v for k, v in extra.items() if body.get(k) is None}, "extra_args": []}


def parse_replica_request(body: Any) -> ReplicaRequest:
    if not isinstance(body, dict):
        raise SpecError("request body must be a JSON object")
    body = _fold_launch_hints(body)
    rid = body.get("id")
    if not isinstance(rid, str) or not _ID.match(rid):
        raise SpecError("id must be 1-64 characters of letters, digits, _ . : -", "id")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise SpecError("model must be a non-empty string (smollm2, tiny, emulated, or a model path)", "model")
    role = body.get("role")
    if role not in ROLES:
        raise SpecError(f"role must be one of {', '.join(ROLES)}, got {role!r}", "role")
    engine = body.get("engine", "reference")
    if engine not in ENGINES:
        raise SpecError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}", "engine")
    kvc = body.get("kv_compression") or "none"
    if kvc not in KV_COMPRESSIONS:
        raise SpecError(f"kv_compression must be one of {', '.join(KV_COMPRESSIONS)}, got {kvc!r}", "kv_compression")
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise SpecError("env must be an object of strings", "env")
    dist = body.get("dist_init_addr")
    if dist is not None and not isinstance(dist, str):
        raise SpecError("dist_init_addr must be a host:port string", "dist_init_addr")
    served = body.get("served_model_name")
    if served is not None and not isinstance(served, str):
        raise SpecError("served_model_name must be a string", "served_model_name")
    backend = body.get("transfer_backend") or "mooncake"
    if not isinstance(backend, str):
        raise SpecError("transfer_backend must be a string", "transfer_backend")
    req = ReplicaRequest(
        id=rid, model=model, role=role, engine=engine,
        tp=_int(body, "tp", 1, default=1), pp=_int(body, "pp", 1, default=1),
        gpus=_int_list(body, "gpus"), kv_compression=kvc, max_batch=_int(body, "max_batch", 1),
        port=_int(body, "port", 1, 65535), bootstrap_port=_int(body, "bootstrap_port", 1, 65535),
        extra_args=_str_list(body, "extra_args"), served_model_name=served,
        node_ids=_str_list(body, "node_ids"), nnodes=_int(body, "nnodes", 1, default=1),
        node_rank=_int(body, "node_rank", 0, default=0),
        dist_init_addr=dist, transfer_backend=backend, layer_split=_int_list(body, "layer_split"), env=dict(env),
    )
    if req.node_ids:
        if body.get("nnodes") is not None and req.nnodes != len(req.node_ids):
            raise SpecError(f"nnodes={req.nnodes} but node_ids lists {len(req.node_ids)} nodes", "nnodes")
        req.nnodes = len(req.node_ids)
    if req.node_rank >= req.nnodes:
        raise SpecError(f"node_rank {req.node_rank} is not below nnodes {req.nnodes}", "node_rank")
    if len(set(req.gpus)) != len(req.gpus):
        raise SpecError(f"gpus lists a GPU twice: {req.gpus}", "gpus")
    if engine == "sglang":
        nodes = req.nnodes
        if not req.gpus:
            raise SpecError("gpus: engine sglang needs the GPU indices to use on this node", "gpus")
        if req.tp * req.pp != len(req.gpus) * nodes:
            raise SpecError(f"tp*pp={req.tp * req.pp} does not match {len(req.gpus)} GPUs on this node "
                            f"x {nodes} node(s)", "gpus")
        if nodes > 1 and not req.dist_init_addr:
            raise SpecError("dist_init_addr (rank-0 host:port) is needed for a replica on several nodes",
                            "dist_init_addr")
    return req
