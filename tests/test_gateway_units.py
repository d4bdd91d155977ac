"""Gateway pieces that need no worker: pair selection, breaker, validation, stop strings, detokenizing, flags."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from gateway.config import ConfigError, StaticWorker, parse_config
from gateway.errors import ApiError
from gateway.passthrough import merge_logprobs, merge_logprobs_event
from gateway.routing import NoWorkers, Pair, RoutingTable, plan_table, static_table
from gateway.stops import StopMatcher
from gateway.tokenizer import ByteTokenizer, IncrementalDetokenizer, TextTokenizer
from gateway.upstream import splice_bootstrap
from gateway.validation import parse_chat, parse_completion, parse_generate, parse_object
from gateway.workers import CircuitBreaker, WorkerPool
from gateway.workload_meter import STREAM_TAIL_BYTES, StreamTail, WorkloadMeter
from planner.plan import Instance, Plan, ReplicaSpec, Route
from planner.state import ReplicaRecord


def two_pair_table(w0: float, w1: float) -> tuple[RoutingTable, WorkerPool]:
    pool = WorkerPool()
    p = pool.get("http://p:1", "prefill")
    d0, d1 = pool.get("http://d0:1", "decode"), pool.get("http://d1:1", "decode")
    return RoutingTable([Pair(p, d0, w0, 9000), Pair(p, d1, w1, 9000)]), pool


# -- pair selection -----------------------------------------------------------------------------------
def test_idle_selection_follows_the_weights() -> None:
    table, _ = two_pair_table(0.7, 0.3)
    rng = random.Random(1)
    counts = Counter(table.choose(rng).decode.url for _ in range(20_000))
    assert counts["http://d0:1"] / 20_000 == pytest.approx(0.7, abs=0.015)


def test_loaded_selection_keeps_load_proportional_to_share() -> None:
    """Under load, power-of-two on load/share keeps in-flight work proportional to the weights."""
    table, _ = two_pair_table(0.75, 0.25)
    rng = random.Random(2)
    in_flight: list[Pair] = []
    for _ in range(400):
        pair = table.choose(rng)
        pair.decode.acquire(0)
        in_flight.append(pair)
        if len(in_flight) > 40:  # steady state: the oldest request completes
            done = in_flight.pop(0)
            done.decode.release(0)
    loads = Counter(p.decode.url for p in in_flight)
    assert loads["http://d0:1"] / len(in_flight) == pytest.approx(0.75, abs=0.1)


def test_overloaded_worker_is_avoided() -> None:
    table, pool = two_pair_table(0.5, 0.5)
    busy = pool.get("http://d0:1", "decode")
    for _ in range(50):
        busy.acquire(100)
    rng = random.Random(3)
    counts = Counter(table.choose(rng).decode.url for _ in range(1000))
    assert counts["http://d1:1"] > 700  # both draws must hit d0 for it to win: ~25%


def test_unavailable_and_avoided_workers_are_skipped() -> None:
    table, pool = two_pair_table(0.9, 0.1)
    d0 = pool.get("http://d0:1", "decode")
    d0.mark_unreachable()
    rng = random.Random(4)
    assert {table.choose(rng).decode.url for _ in range(200)} == {"http://d1:1"}
    d0.mark_health(True, 2)
    d1 = pool.get("http://d1:1", "decode")
    assert {table.choose(rng, avoid={d1}).decode.url for _ in range(50)} == {"http://d0:1"}
    d0.mark_unreachable()
    d1.mark_unreachable()
    with pytest.raises(NoWorkers):
        table.choose(rng)


def test_breaker_opens_then_lets_one_probe_through(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("gateway.workers.time.monotonic", lambda: clock[0])
    cb = CircuitBreaker(threshold=3, cooldown_s=5.0)
    for _ in range(2):
        cb.failure()
    assert cb.allows() and cb.state == "closed"
    cb.failure()
    assert not cb.allows() and cb.state == "open"
    clock[0] += 5.0
    assert cb.allows() and cb.state == "half_open"
    cb.on_dispatch()
    assert not cb.allows()  # only one probe at a time
    cb.failure()
    assert cb.state == "open"
    clock[0] += 5.0
    cb.on_dispatch()
    cb.success()
    assert cb.state == "closed" and cb.allows()


def test_static_table_is_uniform_over_pairs_and_colocated() -> None:
    pool = WorkerPool()
    table = static_table([StaticWorker("http://p0:1", "prefill", 9001), StaticWorker("http://p1:1", "prefill"),
                          StaticWorker("http://d0:1", "decode"), StaticWorker("http://c:1", "both")], pool)
    assert sorted(p.label() for p in table.pairs) == ["http://c:1", "http://p0:1->http://d0:1",
                                                       "http://p1:1->http://d0:1"]
    assert {p.bootstrap_port for p in table.pairs if not p.colocated} == {9001, None}


def test_plan_table_drops_replicas_that_are_not_ready() -> None:
    plan = Plan(
        model="tiny",
        instances=[Instance(f"n{i}", "x", "L4", 1, True, 1.0) for i in range(4)],
        replicas=[ReplicaSpec("p0", ["n0"], [("n0", 0)], 1, 1, "prefill"),
                  ReplicaSpec("d0", ["n1"], [("n1", 0)], 1, 1, "decode"),
                  ReplicaSpec("d1", ["n2"], [("n2", 0)], 1, 1, "decode"),
                  ReplicaSpec("c0", ["n3"], [("n3", 0)], 1, 1, "both")],
        routing=[Route("p0", "d0", 0.5), Route("p0", "d1", 0.3), Route("c0", "c0", 0.2)],
        version=7,
    )
    recs = {
        "p0": ReplicaRecord("p0", ["n0"], "prefill", url="http://p0:1", bootstrap_port=9100, status="ready"),
        "d0": ReplicaRecord("d0", ["n1"], "decode", url="http://d0:1", status="ready"),
        "d1": ReplicaRecord("d1", ["n2"], "decode", url="http://d1:1", status="draining"),
        "c0": ReplicaRecord("c0", ["n3"], "both", url="http://c0:1", status="ready"),
    }
    table = plan_table(plan, recs, WorkerPool())
    assert table.version == 7 and table.model == "tiny"
    assert {(p.label(), p.weight, p.bootstrap_port) for p in table.pairs} == {("p0->d0", 0.5, 9100), ("c0", 0.2, None)}
    assert table.share[table.pairs[0].decode] == pytest.approx(0.5 / 0.7)
    # a replica the plan has flipped to decode while it still serves prefill is not routed to yet
    recs["d0"] = ReplicaRecord("d0", ["n1"], "prefill", url="http://d0:1", status="ready")
    assert {p.label() for p in plan_table(plan, recs, WorkerPool()).pairs} == {"c0"}


def test_a_plan_not_servable_yet_is_served_in_the_roles_replicas_serve_now() -> None:
    """After a decode node is lost, p1 stands in as decode; the replacement's plan gives p1 back to prefill
    and d2 (still booting) the decode role. Until d2 is ready no route of the plan is usable: the table
    pairs the ready replicas as they serve now (p0 -> p1) rather than leaving requests waiting, and goes
    back to the plan's routes once they are usable."""
    plan = Plan(
        model="tiny",
        instances=[Instance(f"n{i}", "x", "L4", 1, True, 1.0) for i in range(3)],
        replicas=[ReplicaSpec("p0", ["n0"], [("n0", 0)], 1, 1, "prefill"),
                  ReplicaSpec("p1", ["n1"], [("n1", 0)], 1, 1, "prefill"),
                  ReplicaSpec("d2", ["n2"], [("n2", 0)], 1, 1, "decode")],
        routing=[Route("p0", "d2", 0.5), Route("p1", "d2", 0.5)],
        version=8,
    )
    recs = {
        "p0": ReplicaRecord("p0", ["n0"], "prefill", url="http://p0:1", bootstrap_port=9100, status="ready"),
        "p1": ReplicaRecord("p1", ["n1"], "decode", url="http://p1:1", status="ready"),
        "d2": ReplicaRecord("d2", ["n2"], "decode", url="http://d2:1", status="starting"),
        "gone": ReplicaRecord("gone", ["n9"], "decode", url="http://gone:1", status="ready"),  # not in the plan
    }
    table = plan_table(plan, recs, WorkerPool())
    assert [(p.label(), p.bootstrap_port) for p in table.pairs] == [("p0->p1", 9100)]
    recs["d2"] = ReplicaRecord("d2", ["n2"], "decode", url="http://d2:1", status="ready")
    assert {p.label() for p in plan_table(plan, recs, WorkerPool()).pairs} == {"p0->d2"}


