"""The SkyPilot path without a cloud account.

Real: the ``skypilot`` library builds and validates every task and resource (``sky.Task.from_yaml_config``,
``sky.Resources``, its clouds' feasibility checks), prices come from ``sky.catalog`` reading catalogs seeded
from a snapshot (tests/data/sky-catalogs) into a temporary runtime dir, Redis is a real redis-server, the node agent's
``/health`` is a real HTTP server. The one test double is ``FakeSkySDK``: it stands in for the SDK calls
that need a cloud (``sky.launch``/``status``/``down``/``endpoints`` through request ids), takes and returns
the library's own objects (``sky.Task``, ``Resources``, ``CloudVmRayResourceHandle``, ``StatusResponse``,
``sky.exceptions``), and plays the cloud: capacity, reclaims, unhealthy and stopped clusters.
No test may touch the network: a guard fails any connection that is not to loopback.
"""

from __future__ import annotations

import asyncio
import copy
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from planner.state import Event, StateStore
from provisioner.base import NodeRequest, Offer, ProvisionError
from provisioner.budget import BudgetExceeded, BudgetLedger
from provisioner.config import load_provisioner_config
from provisioner.fallback import SpotFallbackPolicy
from provisioner.sky_catalog import (
    catalog_dir,
    catalog_offers,
    hourly_price,
    infeasibility,
    offline_sky_env,
    seed_catalog,
)
from provisioner.skypilot import SkyPilotProvisioner
from provisioner.skypilot_task import NodeTaskInput, NodeTaskSettings, build_task, cluster_name, node_task_config

HEARTBEAT_TTL_S = 1.5  # short, to see expiry quickly; long enough for a loaded 2-core machine
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CATALOGS = Path(__file__).resolve().parent / "data" / "sky-catalogs"  # snapshot of ../shared/data/catalogs


