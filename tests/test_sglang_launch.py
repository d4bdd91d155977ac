"""SGLang launch lines from plan replicas: exact argv and environment, without sglang installed."""

from __future__ import annotations

import pytest

from planner.plan import ReplicaSpec
from replicas.sglang_launch import LaunchError, role_switch_supported, sglang_launch_command

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def test_single_gpu_prefill_replica() -> None:
    r = ReplicaSpec("r0", ["n0"], [("n0", 3)], tp=1, pp=1, role="prefill")
    cmd = sglang_launch_command(r, model_path=MODEL, port=30000, bootstrap_port=9001, transfer_backend="nixl")
    assert cmd.argv == [
        "python3", "-m", "sglang.launch_server", "--model-path", MODEL, "--host", "0.0.0.0", "--port", "30000",
        "--tp-size", "1", "--pp-size", "1", "--base-gpu-id", "0",
        "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl",
        "--disaggregation-bootstrap-port", "9001", "--enable-pd-role-switch",
    ]
    assert cmd.env == {"CUDA_VISIBLE_DEVICES": "3"}
    assert cmd.node_rank == 0 and cmd.nnodes == 1 and cmd.serves_http
    assert cmd.shell().startswith("CUDA_VISIBLE_DEVICES=3 python3 -m sglang.launch_server")


def test_tensor_parallel_decode_replica_with_extras() -> None:
    r = ReplicaSpec("r1", ["n1"], [("n1", 2), ("n1", 3)], tp=2, pp=1, role="decode")
    cmd = sglang_launch_command(r, model_path="/models/llama", port=30001, served_model_name="llama-3.1-8b",
                                ib_device="mlx5_0", extra_args=["--mem-fraction-static", "0.85"], python="/venv/python")
    argv = cmd.argv
    assert argv[:3] == ["/venv/python", "-m", "sglang.launch_server"]
    assert argv[argv.index("--tp-size") + 1] == "2" and argv[argv.index("--disaggregation-mode") + 1] == "decode"
    assert argv[argv.index("--disaggregation-bootstrap-port") + 1] == "8998"  # used if it is switched to prefill
    assert argv[argv.index("--disaggregation-ib-device") + 1] == "mlx5_0"
    assert argv[argv.index("--served-model-name") + 1] == "llama-3.1-8b"
    assert argv[-2:] == ["--mem-fraction-static", "0.85"] and "--enable-pd-role-switch" in argv
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_colocated_replica_has_no_pd_flags() -> None:
    r = ReplicaSpec("r2", ["n0"], [("n0", 0)], tp=1, pp=1, role="both")
    argv = sglang_launch_command(r, model_path=MODEL, port=30002).argv
    assert not [a for a in argv if a.startswith("--disaggregation") or a == "--enable-pd-role-switch"]


def test_pipeline_across_two_nodes() -> None:
    r = ReplicaSpec("r3", ["a", "b"], [("a", 0), ("a", 1), ("b", 0), ("b", 1)], tp=2, pp=2, role="prefill",
                    layer_split=[18, 14])
    head = sglang_launch_command(r, model_path=MODEL, port=30000, node_id="a", dist_init_addr="10.0.0.1:5000")
    follower = sglang_launch_command(r, model_path=MODEL, port=30000, node_id="b", dist_init_addr="10.0.0.1:5000")
    for cmd, rank in ((head, "0"), (follower, "1")):
        argv = cmd.argv
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == rank
        assert argv[argv.index("--dist-init-addr") + 1] == "10.0.0.1:5000"
        assert argv[argv.index("--pp-size") + 1] == "2" and argv[argv.index("--tp-size") + 1] == "2"
        assert "--enable-pd-role-switch" not in argv  # SGLang refuses role switching with PP > 1
        assert cmd.env == {"CUDA_VISIBLE_DEVICES": "0,1", "SGLANG_PP_LAYER_PARTITION": "18,14"}
    assert head.serves_http and not follower.serves_http
    assert not role_switch_supported(r)
    assert role_switch_supported(ReplicaSpec("x", ["a"], [("a", 0)], 1, 1, "decode"))


@pytest.mark.parametrize(
    ("replica", "kwargs", "message"),
    [
        (ReplicaSpec("r", ["a", "b"], [("a", 0), ("b", 0)], 1, 2, "prefill"), {}, "dist_init_addr"),
        (ReplicaSpec("r", ["a"], [("a", 0)], 2, 1, "prefill"), {}, "tp\\*pp=2"),
        (ReplicaSpec("r", ["a"], [("a", 0)], 1, 1, "prefill"), {"node_id": "z"}, "no GPUs on node"),
        (ReplicaSpec("r", ["a"], [("a", 0)], 1, 1, "prefill"), {"transfer_backend": "carrier-pigeon"}, "backend"),
        (ReplicaSpec("r", ["a", "b"], [("a", 0), ("b", 0)], 1, 2, "decode", [10, 10, 12]),
         {"dist_init_addr": "h:1"}, "layer_split"),
    ],
)
def test_inconsistent_replicas_are_refused(replica: ReplicaSpec, kwargs: dict, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        sglang_launch_command(replica, model_path=MODEL, port=1, **kwargs)
