"""deploy/: the Grafana dashboard queries only metrics that the gateway and the workers really export, and the
example config's provisioner section is checked field by field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.metrics import GatewayMetrics
from provisioner.config import ConfigError, load_provisioner_config
from replicas.engine.metrics import EngineMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"

GATEWAY_METRICS = {
    "ts_gateway_requests_total", "ts_gateway_ttft_seconds", "ts_gateway_tpot_seconds", "ts_gateway_e2e_seconds",
    "ts_gateway_worker_outstanding", "ts_gateway_retries_total", "ts_gateway_migrations_total",
    "ts_gateway_plan_version",
}
WORKER_METRICS = {"sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:gen_throughput"}
METRIC_NAME = re.compile(r"\b(ts_gateway_[a-z0-9_]+|sglang:[a-z0-9_]+)")
HISTOGRAM_SERIES = re.compile(r"_(bucket|count|sum)$")


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def metric_family(series: str) -> str:
    """``ts_gateway_ttft_seconds_bucket`` -> ``ts_gateway_ttft_seconds`` (histogram series -> family)."""
    base = HISTOGRAM_SERIES.sub("", series)
    return base if base in GATEWAY_METRICS | WORKER_METRICS else series


def test_every_panel_queries_a_known_metric() -> None:
    dash = dashboard()
    assert dash["title"] == "ThunderServe" and dash["uid"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = {metric_family(m) for m in METRIC_NAME.findall(target["expr"])}
            assert names, f"panel {panel['title']!r}: {target['expr']!r} names no metric"
            unknown = names - GATEWAY_METRICS - WORKER_METRICS
            assert not unknown, f"panel {panel['title']!r} queries unknown metric(s) {unknown}"
            used |= names
    assert used == GATEWAY_METRICS | WORKER_METRICS, f"metrics with no panel: {GATEWAY_METRICS | WORKER_METRICS - used}"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert {metric_family(m) for m in METRIC_NAME.findall(var["definition"])} <= GATEWAY_METRICS


def test_dashboard_metrics_are_what_the_code_exports() -> None:
    """The names come from the real registries of the gateway and the reference engine (SGLang's names)."""
    gateway = GatewayMetrics()
    gateway.watch_workers(lambda: [])  # the per-worker families are collected from the live worker table
    exported = gateway.render().decode() + EngineMetrics("tiny").render().decode()
    families = set(re.findall(r"^# TYPE (\S+) (\S+)", exported, re.M))
    names = {name for name, _ in families}
    counters = {name for name, kind in families if kind == "counter"}
    for metric in GATEWAY_METRICS | WORKER_METRICS:
        family = metric.removesuffix("_total") if metric.removesuffix("_total") in counters else metric
        assert family in names, f"{metric} is not exported by the code"


def test_dashboard_panels_do_not_overlap() -> None:
    boxes = [(p["title"], p["gridPos"]) for p in dashboard()["panels"]]
    for i, (a, g) in enumerate(boxes):
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for b, h in boxes[i + 1:]:
            overlap = g["x"] < h["x"] + h["w"] and h["x"] < g["x"] + g["w"] and g["y"] < h["y"] + h["h"] \
                and h["y"] < g["y"] + g["h"]
            assert not overlap, f"panels {a!r} and {b!r} overlap"


def test_example_config_parses_with_every_documented_field() -> None:
    cfg = yaml.safe_load((DEPLOY / "example-config.yaml").read_text())
    assert {"deployment", "model", "budget_per_hour", "slo", "workload", "spot", "provisioner"} <= set(cfg)
    assert cfg["budget_per_hour"] > 0 and 0 < cfg["slo"]["attainment"] < 1
    prov = load_provisioner_config(cfg["provisioner"])
    assert prov.kind == "skypilot" and prov.clouds == ("runpod", "lambda", "vast") and prov.regions == ("US", "CA")
    assert prov.fallback.max_spot_failures == 2 and prov.poll_interval_s == 30
    settings = prov.node_settings("redis://:pw@10.0.0.5:6379/0", cfg["deployment"])
    assert settings.agent_port == 8700 and settings.autodown_idle_minutes == 10
    assert load_provisioner_config(None).kind == "skypilot"  # every field has a default


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kind": "aws"}, "provisioner.kind: expected one of skypilot, local"),
        ({"clouds": "runpod"}, "provisioner.clouds: expected list"),
        ({"spot_fallback": {"max_spot_failures": 0}}, "provisioner.spot_fallback: max_spot_failures must be"),
        ({"spot_fallback": {"max_spot_failures": True}}, "provisioner.spot_fallback.max_spot_failures: expected int"),
        ({"node": {"agent_port": "8700"}}, "provisioner.node.agent_port: expected int"),
        ({"node": {"gpu": 1}}, "provisioner.node.gpu: unknown field"),
        ({"polling": 3}, "provisioner.polling: unknown field"),
    ],
)
def test_bad_provisioner_config_names_the_field(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_provisioner_config(section)


def test_provisioner_modules_import_without_sky_or_torch() -> None:
    code = (
        "import sys, provisioner, provisioner.base, provisioner.budget, provisioner.local, provisioner.chaos, "
        "provisioner.skypilot, provisioner.skypilot_task, provisioner.sky_catalog, provisioner.config; "
        "heavy = [m for m in ('sky', 'torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