# -- bodies -------------------------------------------------------------------------------------------
def test_splice_adds_bootstrap_fields_that_win_over_the_clients() -> None:
    pool = WorkerPool()
    pair = Pair(pool.get("http://10.0.0.5:30000", "prefill"), pool.get("http://d:1", "decode"), 1.0, 9001)
    body = b'{"text": "hi", "bootstrap_room": 5, "sampling_params": {"max_new_tokens": 4}}  \n'
    out = orjson.loads(splice_bootstrap(body, pair))
    assert out["bootstrap_host"] == "10.0.0.5" and out["bootstrap_port"] == 9001
    assert out["bootstrap_room"] != 5 and 0 <= out["bootstrap_room"] < 2**63
    assert out["sampling_params"] == {"max_new_tokens": 4}
    colocated = Pair(pool.get("http://c:1", "both"), pool.get("http://c:1", "both"), 1.0)
    assert splice_bootstrap(body, colocated) == body


def test_logprobs_of_prefill_come_first() -> None:
    prefill = orjson.dumps({"meta_info": {"input_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]]}})
    decode = orjson.dumps({"text": "x", "meta_info": {"input_token_logprobs": [[-3.0, 7, None]]}})
    merged = orjson.loads(merge_logprobs(prefill, decode))
    assert [x[1] for x in merged["meta_info"]["input_token_logprobs"]] == [5, 6, 7]
    assert merge_logprobs(b"not json", decode) == decode
    line = b"data: " + decode + b"\n"
    lps = orjson.loads(prefill)["meta_info"]["input_token_logprobs"]
    ev = orjson.loads(merge_logprobs_event(line, lps)[5:])
    assert [x[1] for x in ev["meta_info"]["input_token_logprobs"]] == [5, 6, 7]
    assert merge_logprobs_event(b"data: [DONE]\n", lps) == b"data: [DONE]\n"


# -- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type"),
        ({"model": 5, "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": True}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}},
         "stream_options.include_usage"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, "seed"),  # not an int64
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 2.0**80}, "seed"),  # as JSON parses it
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": [1]}, "logit_bias"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": -101}}, "logit_bias.7"),
    ],
)
def test_chat_validation_names_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_chat_and_completion_requests_map_to_sampling_params() -> None:
    req = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                    {"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "seed": 3, "stop": "\n",
                      "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
                      "top_logprobs": 2, "extra_vendor_field": 1})
    assert req.messages == [{"role": "system", "content": "ab"}]
    assert req.max_tokens == 7 and req.stop == ["\n"] and req.stream and req.include_usage
    assert req.sampling == {"temperature": 0.0, "sampling_seed": 3} and req.logprobs == 2
    biased = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": 5}})
    assert biased.sampling == {"logit_bias": {"7": 5.0}}
    negative = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": -(2**63)})
    assert negative.sampling == {"sampling_seed": -(2**63)}  # OpenAI's seed is any int64; the engine maps it
    comp = parse_completion({"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 5, "echo": True})
    assert comp.prompt == [1, 2, 3] and comp.echo
    for bad, param in (({"model": "m", "prompt": ["a", "b"]}, "prompt"), ({"model": "m", "prompt": ""}, "prompt"),
                       ({"model": "m", "prompt": [1, -2]}, "prompt"), ({"model": "m", "prompt": "x", "suffix": "y"},
                                                                       "suffix")):
        with pytest.raises(ApiError) as err:
            parse_completion(bad)
        assert err.value.param == param


def test_body_and_generate_validation() -> None:
    for raw, code in ((b"", "empty_body"), (b"{nope", "invalid_json"), (b"[1, 2]", "invalid_type")):
        with pytest.raises(ApiError) as err:
            parse_object(raw)
        assert err.value.status == 400 and err.value.code == code
    g = parse_generate({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 9}, "stream": True})
    assert g.input_ids == [1, 2, 3] and g.max_new_tokens == 9 and g.stream and g.token_estimate == 12
    for bad, param in (({}, None), ({"sampling_params": {}}, "text"), ({"text": 3}, "text"),
                       ({"text": "a", "input_ids": [1]}, "input_ids"), ({"input_ids": [1, "2"]}, "input_ids"),
                       ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
                       ({"text": "a", "sampling_params": [{"top_p": 2}]}, "sampling_params[0].top_p"),
                       ({"text": "a", "stream": 1}, "stream")):
        with pytest.raises(ApiError) as err:
            parse_generate(bad)
        assert err.value.status == 400 and err.value.param == param, bad


# -- stop strings and detokenizing --------------------------------------------------------------------
def test_stop_matcher_holds_back_a_possible_prefix_and_cuts_at_the_match() -> None:
    m = StopMatcher(["END", "\n\n"])
    out = [m.feed(d) for d in ("hello E", "N", "D tail")]
    assert "".join(out) == "hello " and m.matched == "END"
    m2 = StopMatcher(["END"])
    assert m2.feed("abcEN") == "abc" and m2.feed("x") == "ENx" and m2.flush() == ""
    assert StopMatcher([]).feed("anything") == "anything"


def test_byte_tokenizer_round_trips_and_detokenizes_split_characters() -> None:
    tok = ByteTokenizer()
    text = "héllo → 世界"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.finish() == text
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == list(
        b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_hf_tokenizer_matches_transformers_chat_template() -> None:
    """Against SmolLM2's own tokenizer, converted here on first use (on a fresh machine this test used to be
    skipped whenever it ran before the engine tests that convert the model)."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from replicas.engine.model_store import smollm2_dir

    folder = smollm2_dir()
    ours = TextTokenizer.from_path(folder)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "What is the capital of France? ✓"}]
    assert ours.encode_chat(messages) == list(theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=True, return_dict=False))
    ids = ours.encode("Streaming text with émojis 🎉 and spaces  ")
    detok = IncrementalDetokenizer(ours)
    text = "".join(detok.push([i]) for i in ids) + detok.finish()
    assert text == theirs.decode(ids) == ours.decode(ids)


# -- command line -------------------------------------------------------------------------------------
def test_config_parses_router_style_flags_and_refuses_bad_ones() -> None:
    cfg = parse_config(["--prefill", "http://127.0.0.1:1", "9001", "--prefill", "http://127.0.0.1:2", "none",
                        "--decode", "http://127.0.0.1:3", "--no-auth"])
    assert [(w.role, w.bootstrap_port) for w in cfg.workers] == [("prefill", 9001), ("prefill", None), ("decode", None)]
    assert cfg.plan_mode is False and cfg.auth_enabled is False
    for argv, message in ((["--no-auth"], "no workers"),
                          (["--prefill", "http://a:1", "--no-auth"], "at least one --prefill and one --decode"),
                          (["--worker", "http://a:1"], "no API keys"),
                          (["--worker", "ftp://a:1", "--no-auth"], "expected an http"),
                          (["--prefill", "http://a:1", "x", "--decode", "http://b:1", "--no-auth"], "not a number")):
        with pytest.raises(ConfigError, match=message):
            parse_config(argv)
    plan = parse_config(["--redis-url", "redis://x:1/0", "--deployment", "d"])
    assert plan.plan_mode and plan.auth_enabled


def test_an_inherited_listening_socket_is_served_and_anything_else_is_one_error_line(tmp_path) -> None:
    """``--listen-fd``: the gateway serves on a listening socket it was handed (``tsctl.keepalive --listen``); a
    descriptor that is not one (a file, here) is one error line and exit 1, not a traceback."""
    import socket
    import subprocess
    import sys
    import urllib.request

    base = [sys.executable, "-m", "gateway", "--worker", "http://127.0.0.1:9", "--no-auth", "--tokenizer", "none"]
    with open(tmp_path / "not-a-socket", "w") as f:
        fd = f.fileno()
        bad = subprocess.run([*base, "--listen-fd", str(fd)], pass_fds=(fd,), capture_output=True, text=True,
                             timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith(f"error: cannot listen on --listen-fd {fd}: "), bad.stderr
    assert "Traceback" not in bad.stderr
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proc = subprocess.Popen([*base, "--port", "1", "--listen-fd", str(listener.fileno())],
                            pass_fds=(listener.fileno(),), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"gateway listening on http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        listener.close()


# -- errors after a stream started --------------------------------------------------------------------
async def test_a_failure_after_the_stream_started_ends_it_with_an_error_event() -> None:
    """The status line is gone already: the client gets an error event and [DONE], not a torn stream."""
    from types import SimpleNamespace

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.app import errors_and_metrics
    from gateway.context import GATEWAY
    from gateway.http import start_sse
    from gateway.metrics import GatewayMetrics

    async def breaks_mid_stream(request: web.Request) -> web.StreamResponse:
        resp = await start_sse(request)
        await resp.write(b'data: {"text": "partial"}\n\n')
        raise RuntimeError("a bug in the relay")

    app = web.Application(middlewares=[errors_and_metrics])
    app[GATEWAY] = SimpleNamespace(cfg=SimpleNamespace(request_timeout_s=30.0), metrics=GatewayMetrics())  # type: ignore[misc]
    app.router.add_post("/v1/chat/completions", breaks_mid_stream)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/chat/completions", data=b"{}")
        body = await resp.read()
    assert resp.status == 200
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[0] == '{"text": "partial"}'
    assert orjson.loads(events[1])["error"]["code"] == "internal_error"
    assert events[2] == "[DONE]"


# -- plan watch ---------------------------------------------------------------------------------------
async def test_plan_watch_survives_a_replica_record_it_cannot_read() -> None:
    """One unreadable read must not end the watch: the gateway would never follow a plan again."""
    from gateway.auth import Authenticator
    from gateway.context import Gateway
    from gateway.metrics import GatewayMetrics
    from gateway.plan_watch import PlanWatcher

    plan = Plan(model="tiny", instances=[Instance(f"n{i}", "x", "L4", 1, True, 1.0) for i in range(2)],
                replicas=[ReplicaSpec("p0", ["n0"], [("n0", 0)], 1, 1, "prefill"),
                          ReplicaSpec("d0", ["n1"], [("n1", 0)], 1, 1, "decode")],
                routing=[Route("p0", "d0", 1.0)], version=3)
    records = {"p0": ReplicaRecord("p0", ["n0"], "prefill", url="http://p0:1", bootstrap_port=9100, status="ready"),
               "d0": ReplicaRecord("d0", ["n1"], "decode", url="http://d0:1", status="ready")}

    class Store:
        bad_reads = 1

        async def get_plan(self) -> Plan:
            return plan

        async def replicas(self) -> dict[str, ReplicaRecord]:
            if self.bad_reads:
                self.bad_reads -= 1
                raise TypeError("ReplicaRecord.__init__() missing 1 required positional argument: 'role'")
            return records

    cfg = parse_config(["--redis-url", "redis://x:1/0"])
    gw = Gateway(cfg=cfg, metrics=GatewayMetrics(), pool=WorkerPool(), auth=Authenticator(None, [], None, False),
                 table=RoutingTable([], source="plan"))
    watcher = PlanWatcher(gw, Store())  # type: ignore[arg-type]
    await watcher._safe_refresh()
    assert gw.table.version == 0
    await watcher._safe_refresh()
    assert gw.table.version == 3 and [p.label() for p in gw.table.pairs] == ["p0->d0"]


async def test_plan_watch_follows_redis_when_the_plan_version_goes_back() -> None:
    """Redis restarted without persistence and the controller republished at v1: the gateway must follow
    it, not keep routing to the replicas of the v5 it saw before."""
    from gateway.auth import Authenticator
    from gateway.context import Gateway
    from gateway.metrics import GatewayMetrics
    from gateway.plan_watch import PlanWatcher

    def plan_of(version: int, decode: str) -> Plan:
        return Plan(model="tiny", instances=[Instance(f"n{i}", "x", "L4", 1, True, 1.0) for i in range(2)],
                    replicas=[ReplicaSpec("p0", ["n0"], [("n0", 0)], 1, 1, "prefill"),
                              ReplicaSpec(decode, ["n1"], [("n1", 0)], 1, 1, "decode")],
                    routing=[Route("p0", decode, 1.0)], version=version)

    class Store:
        plan = plan_of(5, "d0")

        async def get_plan(self) -> Plan:
            return self.plan

        async def replicas(self) -> dict[str, ReplicaRecord]:
            return {"p0": ReplicaRecord("p0", ["n0"], "prefill", url="http://p0:1", bootstrap_port=9100,
                                        status="ready"),
                    "d0": ReplicaRecord("d0", ["n1"], "decode", url="http://d0:1", status="ready"),
                    "d1": ReplicaRecord("d1", ["n1"], "decode", url="http://d1:1", status="ready")}

    store = Store()
    cfg = parse_config(["--redis-url", "redis://x:1/0"])
    gw = Gateway(cfg=cfg, metrics=GatewayMetrics(), pool=WorkerPool(), auth=Authenticator(None, [], None, False),
                 table=RoutingTable([], source="plan"))
    watcher = PlanWatcher(gw, store)  # type: ignore[arg-type]
    assert await watcher.refresh()
    assert gw.table.version == 5 and [p.label() for p in gw.table.pairs] == ["p0->d0"]
    store.plan = plan_of(1, "d1")  # Redis wiped, plan republished
    assert await watcher.refresh()
    assert gw.table.version == 1 and [p.label() for p in gw.table.pairs] == ["p0->d1"]


async def test_admin_key_routes_answer_503_when_redis_is_down() -> None:
    """The admin key routes with Redis unreachable: a 503 in OpenAI's error shape with Retry-After, not a
    500 and a traceback (the gateway itself is fine; its shared store is not)."""
    import socket

    import aiohttp
    from aiohttp import web

    from gateway import admin
    from gateway.app import errors_and_metrics
    from gateway.auth import Authenticator
    from gateway.context import GATEWAY, Gateway
    from gateway.metrics import GatewayMetrics
    from planner.state import StateStore

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = parse_config(["--redis-url", f"redis://127.0.0.1:{dead}/0", "--admin-key", "root"])
    state = StateStore.from_url(cfg.redis_url)
    gw = Gateway(cfg=cfg, metrics=GatewayMetrics(), pool=WorkerPool(),
                 auth=Authenticator(state, [], "root", True), table=RoutingTable([], source="plan"), state=state)
    app = web.Application(middlewares=[errors_and_metrics])
    app[GATEWAY] = gw
    admin.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            root = {"Authorization": "Bearer root"}
            for method, path, body in (("GET", "/admin/keys", None), ("POST", "/admin/keys", {"name": "a"}),
                                       ("DELETE", "/admin/keys/abc", None)):
                async with session.request(method, f"http://127.0.0.1:{port}{path}", json=body, headers=root) as r:
                    err = (await r.json())["error"]
                    assert r.status == 503 and r.headers["Retry-After"] == "2", (path, r.status, err)
                    assert err["code"] == "state_store_unavailable" and "Redis" in err["message"]
            async with session.get(f"http://127.0.0.1:{port}/admin/workers", headers=root) as r:
                assert r.status == 200  # routes that do not need Redis keep working
    finally:
        await runner.cleanup()
        await state.r.aclose()


@pytest.mark.parametrize("seed", range(20))
def test_a_relayed_streams_lengths_are_found_however_its_chunks_split(seed: int) -> None:
    """A pass-through stream is relayed as the network cut it; its final event's lengths are counted once,
    wherever they fall across chunks of any size (1 byte up to a few KiB), and an earlier event's do not count."""
    rng = random.Random(seed)
    events = [b'data: {"text": "%s", "meta_info": {"prompt_tokens": 11, "completion_tokens": %d}}\n\n'
              % (b"x" * rng.randrange(0, 3000), i + 1) for i in range(rng.randrange(1, 12))]
    stream, tail, at = b"".join(events) + b"data: [DONE]\n\n", StreamTail(), 0
    while at < len(stream):
        step = rng.choice((1, 7, 64, 900, 5000))
        tail.add(stream[at:at + step])
        at += step
    assert len(tail.data()) <= 2 * STREAM_TAIL_BYTES and stream.endswith(tail.data())
    meter = WorkloadMeter()
    meter.record_answer(tail.data())
    assert meter.counts["requests"] == 1
    assert (meter.counts["input_sum"], meter.counts["output_sum"]) == (11, len(events))