# -- offline SkyPilot ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sky_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SkyPilot pointed at a temporary runtime dir holding the seeded runpod/lambda/vast catalogs.

    SkyPilot fixes its catalog dir when ``sky`` is first imported; if something imported it before this
    module, the dir is re-pointed and the per-cloud catalog modules are reloaded (restored afterwards).
    """
    root = tmp_path_factory.mktemp("sky-runtime")
    seed_catalog(root, {c: CATALOGS / f"{c}_vms.csv" for c in ("runpod", "lambda", "vast")})
    mp = pytest.MonkeyPatch()
    for key, value in offline_sky_env(root).items():
        mp.setenv(key, value)
    import sky  # noqa: F401  (imported here, after the environment points at root)
    from sky.catalog import common

    mp.setattr(common, "_ABSOLUTE_VERSIONED_CATALOG_DIR", str(catalog_dir(root)))
    for name in [m for m in sys.modules if m.startswith("sky.catalog.") and m.endswith("_catalog")]:
        mp.delitem(sys.modules, name)
    yield root
    mp.undo()


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail (and record) any connection that is not to loopback: SkyPilot must stay offline."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test guard: no network (tried {address})")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in (None, "127.0.0.1", "::1", "localhost"):
            attempts.append(host)
            raise OSError(f"test guard: no DNS (tried {host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    yield attempts
    assert not attempts, f"SkyPilot tried to reach the network: {attempts}"


# -- the test double -------------------------------------------------------------------------------------


@dataclass
class FakeCluster:
    handle: Any  # sky CloudVmRayResourceHandle
    status: Any  # sky.ClusterStatus
    init_kind: str | None = None
    reason: str | None = None


class FakeSkySDK:
    """TEST DOUBLE of the SkyPilot SDK functions (there is no cloud account here).

    Same names and signatures as ``sky.launch``, ``sky.stream_and_get``, ``sky.get``, ``sky.status``,
    ``sky.down``, ``sky.endpoints``, ``sky.api_cancel``: calls return request ids, ``get`` runs them.
    Launch plays SkyPilot's optimizer on the real ``sky.Task``: the cheapest of its real ``Resources``
    (priced by the seeded catalog) at or under ``max_hourly_cost``, or ``ResourcesUnavailableError``.
    """

    def __init__(self, agent_address: str) -> None:
        import sky

        self.sky = sky
        self.agent_address = agent_address
        self.clusters: dict[str, FakeCluster] = {}
        self.launched: list[tuple[str, Any]] = []  # (cluster name, sky.Task) of every launch request
        self.status_refreshes: list[Any] = []
        self.downs: list[str] = []
        self.spot_failures_left = 0  # the next N spot launches find no capacity
        self.on_demand_failures_left = 0
        self._requests: dict[str, Callable[[], Any]] = {}

    def _request(self, thunk: Callable[[], Any]) -> str:
        rid = str(uuid.uuid4())
        self._requests[rid] = thunk
        return rid

    # the SDK surface
    def launch(self, task: Any, cluster_name: str | None = None, **kwargs: Any) -> str:
        from sky.utils import common_utils

        assert isinstance(task, self.sky.Task), type(task)
        common_utils.check_cluster_name_is_valid(cluster_name)  # SkyPilot's own rule
        self.launched.append((cluster_name, task))
        return self._request(lambda: self._launch(task, cluster_name))

    def stream_and_get(self, request_id: str, output_stream: Any = None, **kwargs: Any) -> Any:
        if output_stream is not None:
            output_stream.write(f"(FakeSkySDK) streaming logs of request {request_id}\n")
        return self.get(request_id)

    def get(self, request_id: str) -> Any:
        return self._requests.pop(request_id)()

    def status(self, cluster_names: list[str] | None = None, refresh: Any = None, all_users: bool = False) -> str:
        assert isinstance(refresh, self.sky.StatusRefreshMode), refresh
        self.status_refreshes.append(refresh)
        names = list(self.clusters) if cluster_names is None else cluster_names
        return self._request(lambda: [self._status_response(n) for n in names if n in self.clusters])

    def down(self, cluster_name: str, purge: bool = False) -> str:
        def run() -> None:
            if cluster_name not in self.clusters:
                raise self.sky.exceptions.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
            del self.clusters[cluster_name]
            self.downs.append(cluster_name)

        return self._request(run)

    def endpoints(self, cluster: str, port: int | str | None = None) -> str:
        def run() -> dict[int, str]:
            if cluster not in self.clusters:
                raise self.sky.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist.")
            return {int(port or 0): self.agent_address}

        return self._request(run)

    def api_cancel(self, request_ids: Any = None) -> str:
        return self._request(lambda: None)

    # the simulated cloud
    def _launch(self, task: Any, name: str) -> tuple[int, Any]:
        from sky.backends.cloud_vm_ray_backend import CloudVmRayResourceHandle

        candidates = list(task.resources)
        spot = all(r.use_spot for r in candidates)
        if spot and self.spot_failures_left:
            self.spot_failures_left -= 1
            raise self.sky.exceptions.ResourcesUnavailableError(
                "Failed to provision all possible launchable resources. (FakeSkySDK: no spot capacity)")
        if not spot and self.on_demand_failures_left:
            self.on_demand_failures_left -= 1
            raise self.sky.exceptions.ResourcesUnavailableError("(FakeSkySDK: no on-demand capacity)")
        priced = [(r.get_cost(3600), str(r), r) for r in candidates]
        priced = [p for p in priced if p[2].max_hourly_cost is None or p[0] <= p[2].max_hourly_cost + 1e-9]
        if not priced:
            raise self.sky.exceptions.ResourcesUnavailableError(
                "Catalog does not contain any instances satisfying the request")
        _, _, chosen = min(priced, key=lambda p: (p[0], p[1]))
        handle = CloudVmRayResourceHandle(cluster_name=name, cluster_name_on_cloud=f"{name}-2ea4", cluster_yaml=None,
                                          launched_nodes=1, launched_resources=chosen)
        self.clusters[name] = FakeCluster(handle, self.sky.ClusterStatus.UP)
        return 1, handle

    def _status_response(self, name: str) -> Any:
        from sky.schemas.api.responses import StatusResponse

        c = self.clusters[name]
        return StatusResponse(
            name=name, launched_at=int(time.time()), handle=c.handle, last_use="sky launch", status=c.status,
            autostop=10, to_down=True, cluster_hash="h", cluster_ever_up=True, user_hash="u", user_name="ts",
            workspace="default", is_managed=False, nodes=1, init_kind=c.init_kind, init_status_reason=c.reason,
        )

    def reclaim(self, name: str) -> None:
        """The cloud takes a spot cluster away entirely: it disappears from status."""
        del self.clusters[name]

    def degrade(self, name: str) -> None:
        self.clusters[name].status = self.sky.ClusterStatus.INIT
        self.clusters[name].init_kind = "unhealthy"
        self.clusters[name].reason = "1 of 1 node preempted"

    def stop(self, name: str) -> None:
        self.clusters[name].status = self.sky.ClusterStatus.STOPPED


# -- fixtures --------------------------------------------------------------------------------------------


@dataclass
class RemoteAgent:
    """Stands in for the node agent on the rented machine: a real HTTP /health and real heartbeats."""

    address: str
    heartbeating: set[str]


@pytest.fixture
async def remote_agent(state: StateStore) -> AsyncIterator[RemoteAgent]:
    app = web.Application()
    app.router.add_get("/health", lambda _: web.json_response({"status": "ok"}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    agent = RemoteAgent(f"127.0.0.1:{port}", set())

    async def beat() -> None:
        while True:
            for node in list(agent.heartbeating):
                await state.heartbeat(node, ttl_s=HEARTBEAT_TTL_S)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    yield agent
    task.cancel()
    await runner.cleanup()


@pytest.fixture
def fake_sdk(sky_offline: Path, remote_agent: RemoteAgent) -> FakeSkySDK:
    return FakeSkySDK(remote_agent.address)


def settings_for(state: StateStore, **over: Any) -> NodeTaskSettings:
    base = {"redis_url": "redis://:secret@redis.example.com:6379/0", "deployment": state.deployment,
            "heartbeat_ttl_s": HEARTBEAT_TTL_S}
    return NodeTaskSettings(**{**base, **over})


@pytest.fixture
async def make_provisioner(state: StateStore, fake_sdk: FakeSkySDK, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[SkyPilotProvisioner] = []

    async def make(budget: float = 2.0, **kwargs: Any) -> SkyPilotProvisioner:
        ledger = BudgetLedger(state)
        await ledger.set_limit(budget)
        kwargs.setdefault("fallback", SpotFallbackPolicy(max_spot_failures=2))
        prov = SkyPilotProvisioner(
            state, ledger, settings_for(state), sdk=fake_sdk, poll_interval_s=0.2, heartbeat_check_s=0.1,
            ready_timeout_s=10, retry_delay_s=0.0, log_dir=tmp_path / "logs", **kwargs,
        )
        await prov.start()
        made.append(prov)
        return prov

    yield make
    for prov in made:
        await prov.close()


async def kinds(state: StateStore, node_id: str | None = None) -> list[str]:
    events: list[Event] = await state.events()
    return [e.kind for e in events if node_id is None or e.data.get("node_id") == node_id]


async def next_event(events: Any, kind: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        ev = await events.next(max(0.01, deadline - time.monotonic()))
        if ev.kind == kind:
            return ev


# -- tasks and resources, validated by SkyPilot ------------------------------------------------------------


def test_generated_task_is_accepted_by_skypilot(sky_offline: Path) -> None:
    import sky

    offers = (Offer("runpod", "1x_RTX4090_SECURE", "RTX4090", 1, True, 0.34),
              Offer("runpod", "1x_L40_SECURE", "L40", 1, True, 0.69))
    settings = NodeTaskSettings(redis_url="redis://:pw@10.0.0.5:6379/0", deployment="demo")
    config = node_task_config(NodeTaskInput("n0", "RTX4090", 1, True, 0.69, offers), settings)
    task = build_task(config)
    assert isinstance(task, sky.Task) and task.name == "ts-demo-n0"
    assert config["resources"]["any_of"]  # build_task did not consume the caller's dict
    resources = sorted(task.resources, key=str)
    assert [r.instance_type for r in resources] == ["1x_L40_SECURE", "1x_RTX4090_SECURE"]
    for r in resources:
        assert r.use_spot and r.max_hourly_cost == pytest.approx(0.69) and str(r.cloud) == "RunPod"
        assert r.ports == ["8700", "30000-30031"]
        assert r.autostop_config.down and r.autostop_config.idle_minutes == 10
    assert {r.accelerators["RTX4090"] if "RTX4090" in r.accelerators else r.accelerators["L40"]
            for r in resources} == {1}  # SkyPilot inferred the GPUs from each instance type
    assert task.envs["TS_NODE_ID"] == "n0" and task.envs["TS_GPU_TYPE"] == "RTX4090"
    secret = task.secrets["TS_REDIS_URL"]  # a secret: redacted when printed
    assert secret.get_secret_value() == "redis://:pw@10.0.0.5:6379/0" and "pw" not in str(secret)
    assert "python -m replicas.agent" in task.run and '--redis-url "$TS_REDIS_URL"' in task.run
    assert '"$TS_SGLANG_SPEC"' in task.setup and '"$TS_PACKAGE_SPEC"' in task.setup

    no_offers = node_task_config(NodeTaskInput("n1", "L4", 2, False, 0.9), settings)
    (only,) = build_task(no_offers).resources
    assert only.accelerators == {"L4": 2} and not only.use_spot and only.cloud is None


def test_skypilot_rejects_what_it_should(sky_offline: Path) -> None:
    """The validation is SkyPilot's own: a malformed task or an impossible resource is refused."""
    from sky.exceptions import InvalidSkyPilotConfigError

    settings = NodeTaskSettings(redis_url="redis://127.0.0.1:6379/0", deployment="demo")
    config = node_task_config(NodeTaskInput("n0", "L4", 1, True, 0.5), settings)
    bad = copy.deepcopy(config)
    bad["resources"]["use_spot"] = "yes"
    with pytest.raises(InvalidSkyPilotConfigError, match="use_spot"):
        build_task(bad)
    bad = copy.deepcopy(config)
    bad["resources"]["acelerators"] = bad["resources"].pop("accelerators")
    with pytest.raises(InvalidSkyPilotConfigError, match="did you mean 'accelerators'"):
        build_task(bad)
    both = copy.deepcopy(config)
    both["resources"]["any_of"] = [{"infra": "runpod", "instance_type": "1x_RTX4090_SECURE"}]
    both["resources"]["ordered"] = [{"infra": "vast", "instance_type": "1x-RTX_4090-32-65536"}]
    with pytest.raises(ValueError, match='Cannot specify both "any_of" and "ordered"'):
        build_task(both)


