"""The engine's command line, as one typed config object (flags spelled like SGLang's where they exist)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from replicas.engine.backends.batch_sizes import parse_batch_sizes

ROLES = ("prefill", "decode", "both")
KV_COMPRESSIONS = ("none", "int8", "int4")
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default


@dataclass
class EngineConfig:
    model: str = "emulated"
    role: str = "both"
    host: str = "127.0.0.1"
    port: int = 30000
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    kv_compression: str = "none"
    max_batch: int = 16
    decode_batch_sizes: str | tuple[int, ...] = "auto"
    served_model_name: str | None = None
    context_length: int | None = None
    enable_pd_role_switch: bool = False
    threads: int = 1
    max_prefill_tokens: int = 8192
    pd_bootstrap_timeout_s: float = 60.0
    pd_waiting_timeout_s: float = 60.0
    emulate_prefill_ms_per_token: float = 0.0
    emulate_decode_ms_per_step: float = 0.0
    log_level: str = "warning"

    @property
    def name(self) -> str:
        """The model name clients use (``model`` in OpenAI requests, ``/v1/models``)."""
        return self.served_model_name or self.model

    @property
    def disaggregation_mode(self) -> str:
        """SGLang's spelling of the launch role: ``null`` for a colocated worker."""
        return "null" if self.role == "both" else self.role


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _batch_sizes(text: str) -> str | tuple[int, ...]:
    try:
        return parse_batch_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m replicas.engine",
        description="ThunderServe reference engine: a CPU worker speaking SGLang's HTTP and prefill/decode protocol.",
    )
    p.add_argument("--model", "--model-path", dest="model", default="emulated",
                   help="smollm2 | tiny | emulated | PATH to a HF model folder")
    p.add_argument("--role", "--disaggregation-mode", dest="role", default="both",
                   choices=[*ROLES, "null"], help="prefill | decode | both (SGLang's 'null')")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=30000)
    p.add_argument("--bootstrap-port", "--disaggregation-bootstrap-port", dest="bootstrap_port", type=_port,
                   default=DEFAULT_BOOTSTRAP_PORT, help="the prefill role serves KV to decode workers here")
    p.add_argument("--kv-compression", choices=KV_COMPRESSIONS, default="none",
                   help="KV sent by a prefill worker (a decode worker asks for this unless the request says)")
    p.add_argument("--max-batch", "--max-running-requests", dest="max_batch", type=_positive_int, default=16)
    p.add_argument("--decode-batch-sizes", "--cuda-graph-bs", dest="decode_batch_sizes", type=_batch_sizes,
                   default="auto", help="torch models: sizes a decode step runs at, a batch padded up to the next "
                   "(auto: timed at the first start on this machine and cached; off; or a list like 1,2,4,8)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--context-length", type=_positive_int, default=None)
    p.add_argument("--enable-pd-role-switch", action="store_true",
                   help="allow POST /pd_role_switch (off by default, as in SGLang)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch intra-op threads (1 by default: engines share the CPU with each other)")
    p.add_argument("--max-prefill-tokens", type=_positive_int, default=8192,
                   help="prompt tokens prefilled per scheduler step (at least one request always)")
    p.add_argument("--pd-bootstrap-timeout-s", type=_non_negative_float, default=60.0,
                   help="prefill: how long a computed KV waits for its decode worker")
    p.add_argument("--pd-waiting-timeout-s", type=_non_negative_float, default=60.0,
                   help="decode: how long to wait for the prefill worker's KV")
    p.add_argument("--emulate-prefill-ms-per-token", type=_non_negative_float, default=0.0,
                   help="emulated model only: prefill delay per prompt token")
    p.add_argument("--emulate-decode-ms-per-step", type=_non_negative_float, default=0.0,
                   help="emulated model only: delay per decode step (one step serves the whole batch)")
    p.add_argument("--log-level", default=os.environ.get("THUNDERSERVE_LOG_LEVEL", "warning"),
                   choices=["debug", "info", "warning", "error"])
    return p


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    ns = build_parser().parse_args(argv)
    values = vars(ns)
    if values["role"] == "null":
        values["role"] = "both"
    return EngineConfig(**values)
