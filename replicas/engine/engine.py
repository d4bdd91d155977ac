"""The engine: model + scheduler + PD hand-over + live role, behind the HTTP routes of ``server``.

``start(item)`` runs one request in the mode the live role and its bootstrap fields call for:
locally (role both, or SGLang's fake bootstrap host), as the prefill leg (compute the prompt's KV +
first token, publish it in its room, wait until the decode worker has it, answer with length 0), or as
the decode leg (fetch the KV from the prefill worker's bootstrap server, then generate from it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from replicas.engine import kv_wire
from replicas.engine.backends import load_backend
from replicas.engine.backends.base import Backend
from replicas.engine.config import EngineConfig
from replicas.engine.errors import ApiError, bad_request
from replicas.engine.metrics import EngineMetrics
from replicas.engine.pd import FAKE_BOOTSTRAP_HOST, BootstrapServer, KVFetcher, RoomClosed, RoomRegistry
from replicas.engine.sampling import SamplingParams, TokenChoice
from replicas.engine.scheduler import Scheduler
from replicas.engine.sequence import GenerateItem, Mode, Sequence
from replicas.engine.tokenizer import Tokenizer

log = logging.getLogger("replicas.engine")
VERSION = "thunderserve-reference/0.1.0"
HEALTH_GENERATE_TIMEOUT_S = 20.0


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.role = cfg.role  # the live role; cfg.role stays the launch role (as SGLang reports both)
        self.backend: Backend | None = None
        self.scheduler: Scheduler | None = None
        self.metrics = EngineMetrics(cfg.name)
        self.rooms = RoomRegistry()
        self.bootstrap: BootstrapServer | None = None
        self.fetcher = KVFetcher()
        self.ready = False
        self.closing = False
        self.switching = False
        self.unhealthy = False
        self.active = 0  # generation requests inside HTTP handlers
        self.started_at = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()

    def _background(self, coro: Any) -> None:
        """Fire-and-forget work (peer notices) that must not be garbage-collected mid-flight."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def load(self) -> None:
        """Load the model off the event loop (health answers 503 meanwhile), then start serving."""
        self.backend = await asyncio.to_thread(load_backend, self.cfg)
        self.scheduler = Scheduler(self.backend, self.cfg.max_batch, self.cfg.max_prefill_tokens, self.metrics)
        self.scheduler.start()
        if self.role == "prefill":
            await self._start_bootstrap()
        self.ready = True
        log.info("engine ready: model=%s role=%s port=%d", self.cfg.model, self.role, self.cfg.port)

    async def close(self) -> None:
        self.ready = False
        self.closing = True
        self.rooms.fail_all("the prefill worker is shutting down")
        if self.scheduler is not None:
            await self.scheduler.close()
        await self._stop_bootstrap()
        await self.fetcher.close()

    async def _start_bootstrap(self) -> None:
        if self.bootstrap is not None:
            return
        assert self.backend is not None
        server = BootstrapServer(self.rooms, self.cfg.host, self.cfg.bootstrap_port, self.cfg.port,
                                 self.backend.fingerprint, self.cfg.kv_compression, self.cfg.pd_bootstrap_timeout_s)
        await server.start()
        self.bootstrap = server

    async def _stop_bootstrap(self) -> None:
        if self.bootstrap is not None:
            server, self.bootstrap = self.bootstrap, None
            await server.stop()

    # -- views ---------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        assert self.backend is not None
        return self.backend.tokenizer

    @property
    def context_length(self) -> int:
        assert self.backend is not None
        return self.backend.context_length

    @property
    def max_total_tokens(self) -> int:
        return self.cfg.max_batch * (self.context_length if self.backend else 0)

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.rooms.pending == 0 and (self.scheduler is None or self.scheduler.idle)

    @property
    def live_mode(self) -> str:
        return "null" if self.role == "both" else self.role

    def check_serving(self) -> None:
        if self.closing:
            raise ApiError(503, "the server is shutting down")
        if not self.ready:
            raise ApiError(503, "the server is starting (model loading)")
        if self.switching:
            raise ApiError(503, "a prefill/decode role switch is in progress")

    def refresh_gauges(self) -> None:
        if self.scheduler is None:
            return
        self.metrics.gen_throughput.set(self.scheduler.gen_throughput())
        total = self.max_total_tokens
        held = self.scheduler.kv_tokens + sum(
            r.ready.result().num_tokens for r in self.rooms.rooms.values() if r.ready.done() and not r.ready.exception()
        )
        self.metrics.num_used_tokens.set(held)
        self.metrics.token_usage.set(held / total if total else 0.0)
        self.metrics.cache_hit_rate.set(0.0)

    # -- generation ----------------------------------------------------------------------------------
    def mode_for(self, item: GenerateItem) -> Mode:
        if self.role == "both" or item.bootstrap_host == FAKE_BOOTSTRAP_HOST:
            return Mode.LOCAL
        if item.bootstrap_room is None:
            raise bad_request("Invalid request: Disaggregated request received without bootstrap room id",
                              "bootstrap_room")
        return Mode.PREFILL if self.role == "prefill" else Mode.DECODE

    def new_sequence(self, item: GenerateItem, mode: Mode) -> Sequence:
        return Sequence(item=item, mode=mode, tokenizer=self.tokenizer, context_length=self.context_length)

    async def start(self, item: GenerateItem) -> Sequence:
        """Start one request; a local/decode sequence comes back running, a prefill one finished."""
        assert self.scheduler is not None
        mode = self.mode_for(item)
        if mode == Mode.LOCAL:
            seq = self.new_sequence(item, mode)
            self.scheduler.submit(seq)
            return seq
        if mode == Mode.DECODE:
            return await self._start_decode(item)
        return await self._run_prefill(item)

    def abort(self, seq: Sequence, message: str = "client disconnected") -> None:
        if self.scheduler is not None and not seq.finished:
            self.scheduler.abort(seq, message)

    async def _run_prefill(self, item: GenerateItem) -> Sequence:
        assert self.scheduler is not None and self.backend is not None and item.bootstrap_room is not None
        room = self.rooms.attach(item.bootstrap_room)
        seq = self.new_sequence(item, Mode.PREFILL)
        self.scheduler.submit(seq)
        try:
            await seq.wait_finished()
            if seq.error is not None:
                raise seq.error
            if seq.first_choice is None:  # aborted before it was computed
                raise ApiError(503, f"prefill of bootstrap_room {room.room} was aborted: {seq.finish_reason}")
            c = seq.first_choice
            room.ready.set_result(kv_wire.KVPayload(
                layers=seq.handoff_layers, first_token=c.token, room=room.room, model=self.backend.fingerprint,
                prompt_sha256=kv_wire.prompt_digest(item.input_ids), first_logprob=c.logprob, first_top=c.top,
            ))
            seq.handoff_layers = None
            timeout = self.cfg.pd_bootstrap_timeout_s
            try:
                await asyncio.wait_for(asyncio.shield(room.fetched), timeout)
            except TimeoutError:
                raise ApiError(504, f"no decode worker fetched the KV of bootstrap_room {room.room} within "
                                    f"{timeout:g} s; the KV was freed") from None
            except RoomClosed as e:
                if e.status == 499:  # the decode side gave up (its client left): not this worker's failure
                    seq.finish_reason = {"type": "abort", "message": e.message}
                    return seq
                raise ApiError(e.status, e.message) from None
            return seq
        except BaseException as e:
            self.abort(seq, "prefill request ended")
            message = e.message if isinstance(e, ApiError) else "the prefill request was cancelled"
            self.rooms.close(room, getattr(e, "status", 502), message)
            raise
        finally:
            self.rooms.discard(room)

    async def _start_decode(self, item: GenerateItem) -> Sequence:
        assert self.scheduler is not None and self.backend is not None and item.bootstrap_room is not None
        if not item.bootstrap_host:
            raise bad_request("bootstrap_host is required for a decode worker", "bootstrap_host")
        host, room = item.bootstrap_host, item.bootstrap_room
        port = item.bootstrap_port or self.cfg.bootstrap_port  # SGLang: null means this worker's own setting
        wanted = item.kv_compression or (self.cfg.kv_compression if self.cfg.kv_compression != "none" else None)
        seq = self.new_sequence(item, Mode.DECODE)
        loop = asyncio.get_running_loop()
        received = False
        try:
            data = await self.fetcher.fetch(host, port, room, wanted, self.cfg.pd_waiting_timeout_s)
            received = True
            try:
                payload, _ = await loop.run_in_executor(None, kv_wire.decode, data)
            except (kv_wire.WireError, KeyError, ValueError) as e:
                raise ApiError(502, f"bad KV payload for bootstrap_room {room} from {host}:{port}: {e}") from e
            self._check_payload(payload, item, f"{host}:{port}")
            seq.kv = await loop.run_in_executor(None, self.backend.import_kv, payload.layers, item.input_ids)
        except BaseException as e:
            if not received and not (isinstance(e, ApiError) and e.code == "unknown_bootstrap_room"):
                reason = e.message if isinstance(e, ApiError) else "the decode request was cancelled"
                self._background(self.fetcher.abort(host, port, room, reason))
            raise
        seq.first_choice = TokenChoice(payload.first_token, payload.first_logprob, payload.first_top)
        self.scheduler.submit(seq)
        return seq

    def _check_payload(self, payload: kv_wire.KVPayload, item: GenerateItem, where: str) -> None:
        assert self.backend is not None
        b = self.backend
        if payload.model != b.fingerprint:
            raise ApiError(500, f"the prefill worker at {where} runs model {payload.model}; "
                                f"this decode worker runs {b.fingerprint}")
        if payload.room != item.bootstrap_room:
            raise ApiError(502, f"asked for bootstrap_room {item.bootstrap_room}, got {payload.room}")
        if payload.prompt_sha256 != kv_wire.prompt_digest(item.input_ids):
            raise bad_request(f"the KV of bootstrap_room {item.bootstrap_room} was computed for a different prompt",
                              "bootstrap_room")
        shape = (len(payload.layers), *payload.layers[0][0].shape) if payload.layers else (0,)
        want = (b.kv_layers, b.kv_heads, len(item.input_ids), b.head_dim)
        if shape != want:
            raise ApiError(502, f"KV shape {shape} from {where} does not match (layers, heads, tokens, dim) {want}")

    async def health_generate(self) -> bool:
        """Generate one token locally (SGLang uses its fake bootstrap host for this in PD mode)."""
        item = GenerateItem(input_ids=self.tokenizer.encode("hi") or [0],
                            params=SamplingParams(max_new_tokens=1, temperature=0.0), rid="health_generate",
                            bootstrap_host=FAKE_BOOTSTRAP_HOST, bootstrap_room=0)
        seq = await self.start(item)
        try:
            await asyncio.wait_for(seq.wait_finished(), HEALTH_GENERATE_TIMEOUT_S)
        except TimeoutError:
            self.abort(seq, "health check timed out")
            return False
        return seq.error is None

    # -- role switch (SGLang's POST /pd_role_switch) ---------------------------------------------------
    async def switch_role(self, body: Any) -> tuple[int, dict[str, Any]]:
        new_role = body.get("new_role") if isinstance(body, dict) else None
        old = self.role

        def answer(ok: bool, message: str, safe: bool = True) -> tuple[int, dict[str, Any]]:
            return (200 if ok else 400), {"success": ok, "message": message, "old_role": old,
                                          "new_role": new_role, "safe_to_restore": safe}

        if not self.cfg.enable_pd_role_switch:
            return answer(False, "role switching is disabled; start the server with --enable-pd-role-switch")
        if new_role not in ("prefill", "decode"):
            return answer(False, f"invalid new_role {new_role!r}; expected 'prefill' or 'decode'")
        if self.cfg.role == "both":
            return answer(False, "instance is not running in PD disaggregation mode (launched as both/null)")
        if self.unhealthy:
            return answer(False, "instance is unhealthy after a failed role switch; restart required", False)
        if self.switching:
            return answer(False, "another role switch is in progress")
        if not self.ready:
            return answer(False, "instance is still starting")
        if new_role == old:
            return answer(True, "already in target role")
        if not self.idle:
            return answer(False, "instance is not idle; drain all requests before switching")
        self.switching = True
        try:
            if new_role == "prefill":
                try:
                    await self._start_bootstrap()
                except OSError as e:
                    return answer(False, f"cannot serve bootstrap port {self.cfg.bootstrap_port}: {e}")
            else:
                await self._stop_bootstrap()
                self.rooms.fail_all("this worker switched to decode")
            self.role = new_role
        except Exception as e:  # torn down half-way: like SGLang, do not pretend to roll back
            self.unhealthy = True
            log.exception("role switch failed")
            return answer(False, f"role switch failed ({e!r}); instance is unhealthy, restart required", False)
        finally:
            self.switching = False
        log.info("role switched %s -> %s", old, new_role)
        return answer(True, f"switched from {old} to {new_role}")

    # -- info ------------------------------------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        cfg = self.cfg
        b = self.backend
        s = self.scheduler
        ctx = b.context_length if b else cfg.context_length
        return {
            "model_path": b.model_path if b else cfg.model,
            "tokenizer_path": b.tokenizer.path if b else None,
            "served_model_name": cfg.name,
            "model": cfg.model,
            "host": cfg.host,
            "port": cfg.port,
            "tp_size": 1, "pp_size": 1, "dp_size": 1, "ep_size": 1,
            "disaggregation_mode": cfg.disaggregation_mode,
            "disaggregation_bootstrap_port": cfg.bootstrap_port,
            "disaggregation_transfer_backend": "tcp",
            "enable_pd_role_switch": cfg.enable_pd_role_switch,
            "kv_compression": cfg.kv_compression,
            "context_length": ctx,
            "max_running_requests": cfg.max_batch,
            "max_batch_size": cfg.max_batch,
            "max_num_reqs": cfg.max_batch,
            "max_total_num_tokens": self.max_total_tokens,
            "max_total_tokens": self.max_total_tokens,
            "max_prefill_tokens": cfg.max_prefill_tokens,
            "max_req_input_len": (ctx - 1) if ctx else None,
            "page_size": 1,
            "dtype": "float32",
            "device": "cpu",
            "engine": "thunderserve-reference",
            "backend": b.kind if b else None,
            "pd_bootstrap_timeout_s": cfg.pd_bootstrap_timeout_s,
            "pd_waiting_timeout_s": cfg.pd_waiting_timeout_s,
            "emulate_prefill_ms_per_token": cfg.emulate_prefill_ms_per_token,
            "emulate_decode_ms_per_step": cfg.emulate_decode_ms_per_step,
            "kv_bytes_sent": self.bootstrap.bytes_sent if self.bootstrap else 0,
            "kv_bytes_received": self.fetcher.bytes_received,
            "internal_states": [{
                "last_gen_throughput": s.gen_throughput() if s else 0.0,
                "avg_spec_accept_length": None,
                "disaggregation_mode": self.live_mode,
                "num_running_reqs": len(s.running) if s else 0,
                "num_waiting_reqs": len(s.waiting) if s else 0,
            }],
            "status": "ready" if self.ready else ("unhealthy" if self.unhealthy else "starting"),
            "version": VERSION,
        }

    def model_info(self) -> dict[str, Any]:
        b = self.backend
        return {
            "model_path": b.model_path if b else self.cfg.model,
            "tokenizer_path": b.tokenizer.path if b else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": b.model_type if b else None,
            "architectures": [b.architecture] if b else None,
        }

    def loads(self) -> dict[str, Any]:
        s = self.scheduler
        used = s.kv_tokens if s else 0
        total = self.max_total_tokens
        return {
            "timestamp": time.time(), "version": VERSION, "accelerator": "cpu", "num_accelerators": 0,
            "loads": [{
                "dp_rank": 0,
                "num_running_reqs": len(s.running) if s else 0,
                "num_waiting_reqs": len(s.waiting) if s else 0,
                "num_used_tokens": used, "max_total_num_tokens": total,
                "token_usage": used / total if total else 0.0,
                "gen_throughput": s.gen_throughput() if s else 0.0,
                "cache_hit_rate": 0.0,
                "utilization": (len(s.running) / self.cfg.max_batch) if s else 0.0,
                "disagg": {"mode": self.live_mode, "pending_rooms": self.rooms.pending,
                           "aborted_rooms": self.rooms.aborted},
            }],
        }