def test_cluster_names_are_valid_and_distinct(sky_offline: Path) -> None:
    from sky.utils import common_utils

    names = [cluster_name("demo", "n0"), cluster_name("My_Deploy", "node.1"), cluster_name("d" * 60, "n0"),
             cluster_name("d" * 60, "n1"), cluster_name("demo", "n0-r1")]
    for name in names:
        common_utils.check_cluster_name_is_valid(name)
        assert len(name) <= 40
    assert len(set(names)) == len(names)
    assert names[0] == "ts-demo-n0"


def render_template(template: Any, values: dict[str, Any], used: set[str]) -> Any:
    """Fill deploy/skypilot-node.yaml's {{placeholders}}; a value that is only a placeholder keeps its type."""
    if isinstance(template, dict):
        return {k: render_template(v, values, used) for k, v in template.items()}
    if isinstance(template, list):
        return [render_template(v, values, used) for v in template]
    if isinstance(template, str):
        whole = re.fullmatch(r"\{\{(\w+)\}\}", template)
        if whole:
            used.add(whole.group(1))
            return values[whole.group(1)]
        return re.sub(r"\{\{(\w+)\}\}", lambda m: used.add(m.group(1)) or str(values[m.group(1)]), template)
    return template


def test_deploy_template_agrees_with_the_generated_task(sky_offline: Path) -> None:
    template = yaml.safe_load((DEPLOY / "skypilot-node.yaml").read_text())
    offers = (Offer("runpod", "1x_L40S_SECURE", "L40S", 1, True, 0.86),
              Offer("vast", "2x-L40S-32-65536", "L40S", 2, False, 1.33, "Oregon, US, NA"))
    settings = NodeTaskSettings(redis_url="redis://:pw@10.1.2.3:6379/0", deployment="prod", agent_port=8801,
                                heartbeat_ttl_s=12.5, autodown_idle_minutes=7)
    node = NodeTaskInput("n3", "L40S", 1, True, 0.86, offers)
    generated = node_task_config(node, settings)
    values = {
        "cluster_name": cluster_name("prod", "n3"), "node_id": "n3", "deployment": "prod", "gpu_type": "L40S",
        "gpu_count_str": "1", "agent_port_str": "8801", "heartbeat_ttl_str": "12.5",
        "package_spec": settings.package_spec, "sglang_spec": settings.sglang_spec, "redis_url": settings.redis_url,
        "spot": True, "max_hourly_cost": 0.86, "ports": [8801, "30000-30031"], "disk_size": 256,
        "autodown_idle_minutes": 7,
        "candidates": [{"infra": "runpod", "instance_type": "1x_L40S_SECURE"},
                       {"infra": "vast/Oregon, US, NA", "instance_type": "2x-L40S-32-65536"}],
    }
    used: set[str] = set()
    assert render_template(template, values, used) == generated
    assert used == set(values), f"placeholders never used: {set(values) - used}"
    build_task(render_template(template, values, set()))  # and SkyPilot accepts it


