"""`tsctl` commands' own logic: what they leave behind when they fail, and how they find a node's processes."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from planner.state import NodeRecord, StateStore
from provisioner import process_group
from provisioner.process_group import parse_pgid
from tsctl.deploy_cmd import _release_leftovers, _slo_line
from tsctl.runtime import Deployment


def test_parse_pgid_reads_the_local_provider_ref() -> None:
    assert parse_pgid("local:pgid=4242") == 4242
    assert parse_pgid("local:") is None  # launch not finished
    assert parse_pgid("sky:ts-default-n0") is None


async def test_down_kills_leftover_local_nodes_by_process_group(state: StateStore, redis_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's whole group is signalled, not only the processes that still carry its tag."""
    await state.put_node(NodeRecord(id="n0", instance_type="local-L4", gpu_type="L4", gpu_count=1, spot=True,
                                    price_per_hour=0.22, status="ready", provider_ref="local:pgid=4242"))
    calls: list[tuple[Any, str]] = []
    monkeypatch.setattr(process_group, "kill_node", lambda pgid, tag, *a: calls.append((pgid, tag)) or [])
    dep = Deployment(name=state.deployment, mode="local", redis_url=redis_url)
    assert await _release_leftovers(dep, wipe=False) == []
    assert calls == [(4242, f"{state.deployment}/n0")]


def _processes_using(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and any(str(home) in f.path for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_up_that_cannot_plan_leaves_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["TS_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tsctl", "up", "--local", "--budget", "0.01", "-d", "tiny-budget"],
                          env=env, capture_output=True, text=True, timeout=180)
    record = tmp_path / "deployments" / "tiny-budget" / "deployment.json"
    left = _processes_using(tmp_path)
    for p in left:  # do not leak them from a failing run of this test either
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert not left, [p.cmdline() for p in left]
    assert not record.exists(), "a deployment that never came up must not be recorded"


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "inf"], "--budget must be a positive, finite"),
    (["--budget", "2", "--port", "70000"], "--port must be 0-65535"),
    (["--budget", "2", "--tpot", "nan"], "--ttft and --tpot must be positive"),
    (["--budget", "2", "--input-len", "0"], "--input-len and --output-len must be >= 1"),
    (["--budget", "2", "--engine-model", "no-such-model"], "--engine-model 'no-such-model': not smollm2"),
    (["--budget", "2", "-d", "../outside"], "deployment name '../outside'"),  # wrote outside $TS_HOME/deployments
])
def test_up_says_what_is_wrong_with_an_argument_before_starting_anything(tmp_path: Path, args: list[str],
                                                                         message: str) -> None:
    """Each of these once started Redis and nodes and then failed with a traceback, a misleading line, or
    (an unknown engine model) waited out its whole --timeout while the engines failed to start."""
    from typer.testing import CliRunner

    from tsctl.main import app

    res = CliRunner().invoke(app, ["up", "--local", "-d", "bad-args", *args], env={"TS_HOME": str(tmp_path)})
    assert res.exit_code == 1 and message in res.output, res.output
    assert not any(tmp_path.iterdir()), list(tmp_path.rglob("*"))  # nothing written, inside or outside


def test_up_stops_waiting_when_the_replicas_keep_failing_to_start(tmp_path: Path) -> None:
    """An engine model that passes the argument check but cannot load (a folder whose config.json is empty):
    the controller restarts the failed engines; ``up`` gives up after two failed starts per replica, says why
    with the engine's own last lines, instead of waiting out --timeout, and ``down`` leaves nothing running."""
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["TS_HOME"] = str(tmp_path / "home")
    up = [sys.executable, "-m", "tsctl", "up", "--local", "--budget", "2", "--max-nodes", "2", "-d", "broken",
          "--engine-model", str(model), "--port", "0", "--timeout", "150"]
    try:
        proc = subprocess.run(up, env=env, capture_output=True, text=True, timeout=170)
    finally:
        subprocess.run([sys.executable, "-m", "tsctl", "down", "-d", "broken"], env=env, capture_output=True,
                       timeout=120)
    left = _processes_using(tmp_path / "home")
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "replicas keep failing to start" in proc.stderr and "cannot load model" in proc.stderr, proc.stderr
    assert "not ready after" not in proc.stderr
    assert not left, [p.cmdline() for p in left]


