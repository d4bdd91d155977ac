"""The exact ``python -m sglang.launch_server`` command line for one replica of a plan, on one node.

A replica's GPUs may span nodes (pipeline stages across machines): each node runs the same command
with its own ``--node-rank``, all pointing at the rank-0 node's ``--dist-init-addr``. GPUs are chosen
with ``CUDA_VISIBLE_DEVICES`` (so ``--base-gpu-id`` is 0); an uneven ``layer_split`` goes to SGLang's
``SGLANG_PP_LAYER_PARTITION``. PD roles get ``--disaggregation-mode``, the transfer backend and the
bootstrap port (also on decode: a decode replica that is switched to prefill serves it there), and
``--enable-pd-role-switch`` -- except with PP > 1, which SGLang refuses to combine with role switching.
Nothing here imports sglang; this module only writes argv.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from planner.plan import ReplicaSpec

TRANSFER_BACKENDS = ("mooncake", "nixl", "mori", "ascend", "fake")
DEFAULT_BOOTSTRAP_PORT = 8998


class LaunchError(ValueError):
    """The replica cannot be launched as asked (inconsistent GPUs, missing multi-node address, ...)."""


@dataclass(frozen=True)
class LaunchCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    node_rank: int = 0
    nnodes: int = 1

    @property
    def serves_http(self) -> bool:
        """Only rank 0 of a multi-node replica answers HTTP; the others are followers."""
        return self.node_rank == 0

    def shell(self) -> str:
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def sglang_launch_command(
    replica: ReplicaSpec,
    *,
    model_path: str,
    port: int,
    node_id: str | None = None,
    host: str = "0.0.0.0",
    bootstrap_port: int | None = DEFAULT_BOOTSTRAP_PORT,
    gpu_ids: Sequence[int] | None = None,
    dist_init_addr: str | None = None,
    transfer_backend: str = "mooncake",
    served_model_name: str | None = None,
    ib_device: str | None = None,
    enable_role_switch: bool = True,
    python: str = "python3",
    extra_args: Sequence[str] = (),
) -> LaunchCommand:
    """Build the SGLang server command for ``replica`` on ``node_id`` (default: its first node)."""
    node = node_id or (replica.node_ids[0] if replica.node_ids else "")
    if node not in replica.node_ids:
        raise LaunchError(f"replica {replica.id} has no GPUs on node {node!r} (nodes: {replica.node_ids})")
    if replica.tp < 1 or replica.pp < 1 or replica.tp * replica.pp != len(replica.gpus):
        raise LaunchError(f"replica {replica.id}: tp*pp={replica.tp * replica.pp} but {len(replica.gpus)} GPUs")
    if replica.role not in ("prefill", "decode", "both"):
        raise LaunchError(f"replica {replica.id}: unknown role {replica.role!r}")
    if transfer_backend not in TRANSFER_BACKENDS:
        raise LaunchError(f"unknown transfer backend {transfer_backend!r}; one of {', '.join(TRANSFER_BACKENDS)}")
    local = list(gpu_ids) if gpu_ids is not None else [g for n, g in replica.gpus if n == node]
    if not local:
        raise LaunchError(f"replica {replica.id}: no GPU ids for node {node}")
    nnodes = len(replica.node_ids)
    node_rank = replica.node_ids.index(node)
    if nnodes > 1 and not dist_init_addr:
        raise LaunchError(f"replica {replica.id} spans {nnodes} nodes: dist_init_addr (rank-0 host:port) is needed")

    argv = [python, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host, "--port", str(port),
            "--tp-size", str(replica.tp), "--pp-size", str(replica.pp), "--base-gpu-id", "0"]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--dist-init-addr", str(dist_init_addr)]
    if replica.role in ("prefill", "decode"):
        argv += ["--disaggregation-mode", replica.role, "--disaggregation-transfer-backend", transfer_backend]
        if bootstrap_port is not None:
            argv += ["--disaggregation-bootstrap-port", str(bootstrap_port)]
        if ib_device:
            argv += ["--disaggregation-ib-device", ib_device]
        if enable_role_switch and replica.pp == 1:
            argv.append("--enable-pd-role-switch")
    argv += list(extra_args)

    env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in local)}
    if replica.pp > 1 and replica.layer_split:
        if len(replica.layer_split) != replica.pp:
            raise LaunchError(f"replica {replica.id}: layer_split {replica.layer_split} has not pp={replica.pp} parts")
        env["SGLANG_PP_LAYER_PARTITION"] = ",".join(str(n) for n in replica.layer_split)
    return LaunchCommand(argv=argv, env=env, node_rank=node_rank, nnodes=nnodes)


def role_switch_supported(replica: ReplicaSpec) -> bool:
    """SGLang rejects --enable-pd-role-switch with PP > 1: such replicas keep their launch role."""
    return replica.role in ("prefill", "decode") and replica.pp == 1
