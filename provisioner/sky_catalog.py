"""Prices and feasibility through SkyPilot's own catalog code, offline when the catalog is seeded.

SkyPilot does not ship its price catalogs: it downloads ``catalogs/v8/<cloud>/vms.csv`` on first use and
caches it under ``$SKY_RUNTIME_DIR/.sky/catalogs/v8`` (``$HOME`` when unset). A file placed there
without a ``.meta`` checksum counts as user-modified and is never re-downloaded, so ``seed_catalog``
makes every price and feasibility query work with no network and no cloud account (air-gapped
planning, and the tests). SkyPilot reads the location when ``sky`` is first imported, so put
``offline_sky_env(...)`` into ``os.environ`` before that.

Every function here imports ``sky`` lazily.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

from provisioner.base import Offer

CATALOG_SCHEMA = "v8"  # sky.skylet.constants.CATALOG_SCHEMA_VERSION in skypilot 0.14
DEFAULT_CLOUDS = ("runpod", "lambda", "vast")


def catalog_dir(runtime_dir: str | Path) -> Path:
    return Path(runtime_dir) / ".sky" / "catalogs" / CATALOG_SCHEMA


def seed_catalog(runtime_dir: str | Path, sources: dict[str, str | Path]) -> list[Path]:
    """Copy ``{cloud: vms.csv}`` into SkyPilot's catalog cache under ``runtime_dir``; returns the paths."""
    written = []
    for cloud, src in sources.items():
        dest = catalog_dir(runtime_dir) / cloud.lower() / "vms.csv"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(dest)
    return written


def offline_sky_env(runtime_dir: str | Path) -> dict[str, str]:
    """Environment that points SkyPilot at ``runtime_dir`` and turns off its phone-home traffic."""
    runtime_dir = str(runtime_dir)
    return {
        "HOME": runtime_dir,
        "SKY_RUNTIME_DIR": runtime_dir,
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",  # usage logs and the server heartbeat
        "DO_NOT_TRACK": "1",
        "SCARF_NO_ANALYTICS": "1",
    }


def _price(value: float | None) -> float | None:
    """SkyPilot's catalogs write 'no offer' as an empty cell (NaN) or 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value <= 0:
        return None
    return float(value)


def catalog_offers(
    gpu_type: str, gpu_count: int, spot: bool, clouds: tuple[str, ...] = DEFAULT_CLOUDS, regions: tuple[str, ...] = ()
) -> list[Offer]:
    """Instance types with exactly ``gpu_count`` x ``gpu_type`` and a price in that market, cheapest first.

    Without ``regions`` each instance type appears once (its cheapest region, left to SkyPilot); with
    them, once per listed region that offers it, pinned to that region.
    """
    from sky import catalog

    listing = catalog.list_accelerators(
        gpus_only=True, name_filter=f"^{re.escape(gpu_type)}$", quantity_filter=gpu_count,
        clouds=list(clouds), case_sensitive=False, all_regions=bool(regions), require_price=True,
    )
    offers = []
    for infos in listing.values():
        for info in infos:
            price = _price(info.spot_price if spot else info.price)
            if price is None or int(info.accelerator_count) != gpu_count:
                continue
            if regions and info.region not in regions:
                continue
            offers.append(Offer(
                cloud=str(info.cloud).lower(), instance_type=info.instance_type, gpu_type=info.accelerator_name,
                gpu_count=gpu_count, spot=spot, price_per_hour=price, region=info.region if regions else "",
            ))
    return sorted(offers, key=lambda o: (o.price_per_hour, o.cloud, o.instance_type, o.region))


def hourly_price(offer: Offer) -> float | None:
    """What SkyPilot's catalog charges for the offer in its market (None: not offered there)."""
    from sky import catalog

    try:
        value = catalog.get_hourly_cost(
            offer.instance_type, use_spot=offer.spot, region=offer.region or None, zone=None, clouds=offer.cloud
        )
    except (ValueError, AssertionError):  # "No SpotPrice found for ..."; Lambda asserts it has no spot
        return None
    return _price(value)


def infeasibility(offer: Offer) -> str | None:
    """Why SkyPilot would not launch this offer (None if it would), asked of SkyPilot's cloud classes.

    Catches what the task schema lets through: spot on a cloud without spot (Lambda), a spot market with
    no price, an instance type or region the catalog does not have.
    """
    import sky

    infra = f"{offer.cloud}/{offer.region}" if offer.region else offer.cloud
    try:
        res = sky.Resources(infra=infra, instance_type=offer.instance_type, use_spot=offer.spot)
        feasible = res.cloud.get_feasible_launchable_resources(res, num_nodes=1)
    except Exception as e:  # SkyPilot raises ValueError and its own exception types for unknown types
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    if not feasible.resources_list:
        hint = " ".join((feasible.hint or "no launchable resources").split())
        return f"{infra} {offer.instance_type} ({'spot' if offer.spot else 'on-demand'}): {hint}"
    return None