def test_example_config_builds_a_valid_node_task(sky_offline: Path) -> None:
    cfg = yaml.safe_load((DEPLOY / "example-config.yaml").read_text())
    prov = load_provisioner_config(cfg["provisioner"])
    settings = prov.node_settings("redis://:pw@10.0.0.5:6379/0", cfg["deployment"])
    offers = catalog_offers("A100-80GB", 1, spot=cfg["spot"], clouds=prov.clouds, regions=prov.regions)
    assert offers and {o.region for o in offers} <= set(prov.regions)
    task = build_task(node_task_config(NodeTaskInput("n0", "A100-80GB", 1, True, offers[-1].price_per_hour,
                                                     tuple(offers)), settings))
    assert {str(r.cloud) for r in task.resources} == {"RunPod"} and all(r.use_spot for r in task.resources)
    assert {r.region for r in task.resources} == {o.region for o in offers}


# -- prices through sky.catalog, offline ---------------------------------------------------------------


def test_prices_come_from_the_seeded_catalog(sky_offline: Path) -> None:
    assert (catalog_dir(sky_offline) / "runpod" / "vms.csv").is_file()
    spot = catalog_offers("RTX4090", 1, spot=True)
    assert [(o.cloud, o.instance_type, o.price_per_hour) for o in spot] == [("runpod", "1x_RTX4090_SECURE", 0.34)]
    on_demand = {(o.cloud, o.instance_type): o.price_per_hour for o in catalog_offers("RTX4090", 1, spot=False)}
    assert on_demand[("runpod", "1x_RTX4090_SECURE")] == 0.69
    assert ("vast", "1x-RTX_4090-32-65536") in on_demand  # vast lists on-demand only (SpotPrice 0.00)
    assert catalog_offers("L4", 1, spot=True) == []  # runpod lists no spot L4
    assert catalog_offers("A10", 1, spot=False)[0] == Offer("lambda", "gpu_1x_a10", "A10", 1, False, 0.75)
    in_ca = catalog_offers("RTX4090", 1, spot=True, regions=("CA",))
    assert in_ca and all(o.region == "CA" for o in in_ca)
    assert hourly_price(Offer("runpod", "1x_A100-80GB_SECURE", "A100-80GB", 1, True, 0)) == 1.19
    assert hourly_price(Offer("runpod", "1x_A100-80GB_SECURE", "A100-80GB", 1, False, 0)) == 1.64
    assert hourly_price(Offer("vast", "1x-RTX_4090-32-65536", "RTX4090", 1, True, 0)) is None