@pytest.mark.parametrize("admin_key", ["-starts-with-a-dash", "plain_key-123", "--looks-like-a-flag"])
def test_the_gateway_takes_any_admin_key_tsctl_generates(admin_key: str) -> None:
    """A URL-safe random key starts with '-' one time in 64; passed as a separate argument, argparse took
    it for an option and the gateway exited at start (CI once lost four end-to-end tests to it)."""
    from gateway.config import parse_config
    from tsctl.deploy_cmd import gateway_args
    from tsctl.runtime import Deployment

    dep = Deployment(name="d1", mode="local", redis_url="redis://127.0.0.1:6399/0", gateway_url="http://127.0.0.1:8123",
                     admin_key=admin_key)
    cfg = parse_config(gateway_args(dep))
    assert cfg.admin_key == admin_key and cfg.port == 8123 and cfg.deployment == "d1"


def test_down_finds_local_nodes_when_redis_and_the_controller_are_gone(tmp_path: Path) -> None:
    """Redis records the nodes, and the controller releases them; with both SIGKILLed (a crash of the host's
    services), `tsctl down` finds the nodes by the tag their processes carry and leaves nothing running.
    Before, it skipped the nodes whenever Redis did not answer, and their agents and engines ran on."""
    import json
    import signal
    import uuid

    from provisioner.process_group import tagged_node_ids

    name = f"orphans{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"TS_HOME": str(tmp_path)}
    tsctl = [sys.executable, "-m", "tsctl"]
    try:
        up = subprocess.run([*tsctl, "up", "--local", "--budget", "2", "--engine-model", "emulated", "-d", name,
                             "--port", "0", "--timeout", "150"], env=env, capture_output=True, text=True, timeout=200)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        record = json.loads((tmp_path / "deployments" / name / "deployment.json").read_text())
        assert len(tagged_node_ids(name)) >= 2
        for pid in (record["controller_pid"], record["redis_pid"]):
            assert pid and pid > 0  # os.kill(0, ...) would signal this test's own process group
            os.kill(pid, signal.SIGKILL)
        down = subprocess.run([*tsctl, "down", "-d", name], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert tagged_node_ids(name) == set()
    finally:
        for p in _processes_using(tmp_path):
            with contextlib.suppress(psutil.Error):
                p.kill()
        from provisioner.process_group import kill_node, node_tag

        for node_id in tagged_node_ids(name):  # a failing run of this test leaves nothing behind either
            kill_node(None, node_tag(name, node_id))


def test_status_says_the_live_slo_attainment_and_latency_quantiles() -> None:
    """The status line: the share within both targets (red under the target), TTFT / TPOT quantiles as bucket
    bounds ("> 30 s" past the last); nothing when no request was judged or the plan has no SLO."""
    slo = {"target": {"ttft_s": 5.0, "tpot_s": 0.5, "attainment": 0.9}, "window_s": 120.0, "judged": 1140.0,
           "attainment": 0.8, "ttft_p50_at_most_s": 0.1, "ttft_p90_at_most_s": 2.0, "ttft_p99_at_most_s": math.inf,
           "tpot_p50_at_most_s": 0.02, "tpot_p90_at_most_s": 0.05, "tpot_p99_at_most_s": 0.1}
    line = _slo_line(slo)
    assert line.startswith("SLO: [red]80.0%[/red] of 1,140 requests in the last 120 s within TTFT 5s and TPOT 0.5s")
    assert "(target 90%)" in line and "TTFT p50 <= 0.1 s, p90 <= 2 s, p99 > 30 s" in line
    assert "TPOT p50 <= 0.02 s, p90 <= 0.05 s, p99 <= 0.1 s" in line
    assert "[green]95.0%[/green]" in _slo_line({**slo, "attainment": 0.95})
    assert _slo_line({**slo, "attainment": None}) == "" and _slo_line({**slo, "target": {}}) == ""
