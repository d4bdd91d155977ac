"""Planner catalogs: GPU figures, model shapes, offers from vms.csv / SkyPilot / built-in, workloads, pools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from planner.cluster import PoolError, pool_from_spec
from planner.gpus import GPUS, UnknownGpu, canonical_gpu, gpu_spec
from planner.models import MODELS, UnknownModel, load_model
from planner.offers import CatalogError, builtin_offers, load_offers, parse_vms_csv
from planner.workload import Lengths, Workload, WorkloadError, load_azure_trace

SHARED = Path(__file__).resolve().parent / "data" / "sky-catalogs"  # a copy of ../shared/data/catalogs
REQUIRED_GPUS = ["H200", "H100", "A100-80GB", "A100", "L40S", "L40", "A40", "RTXA6000", "L4", "A10G", "A10",
                 "RTX4090", "RTX3090", "T4", "V100"]


def test_gpu_catalog_has_every_required_type_with_a_source() -> None:
    for name in REQUIRED_GPUS:
        g = GPUS[name]
        assert g.tflops > 0 and g.memory_gib > 0 and g.mem_gbs > 0 and g.link_gbs > 0
        assert g.source.startswith("http"), name
    assert gpu_spec("RTX A6000").name == "RTXA6000" and gpu_spec("a6000").name == "RTXA6000"
    assert canonical_gpu("A100", memory_gib=80) == "A100-80GB"
    assert canonical_gpu("A100", memory_gib=40) == "A100"
    assert canonical_gpu("H100", instance_type="gpu_1x_h100_pcie") == "H100-PCIE"
    with pytest.raises(UnknownGpu, match="unknown GPU type 'Z9000'"):
        canonical_gpu("Z9000")


def test_model_shapes_match_public_arithmetic(tmp_path: Path) -> None:
    for name in ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-30b", "llama-3.1-8b", "llama-3.1-70b",
                 "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "smollm2-135m"]:
        assert name in MODELS
    l30 = load_model("llama-30b")
    assert l30.kv_bytes_per_token == 2 * 60 * 6656 * 2  # 1.60 MB/token (scheduler-notes 4.4)
    assert 32.0e9 < l30.params < 32.7e9
    assert load_model("llama-2-70b").kv_bytes_per_token == 2 * 80 * 8 * 128 * 2  # GQA: 0.33 MB/token
    assert 6.6e9 < load_model("llama-2-7b").params < 6.8e9
    assert 7.9e9 < load_model("llama-3.1-8b").params < 8.1e9
    assert 134e6 < load_model("smollm2").params < 136e6  # tied embeddings
    cfg = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2,
           "intermediate_size": 512, "vocab_size": 1000, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path))
    assert (m.layers, m.kv_heads, m.dtype_bytes) == (4, 2, 4)
    assert m.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4
    with pytest.raises(UnknownModel, match="unknown model 'gpt-9'"):
        load_model("gpt-9")


def test_load_offers_reads_every_shared_catalog_in_any_column_order() -> None:
    unknown: set[str] = set()
    files = sorted(SHARED.glob("*_vms.csv"))
    assert len(files) == 3
    offers = load_offers(files, unknown)
    clouds = {o.cloud for o in offers}
    assert clouds == {"lambda", "runpod", "vast"}
    assert all(o.price > 0 and o.gpu_count >= 1 and o.gpu_type in GPUS for o in offers)
    assert all(o.spot_price is None or o.spot_price <= o.price for o in offers)  # runpod L40S oddity tolerated
    runpod_l40s = [o for o in offers if o.cloud == "runpod" and o.gpu_type == "L40S" and o.gpu_count == 1]
    assert runpod_l40s and runpod_l40s[0].price == 0.43  # SpotPrice above Price -> no discount
    lam = {o.instance_type: o.gpu_type for o in offers if o.cloud == "lambda"}
    assert lam["gpu_1x_h100_pcie"] == "H100-PCIE" and lam["gpu_8x_a100_80gb_sxm4"] == "A100-80GB"
    assert lam["gpu_1x_a100"] == "A100"  # 40 GB by its GpuInfo
    assert "RTX4000-Ada" in unknown  # no figures for it: skipped, and said so
    # Vast's GpuInfo gives the instance's total GPU memory (2x V100 16 GB = 32768 MiB): per GPU it is 16 GB,
    # so neither V100-32GB nor A100-80GB (2x A100 SXM4 40 GB = 81920 MiB) may come out of it
    vast = {o.instance_type: o.gpu_type for o in offers if o.cloud == "vast"}
    assert vast["1x-Tesla_V100-32-65536"] == vast["2x-Tesla_V100-32-65536"] == "V100"
    assert vast["2x-A100_SXM4-32-65536"] == vast["8x-A100_SXM4-32-65536"] == "A100"
    assert vast["2x-H100_NVL-32-65536"] == "H100-NVL" and vast["12x-RTX_4090-32-65536"] == "RTX4090"


def test_malformed_catalogs_name_file_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "x_vms.csv"
    bad.write_text("InstanceType,AcceleratorName,Price\na,L4,1.0\n")
    with pytest.raises(CatalogError, match=r"missing column.*AcceleratorCount"):
        load_offers([bad])
    bad.write_text("InstanceType,AcceleratorName,AcceleratorCount,Price\na,L4,1,cheap\n")
    with pytest.raises(CatalogError, match=r"x_vms.csv:2 Price: not a number"):
        load_offers([bad])
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_offers([tmp_path / "missing.csv"])
    crlf = "Price,AcceleratorCount,AcceleratorName,InstanceType,SpotPrice\r\n0.8,1,L4,g6,0\r\n"
    (o,) = parse_vms_csv(crlf, "mem", "aws")
    assert (o.gpu_type, o.price, o.spot_price) == ("L4", 0.8, None)


def test_builtin_offers_cover_the_catalog_types() -> None:
    offers = builtin_offers()
    assert {o.gpu_type for o in offers} >= {"H100", "L40S", "L4", "RTX4090"}
    assert all(o.spot_price is not None and o.spot_price < o.price for o in offers)


def test_offers_through_skypilot_catalog_offline(tmp_path: Path) -> None:
    """sky.catalog reads a catalog seeded into a temporary HOME (no network, no credentials)."""
    root = tmp_path / ".sky" / "catalogs" / "v8"
    (root / "aws").mkdir(parents=True)
    (root / "common").mkdir(parents=True)
    (root / "common" / "accelerators.csv").write_text('AcceleratorName,Clouds\nL4,"[\'AWS\']"\nA10G,"[\'AWS\']"\n')
    info = "\"{'Gpus': [{'Name': 'L4', 'Count': 1, 'MemoryInfo': {'SizeInMiB': 22888}}]}\""
    (root / "aws" / "vms.csv").write_text(
        "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,AvailabilityZone\n"
        f"g6.xlarge,L4,1.0,4.0,16.0,{info},0.8048,0.30,us-east-1,use1-az1\n"
        f"g5.xlarge,A10G,1.0,4.0,16.0,{info},1.006,0.45,us-east-1,use1-az1\n")
    code = textwrap.dedent("""
        from planner.offers import sky_cached_clouds, sky_offers
        assert sky_cached_clouds() == ['aws'], sky_cached_clouds()
        got = sorted((o.gpu_type, o.price, o.spot_price, o.region) for o in sky_offers(['aws']))
        print(got)
        assert got == [('A10G', 1.006, 0.45, 'us-east-1'), ('L4', 0.8048, 0.3, 'us-east-1')], got
    """)
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("SKY_RUNTIME_DIR", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]


def test_workload_arrivals_and_lengths() -> None:
    wl = Workload(5.0, Lengths(1000, "lognormal", 0.8, lo=1, hi=100000), Lengths.fixed(64))
    reqs = wl.requests(200.0, seed=1)
    assert 850 < len(reqs) < 1150  # Poisson at 5/s over 200 s
    ins = np.array([r.input_len for r in reqs])
    assert 850 < ins.mean() < 1150 and ins.std() > 500
    assert all(r.output_len == 64 for r in reqs)
    again = wl.requests(200.0, seed=1)
    assert [r.arrival for r in again] == [r.arrival for r in reqs]  # deterministic per seed
    bursty = Workload(5.0, arrival="gamma", cv=3.0).requests(400.0, seed=2)
    gaps = np.diff([r.arrival for r in bursty])
    assert gaps.std() / gaps.mean() > 2.0
    assert Workload.from_dict(wl.to_dict()).input.cv == 0.8


@pytest.mark.parametrize("lengths", [Lengths(2048, "lognormal", 0.7, lo=64, hi=8192),
                                     Lengths(128, "lognormal", 0.8, lo=2, hi=1024),
                                     Lengths(300, "lognormal", 1.5, lo=50, hi=600), Lengths.fixed(700),
                                     Lengths(900, "fixed", hi=512), Lengths.empirical([3, 10, 10, 4000])])
def test_a_length_distribution_s_moments_are_those_of_the_lengths_drawn(lengths: Lengths) -> None:
    """The estimators take the mean and variance of what ``sample`` draws, clipped to [lo, hi], not the
    nominal ones (a lognormal of mean 2048 clipped at 8192 draws 2036 on average), and a plan's recorded
    workload keeps the clip, so what it is verified against is what it was planned for."""
    drawn = lengths.sample(np.random.default_rng(3), 400_000).astype(float)
    assert lengths.expected == pytest.approx(drawn.mean(), rel=0.005)
    assert lengths.var == pytest.approx(drawn.var(), rel=0.02, abs=1.0)
    again = Lengths.from_dict(lengths.to_dict())
    assert (again.expected, again.var, again.lo, again.hi) == (lengths.expected, lengths.var, lengths.lo, lengths.hi)


def test_azure_trace_format(tmp_path: Path) -> None:
    trace = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:51.2,879,31\n")
    ins, outs = load_azure_trace(trace)
    assert list(ins) == [374, 396, 879] and list(outs) == [44, 109, 31]
    trace.write_text("a,b\n1,2\n")
    with pytest.raises(WorkloadError, match="not an Azure LLM trace"):
        load_azure_trace(trace)


def test_pool_specs(tmp_path: Path) -> None:
    cl = pool_from_spec("2xL40S,4xRTX4090,3*1xL4")
    assert [(n.gpu_type, n.gpu_count) for n in cl.nodes] == [("L40S", 2), ("RTX4090", 4)] + [("L4", 1)] * 3
    assert cl.bandwidth("n0", "n0") == GPUS["L40S"].link_bytes_per_s
    yml = tmp_path / "pool.yaml"
    yml.write_text("nodes:\n  - {id: a, gpu: A100-80GB, count: 2}\n  - {id: b, gpu: L4}\n"
                   "inter_node_gbps: 10\nlinks: [[a, b, 5]]\n")
    cl = pool_from_spec(str(yml))
    assert cl.inter_gbps("a", "b") == 5.0 and cl.node("a").gpu_count == 2
    with pytest.raises(PoolError, match="unknown GPU type"):
        pool_from_spec("2xQuantum9")
    yml.write_text("nodes: []\n")
    with pytest.raises(PoolError, match="non-empty 'nodes'"):
        pool_from_spec(str(yml))


def test_capacity_column_limits_what_the_planner_rents(tmp_path: Path) -> None:
    """An optional Capacity column (how many the provider can give) bounds each instance type in the plan."""
    from planner.scheduler import plan_deployment
    from planner.workload import SLO

    csv = tmp_path / "local_vms.csv"
    csv.write_text(textwrap.dedent("""\
        InstanceType,AcceleratorName,AcceleratorCount,Price,SpotPrice,Region,Capacity
        a-L40S,L40S,1,0.86,0.43,here,1
        a-L4,L4,1,0.44,0.22,here,2
        a-T4,T4,1,0.40,0.16,here,1
    """))
    offers = load_offers([csv])
    assert {o.instance_type: o.capacity for o in offers} == {"a-L40S": 1, "a-L4": 2, "a-T4": 1}
    plan = plan_deployment("llama-3.1-8b", Workload(0.0, Lengths.fixed(1024), Lengths.fixed(128)), SLO(5.0, 0.2),
                           budget=20.0, offers=offers, time_limit_s=5, verify=False)
    counts: dict[str, int] = {}
    for inst in plan.instances:
        counts[inst.instance_type] = counts.get(inst.instance_type, 0) + 1
    assert counts and all(counts[t] <= {"a-L40S": 1, "a-L4": 2, "a-T4": 1}[t] for t in counts), counts
    bad = tmp_path / "bad_vms.csv"
    bad.write_text("InstanceType,AcceleratorName,AcceleratorCount,Price,Capacity\nx,L4,1,0.4,1.5\n")
    with pytest.raises(CatalogError, match="Capacity"):
        load_offers([bad])


def test_an_instance_type_in_several_zones_is_one_offer_with_their_capacities_summed() -> None:
    """What a place can rent of one shape: an instance type's zones add up (SkyPilot picks the zone), a
    dearer offer is listed only while the cheaper ones are capped, and an uncapped zone is uncapped."""
    from planner.offers import Offer, offers_per_shape

    key = ("c", "r", "L40S", 1)
    offers = [Offer("c", "1x_L40S", "L40S", 1, 1.0, 0.5, "r", "z1", capacity=1),
              Offer("c", "1x_L40S", "L40S", 1, 1.0, 0.5, "r", "z2", capacity=2),
              Offer("c", "1x_L40S_b", "L40S", 1, 1.2, None, "r", "z1", capacity=1),
              Offer("c", "1x_L40S_c", "L40S", 1, 1.4, None, "r"),  # uncapped: it gives as many as any dearer one
              Offer("c", "1x_L40S_d", "L40S", 1, 1.6, None, "r"),
              Offer("c", "1x_L40S", "L40S", 1, 1.0, 0.5, "elsewhere", "z9", capacity=4)]
    got = offers_per_shape(offers, spot=False)
    assert [(o.instance_type, o.capacity, price) for o, price, _ in got[key]] == [
        ("1x_L40S", 3, 1.0), ("1x_L40S_b", 1, 1.2), ("1x_L40S_c", None, 1.4)]
    assert [(o.capacity, price, spot) for o, price, spot in got[("c", "elsewhere", "L40S", 1)]] == [(4, 1.0, False)]
    assert offers_per_shape(offers, spot=True)[key][0][1:] == (0.5, True)
    uncapped_zone = Offer("c", "1x_L40S", "L40S", 1, 1.0, 0.5, "r", "z3")
    for zones in ([*offers[:2], uncapped_zone], [uncapped_zone, *offers[:2]]):
        assert [o.capacity for o, _, _ in offers_per_shape(zones, spot=False)[key]] == [None]