def test_feasibility_is_checked_by_skypilots_clouds(sky_offline: Path) -> None:
    assert infeasibility(Offer("runpod", "1x_RTX4090_SECURE", "RTX4090", 1, True, 0.34)) is None
    assert infeasibility(Offer("lambda", "gpu_1x_a10", "A10", 1, False, 0.75)) is None
    assert "Spot instances are not supported in Lambda" in infeasibility(
        Offer("lambda", "gpu_1x_a10", "A10", 1, True, 0.75))
    assert "No instance type nope" in infeasibility(Offer("runpod", "nope", "L4", 1, False, 0.44))


# -- the launch / status / down flow against FakeSkySDK ---------------------------------------------------


async def test_launch_preemption_and_relaunch_with_on_demand_fallback(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore,
) -> None:
    prov = await make_provisioner(budget=2.0)
    events = prov.watch()
    rec = await prov.acquire(NodeRequest("n0", gpu_type="RTX4090", gpu_count=1, spot=True))
    assert rec.status == "pending" and rec.spot and rec.provider_ref == f"sky:ts-{state.deployment}-n0"
    assert await prov.ledger.held("n0") == pytest.approx(0.34)  # held before anything was launched
    remote_agent.heartbeating.add("n0")
    ready = await next_event(events, "ready")
    assert ready.node_id == "n0" and ready.timing["launch_s"] >= 0
    assert ready.record.cloud == "runpod" and ready.record.instance_type == "1x_RTX4090_SECURE"
    assert ready.record.spot and ready.record.price_per_hour == pytest.approx(0.34)
    assert ready.record.agent_url == f"http://{remote_agent.address}"
    cluster, task = fake_sdk.launched[0]
    assert cluster == f"ts-{state.deployment}-n0" and all(r.use_spot for r in task.resources)
    assert all(r.max_hourly_cost == pytest.approx(0.34) for r in task.resources)

    # The cloud reclaims the spot cluster; the status poll (refresh=AUTO) sees it gone.
    fake_sdk.reclaim(cluster)
    remote_agent.heartbeating.discard("n0")
    lost = await next_event(events, "preempted")
    assert lost.node_id == "n0" and "is gone" in lost.reason and "sky.status(refresh=" in lost.reason
    assert await prov.ledger.held("n0") is None  # a vanished cluster bills nothing: hold freed at once
    assert prov.fallback.spot_failures("RTX4090") == 1

    # Replacement: spot is out of capacity once more -> 2 spot failures -> on-demand, within the budget.
    fake_sdk.spot_failures_left = 1
    remote_agent.heartbeating.add("n0-r1")
    new = await prov.replace("n0")
    assert new.id == "n0-r1" and new.spot
    ready = await next_event(events, "ready")
    assert ready.node_id == "n0-r1" and not ready.record.spot
    # On-demand candidates: runpod $0.69, vast $0.40; held at the $0.69 cap, then lowered to what is charged.
    assert (ready.record.cloud, ready.record.price_per_hour) == ("vast", pytest.approx(0.40))
    assert await prov.ledger.held("n0-r1") == pytest.approx(0.40)
    spot_try, od_try = fake_sdk.launched[1][1], fake_sdk.launched[2][1]
    assert all(r.use_spot for r in spot_try.resources) and not any(r.use_spot for r in od_try.resources)
    assert await kinds(state, "n0-r1") == ["node.requested", "node.launch_failed", "node.fallback", "node.ready"]
    fallback = next(e for e in await state.events() if e.kind == "node.fallback")
    assert "2 spot failures of RTX4090" in fallback.reason and fallback.data["held"] == pytest.approx(0.69)
    assert sky_status_modes(fake_sdk) >= {"AUTO"}


