"""Independent checks of a Plan against the cost model: memory, and routing within capacities.

Used by the property tests and available to the controller before it publishes a plan. Each
function returns the list of violations (empty when the plan is sound), each naming the replica or
link at fault.
"""

from __future__ import annotations

from planner.capacity import Targets
from planner.deployment import materialize
from planner.evaluate import Evaluator, busiest_link
from planner.parallel import config_from_spec, spec_policy
from planner.plan import Plan
from planner.routing import LINK_CAPS, cap_over
from planner.workload import SLO, Workload


def memory_violations(plan: Plan, **kw) -> list[str]:
    """Replicas whose weights leave no room for the KV of even one longest request."""
    mat = materialize(plan, **kw)
    wl = mat.ctx.workload
    need = wl.input.quantile(0.5) + wl.output.quantile(0.5)
    out = []
    for rid, rm in mat.models.items():
        if rm.kv_tokens < need:
            out.append(f"replica {rid}: KV room for {rm.kv_tokens:.0f} tokens, less than one request ({need:.0f})")
    return out


def routing_violations(plan: Plan, *, rate: float | None = None, workload: Workload | None = None,
                       slo: SLO | None = None, tol: float = 1e-3) -> list[str]:
    """Check the routing at ``rate`` (default: the plan's expected goodput) against each prefill's
    capacity (per-pair TTFT slack), each decode's capacity, each colocated replica's capacity, and
    every link's utilisation cap (the lowest of ``LINK_CAPS`` its load fits under); also that weights
    form a distribution."""
    out = []
    total = sum(r.weight for r in plan.routing)
    if plan.routing and abs(total - 1) > 1e-6:
        out.append(f"routing weights sum to {total}")
    if any(r.weight < -1e-12 for r in plan.routing):
        out.append("negative routing weight")
    lam = rate if rate is not None else float(plan.expected.get("goodput_rps", 0.0))
    if lam <= 0 or not plan.routing:
        return out
    mat = materialize(plan, workload=workload, slo=slo)
    ctx = mat.ctx
    ev = Evaluator(ctx, kv_compression="auto")
    # a split plan's capacities may be at a leaning split of the SLO's miss budget (``capacity.Targets``)
    assert ctx.targets is not None
    targets = ctx.targets
    if slo is None and "ttft_quantile" in plan.expected and "tpot_quantile" in plan.expected:
        targets = Targets(float(plan.expected["ttft_quantile"]), float(plan.expected["tpot_quantile"]),
                          ctx.targets.max_batch_tokens)
    roles = {r.id: r.role for r in plan.replicas}
    specs = {r.id: r for r in plan.replicas}
    cfg = {rid: ev.at_targets(config_from_spec(ctx, list(specs[rid].gpus), specs[rid].tp, list(specs[rid].layer_split),
                                               roles[rid], spec_policy(specs[rid])), targets)
           for rid in roles}
    p_load: dict[str, float] = {}
    d_load: dict[str, float] = {}
    links: dict[tuple, float] = {}
    pairs = []
    for r in plan.routing:
        f = lam * r.weight
        if r.prefill == r.decode:
            d_load[r.prefill] = d_load.get(r.prefill, 0.0) + f
            continue
        p, d = cfg[r.prefill], cfg[r.decode]
        terms = ev.pair_terms(p, d)
        if terms.compression != r.kv_compression:
            terms = ev._pair_terms_mode(p.rm, d.rm, r.kv_compression)
        pairs.append((r, f, p, terms))
        for link, busy in terms.link_use:
            links[link] = links.get(link, 0.0) + f * busy
    # each link's cap: the lowest of LINK_CAPS its load fits under; every pair's TTFT budget then
    # reserves the KV queueing of its busiest link at that cap
    caps = {link: cap_over(busy, tol) for link, busy in links.items()}
    for r, f, p, terms in pairs:
        pcap, _ = ev.pair_prefill_capacity(p, terms, caps.get(busiest_link(terms), LINK_CAPS[-1]), targets)
        if f > 0 and pcap <= 0:
            out.append(f"route {r.prefill}->{r.decode}: KV transfer leaves no TTFT budget")
            continue
        p_load[r.prefill] = p_load.get(r.prefill, 0.0) + (f / pcap if pcap > 0 else 0.0)
        d_load[r.decode] = d_load.get(r.decode, 0.0) + f
    for rid, use in p_load.items():
        if use > 1 + tol:
            out.append(f"prefill {rid}: {use:.3f} of its capacity")
    for rid, f in d_load.items():
        cap_d = cfg[rid].capacity
        if f > cap_d * (1 + tol) + 1e-9:
            out.append(f"{roles[rid]} {rid}: {f:.3f} req/s over its capacity {cap_d:.3f}")
    for link, busy in links.items():
        if busy > caps[link] * (1 + tol):
            out.append(f"link {link}: busy {busy:.3f} of the time, over {caps[link]}")
    return out
