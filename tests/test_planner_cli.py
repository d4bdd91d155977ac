"""`tsctl plan`, `tsctl simulate`, `tsctl reschedule`: JSON on stdout, tables, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from planner.plan import Plan
from tsctl.main import app

runner = CliRunner()
POOL_ARGS = ["plan", "--model", "llama-2-7b", "--pool", "2xL40S,RTX3090,RTX3090", "--rate", "2", "--input-len", "512",
             "--output-len", "128", "--ttft", "2s", "--tpot", "100ms", "--time-limit", "1", "--inter-node-gbps", "10"]


def test_plan_json_is_a_valid_plan_and_tables_render(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    res = runner.invoke(app, [*POOL_ARGS, "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = Plan.from_json(res.stdout)
    plan.validate()
    assert plan.model == "llama-2-7b" and plan.expected["goodput_rps"] > 0
    assert 0 <= plan.expected["sim_attainment"] <= 1
    assert Plan.from_json(out.read_bytes()).replicas == plan.replicas
    assert plan.allow_mixed_chunk and json.loads(res.stdout)["allow_mixed_chunk"] is True
    res = runner.invoke(app, [*POOL_ARGS, "--no-mixed-chunk", "--no-simulate", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["allow_mixed_chunk"] is False
    assert not any(r.mixed_chunk for r in Plan.from_json(res.stdout).replicas)
    table = runner.invoke(app, [*POOL_ARGS, "--no-simulate"])
    assert table.exit_code == 0 and "Replicas" in table.output and "Routing" in table.output


def test_simulate_and_reschedule_commands(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    assert runner.invoke(app, [*POOL_ARGS, "--disaggregate", "--no-simulate", "--out", str(path)]).exit_code == 0
    res = runner.invoke(app, ["simulate", "--plan", str(path), "--rate", "1", "--duration", "30", "--json"])
    assert res.exit_code == 0, res.output
    sim = json.loads(res.stdout)
    assert sim["finished"] == sim["admitted"] and 0 <= sim["slo_attainment"] <= 1 and sim["goodput_rps"] > 0
    assert {"ttft_p50", "ttft_p90", "ttft_p99", "tpot_p99"} <= set(sim)
    plan = Plan.from_json(path.read_bytes())
    victim = plan.replicas[0].node_ids[0]
    res = runner.invoke(app, ["reschedule", "--plan", str(path), "--lose", victim, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    Plan.from_dict(out["plan"]).validate()
    assert out["changes"]["lost_nodes"] == [victim]
    human = runner.invoke(app, ["reschedule", "--plan", str(path), "--lose", victim])
    assert human.exit_code == 0 and "What changed" in human.output
    other = plan.replicas[-1].node_ids[0]
    res = runner.invoke(app, ["reschedule", "--plan", str(path), "--moved", f"{other}=lambda/us-west-1@3.5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [m["node"] for m in out["changes"]["moved_nodes"]] == [other]
    placed = {(i["id"], i["region"], i["price_per_hour"]) for i in out["plan"]["instances"]}
    assert (other, "us-west-1", 3.5) in placed


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("InstanceType,Price\nx,1\n")
    plan_path = tmp_path / "plan.json"
    assert runner.invoke(app, [*POOL_ARGS, "--no-simulate", "--out", str(plan_path)]).exit_code == 0
    cases = [
        (["plan", "--model", "gpt-9", "--budget", "5"], "unknown model 'gpt-9'"),
        (["plan", "--model", "llama-2-7b", "--pool", "3xWarp9"], "unknown GPU type 'Warp9'"),
        (["plan", "--model", "llama-2-70b", "--budget", "0.3", "--no-simulate"], "too small for one replica"),
        (["plan", "--model", "llama-2-7b", "--budget", "5", "--catalog", str(bad_csv)], "missing column"),
        (["plan", "--model", "llama-2-7b", "--budget", "5", "--ttft", "soon"], "--ttft must be seconds"),
        (["simulate", "--plan", str(tmp_path / "none.json")], "cannot read plan"),
        (["reschedule", "--plan", str(bad_csv), "--lose", "n0"], "plan is not JSON"),
        (["reschedule", "--plan", str(plan_path)], "give --lose NODE or --moved"),
        (["reschedule", "--plan", str(plan_path), "--moved", "n0=lambda"], "expected NODE=CLOUD/REGION"),
        (["reschedule", "--plan", str(plan_path), "--moved", "n9=lambda/x"], "no node 'n9' in the plan"),
        (["reschedule", "--plan", str(plan_path), "--moved", "n0=lambda/x@cheap"], "is not a number"),
        # each of these was a traceback (or a hang, or a misleading message) before it was checked up front
        (["plan", "--model", "llama-2-7b", "--budget", "5", "--seed", "-1"], "--seed must be >= 0"),
        (["plan", "--model", "llama-2-7b", "--budget", "5", "--inter-node-gbps", "0"], "--inter-node-gbps must be"),
        (["plan", "--model", "llama-2-7b", "--budget", "inf"], "positive, finite --budget"),
        (["plan", "--model", "llama-2-7b", "--budget", "nan"], "positive, finite --budget"),
        (["plan", "--model", "llama-2-7b", "--budget", "5", "--rate", "nan"], "--rate must be finite"),
        (["plan", "--model", "llama-2-7b", "--budget", "5", "--max-gpus", "0"], "--max-gpus must be >= 1"),
        (["plan", "--model", "llama-2-7b", "--pool", "100*4xH100"], "pools of at most 256"),
        (["plan", "--model", "llama-2-7b", "--pool", str(_pool_file(tmp_path, "inter_node_gbps: 0"))],
         "inter_node_gbps must be positive"),
        (["plan", "--model", "llama-2-7b", "--pool", str(_pool_file(tmp_path, "links: [[a, b, 0]]"))],
         "must be positive and finite Gbit/s"),
        (["plan", "--model", "llama-2-7b", "--pool", str(_pool_file(tmp_path, "links: [{a: a, b: b}]"))],
         "links entries are [node, node, gbps]"),
        (["simulate", "--plan", str(_broken_plan(tmp_path, plan_path, network={"inter_node_gbps": 0}))],
         "network.inter_node_gbps must be positive"),
        (["simulate", "--plan", str(_broken_plan(tmp_path, plan_path, workload={"rate": "fast"}))],
         "the plan's workload or slo is malformed"),
        (["reschedule", "--plan", str(_broken_plan(tmp_path, plan_path, network={"links": [["n0"]]})), "--lose", "n0"],
         "network.links entries are"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code != 0, args
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output
        assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1


def _pool_file(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / f"pool{len(list(tmp_path.glob('pool*.yaml')))}.yaml"
    path.write_text(f"nodes:\n  - {{id: a, gpu: L40S, count: 2}}\n  - {{id: b, gpu: L40S}}\n{extra}\n")
    return path


def _broken_plan(tmp_path: Path, plan_path: Path, **fields: object) -> Path:
    """The plan at ``plan_path`` with ``fields`` replaced (as a hand-edited plan file would be)."""
    data = json.loads(plan_path.read_text())
    data.update(fields)
    path = tmp_path / f"broken{len(list(tmp_path.glob('broken*.json')))}.json"
    path.write_text(json.dumps(data))
    return path


def test_a_plan_cut_short_by_its_time_limit_says_what_it_left_out() -> None:
    """The plan table's "planned in" row tells a user the time limit cut the rent step (a longer limit may
    find a better rental); a plan that was not cut says nothing more."""
    from tsctl.plan_cmd import _cut_short

    assert _cut_short({"plan_seconds": 1.0, "rent_seconds": 0.5}) == ""
    note = _cut_short({"rent_places_left": 26.0, "second_pass_left": 1.0})
    assert "26 places not solved" in note and "second rent pass and hand-built plans left out" in note
    assert _cut_short({"second_pass_left": 1.0}).count(";") == 0