async def test_a_node_launched_where_planned_reads_back_as_planned(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore,
) -> None:
    """The planner's offer (from SkyPilot's catalog), rented as a plan instance and launched where it was
    offered, reads back from the ready record with the same cloud, region, market and price: the
    controller must not take it for a node that failed over elsewhere (``running_as`` is None). Launched
    on-demand instead, it is a move (same place, another market and price)."""
    from planner.controller import running_as
    from planner.offers import sky_offers
    from planner.plan import Instance

    prov = await make_provisioner(budget=5.0)
    events = prov.watch()
    offer = min((o for o in sky_offers(["runpod"]) if o.gpu_type == "RTX4090" and o.gpu_count == 1
                 and o.spot_price), key=lambda o: (o.spot_price, o.region))
    planned = Instance("n0", offer.instance_type, offer.gpu_type, 1, True, offer.spot_price, offer.region,
                       offer.cloud)
    remote_agent.heartbeating.update({"n0", "n1"})
    await prov.acquire(NodeRequest.from_instance(planned))
    ready = await next_event(events, "ready")
    assert (ready.record.cloud, ready.record.region) == (offer.cloud, offer.region)
    assert running_as(planned, ready.record) is None
    fake_sdk.spot_failures_left = 2  # no spot capacity: the provisioner falls back to on-demand
    await prov.acquire(NodeRequest.from_instance(replace(planned, id="n1")))
    ready = await next_event(events, "ready")
    moved = running_as(replace(planned, id="n1"), ready.record)
    assert moved is not None and not moved.spot and moved.price_per_hour == pytest.approx(offer.price)
    assert (moved.cloud, moved.region) == (offer.cloud, offer.region)


def sky_status_modes(fake_sdk: FakeSkySDK) -> set[str]:
    return {r.value for r in fake_sdk.status_refreshes}


async def test_an_error_after_the_launch_fails_the_node_and_downs_its_cluster(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore,
) -> None:
    """Not a node left pending (and billing) forever because a step after sky.launch raised."""
    prov = await make_provisioner()
    events = prov.watch()
    update_node = state.update_node

    async def redis_blip(node_id: str, **changes: Any) -> Any:
        if "price_per_hour" in changes:  # the step that records the launched price
            raise ConnectionError("Redis connection reset")
        return await update_node(node_id, **changes)

    state.update_node = redis_blip  # type: ignore[method-assign]
    await prov.acquire(NodeRequest("n0", gpu_type="RTX4090", gpu_count=1, spot=True))
    failed = await next_event(events, "failed", timeout_s=10)
    assert failed.node_id == "n0" and "Redis connection reset" in failed.reason
    assert fake_sdk.downs == [f"ts-{state.deployment}-n0"]
    assert await prov.ledger.held("n0") is None


async def test_partial_preemption_downs_the_cluster_before_freeing_budget(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore,
) -> None:
    prov = await make_provisioner()
    events = prov.watch()
    remote_agent.heartbeating.update({"a", "b"})
    await prov.acquire(NodeRequest("a", gpu_type="A100-80GB", spot=True))
    await prov.acquire(NodeRequest("b", gpu_type="RTX4090", spot=True))
    await next_event(events, "ready")
    await next_event(events, "ready")
    fake_sdk.degrade(f"ts-{state.deployment}-a")
    fake_sdk.stop(f"ts-{state.deployment}-b")
    lost = {(await next_event(events, "preempted")).node_id: None for _ in range(2)}
    assert set(lost) == {"a", "b"}
    for _ in range(100):  # the down runs after the event; the hold goes only when it is done
        if not await prov.ledger.holds():
            break
        await asyncio.sleep(0.05)
    assert await prov.ledger.holds() == {}
    assert set(fake_sdk.downs) == {f"ts-{state.deployment}-a", f"ts-{state.deployment}-b"}
    reasons = {e.data["node_id"]: e.reason for e in await state.events() if e.kind == "node.preempted"}
    assert "INIT (unhealthy)" in reasons["a"] and "1 of 1 node preempted" in reasons["a"]
    assert "STOPPED" in reasons["b"]
    assert (await kinds(state, "a"))[-2:] == ["node.preempted", "node.down"]


async def test_expired_heartbeat_forces_a_status_refresh(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent,
) -> None:
    prov = await make_provisioner()
    events = prov.watch()
    remote_agent.heartbeating.add("n0")
    await prov.acquire(NodeRequest("n0", gpu_type="RTX4090"))
    await next_event(events, "ready")
    await asyncio.sleep(0.3)
    remote_agent.heartbeating.discard("n0")  # the agent dies; the cluster stays UP
    lost = await next_event(events, "failed")
    assert "heartbeat expired while cluster" in lost.reason and "UP" in lost.reason
    assert "FORCE" in sky_status_modes(fake_sdk)
    for _ in range(100):
        if await prov.ledger.held("n0") is None:
            break
        await asyncio.sleep(0.05)
    assert await prov.ledger.held("n0") is None and fake_sdk.clusters == {}


async def test_budget_refusals_and_fallback_refused_by_budget(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore,
) -> None:
    prov = await make_provisioner(budget=0.5)
    with pytest.raises(BudgetExceeded, match=r"\$1.19/h refused"):
        await prov.acquire(NodeRequest("big", gpu_type="A100-80GB", spot=True))
    assert fake_sdk.launched == [] and await state.get_node("big") is None
    assert await kinds(state, "big") == ["node.refused"]

    events = prov.watch()
    fake_sdk.spot_failures_left = 2  # spot keeps failing; on-demand ($0.69) does not fit $0.50
    await prov.acquire(NodeRequest("n0", gpu_type="RTX4090", spot=True))
    failed = await next_event(events, "failed")
    assert "on-demand refused by the budget" in failed.reason
    assert await prov.ledger.holds() == {} and len(fake_sdk.launched) == 2

    with pytest.raises(ProvisionError, match=r"no offer SkyPilot can launch.*none in the runpod/lambda/vast"):
        await prov.acquire(NodeRequest("x", gpu_type="NOPE-GPU"))
    with pytest.raises(ProvisionError, match=r"lambda gpu_1x_a10: no spot price; .*\$0.75/h over the cap"):
        await prov.acquire(NodeRequest("y", gpu_type="A10", spot=True, offers=(
            Offer("lambda", "gpu_1x_a10", "A10", 1, True, 0.75),), max_price_per_hour=0.5))
    with pytest.raises(ProvisionError, match="node_id"):
        await prov.acquire(NodeRequest("bad id!", gpu_type="L4"))


async def test_infeasible_offers_are_dropped_before_launch(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent,
) -> None:
    prov = await make_provisioner(budget=5.0)
    events = prov.watch()
    request = NodeRequest("n0", gpu_type="A10", spot=True, offers=(
        Offer("lambda", "gpu_1x_a10", "A10", 1, True, 0.75),  # Lambda has no spot: SkyPilot says so
    ))
    rec = await prov.acquire(request)
    assert not rec.spot and rec.price_per_hour == pytest.approx(0.75)
    remote_agent.heartbeating.add("n0")
    ready = await next_event(events, "ready")
    assert ready.record.cloud == "lambda" and not ready.record.spot


async def test_release_and_close_take_every_cluster_down(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore,
) -> None:
    prov = await make_provisioner(budget=3.0)
    events = prov.watch()
    remote_agent.heartbeating.update({"n0", "n1", "n2"})
    for node in ("n0", "n1", "n2"):
        await prov.acquire(NodeRequest(node, gpu_type="RTX4090"))
    for _ in range(3):
        await next_event(events, "ready")
    assert await prov.endpoint("n0", 30001) == f"http://{remote_agent.address}"  # the fake maps every port here
    with pytest.raises(ProvisionError, match="unknown SkyPilot node"):
        await prov.endpoint("nope", 30001)
    rec = await prov.release("n1", "plan shrank")
    assert rec.status == "terminated" and await prov.ledger.held("n1") is None
    assert fake_sdk.downs == [f"ts-{state.deployment}-n1"]
    await prov.close()
    assert fake_sdk.clusters == {} and await prov.ledger.holds() == {}
    assert {n.status for n in (await state.nodes()).values()} == {"terminated"}


async def test_restarted_provisioner_adopts_its_clusters(
    make_provisioner: Any, fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore,
) -> None:
    first = await make_provisioner(budget=3.0)
    events = first.watch()
    remote_agent.heartbeating.update({"n0", "n1"})
    await first.acquire(NodeRequest("n0", gpu_type="RTX4090"))
    await first.acquire(NodeRequest("n1", gpu_type="RTX4090"))
    await next_event(events, "ready")
    await next_event(events, "ready")
    await first.close(release_nodes=False)  # the controller dies; its clusters keep running
    fake_sdk.reclaim(f"ts-{state.deployment}-n1")  # ... and one is reclaimed while nobody watches

    second = await make_provisioner(budget=3.0)
    nodes = {n.id: n.status for n in await second.nodes()}
    assert nodes == {"n0": "ready", "n1": "preempted"}
    assert await second.ledger.holds() == {"n0": pytest.approx(0.34)}
    assert "node.adopted" in await kinds(state, "n0")
    await second.release("n0")
    assert fake_sdk.clusters == {}



def test_network_guard_sees_a_catalog_download(sky_offline: Path, no_network: list[Any]) -> None:
    """The guard is not a formality: a cloud whose catalog is not seeded makes SkyPilot try to download it."""
    with pytest.raises(Exception):  # noqa: B017 - SkyPilot re-raises the requests error of the failed download
        catalog_offers("A100", 1, spot=False, clouds=("cudo",))
    assert any("githubusercontent" in str(a) or "amazonaws" in str(a) for a in no_network), no_network
    no_network.clear()


async def test_requests_a_provisioner_cannot_take_are_refused_with_the_reason(
    fake_sdk: FakeSkySDK, remote_agent: RemoteAgent, state: StateStore, tmp_path: Path,
) -> None:
    """The admission both provisioners share (``ManagedProvisioner``): not started, a live node id, closed.
    ``async with`` starts and closes it; closing takes the node down and gives its hold back."""
    ledger = BudgetLedger(state)
    await ledger.set_limit(2.0)
    prov = SkyPilotProvisioner(state, ledger, settings_for(state), poll_interval_s=0.2, heartbeat_check_s=0.1,
                               ready_timeout_s=10, retry_delay_s=0.0, log_dir=tmp_path / "logs")
    with pytest.raises(ProvisionError, match=r"call start\(\) first"):
        await prov.acquire(NodeRequest("n0", gpu_type="RTX4090"))
    prov.sdk = fake_sdk
    remote_agent.heartbeating.add("n0")
    async with prov:
        events = prov.watch()
        await prov.acquire(NodeRequest("n0", gpu_type="RTX4090"))
        await next_event(events, "ready")
        with pytest.raises(ProvisionError, match="n0 already exists and is ready"):
            await prov.acquire(NodeRequest("n0", gpu_type="RTX4090"))
    assert fake_sdk.clusters == {} and await ledger.holds() == {}
    with pytest.raises(ProvisionError, match="provisioner is closed"):
        await prov.acquire(NodeRequest("n1", gpu_type="RTX4090"))
