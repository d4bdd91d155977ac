"""What can be rented: instance offers from SkyPilot ``vms.csv`` files, SkyPilot's own catalog, or a built-in table.

SkyPilot's catalog files share column names but not column order, and carry oddities this reader
tolerates: rows without an accelerator (CPU instances, skipped), an empty or zero ``SpotPrice`` (no
spot offer), a ``SpotPrice`` above ``Price`` (taken as no spot discount: the spot price becomes the
on-demand one), GPU names that need the memory size to tell variants apart (``GpuInfo``), regions
with odd spelling (kept as written). A file that lacks a required column or has a price that is not
a number is an error naming the file, the line and the column.
"""

from __future__ import annotations

import ast
import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from planner.gpus import GPUS, UnknownGpu, canonical_gpu
from planner.work import charge


class CatalogError(ValueError):
    """A catalog file that cannot be read as SkyPilot vms.csv."""


@dataclass(frozen=True)
class Offer:
    """One instance type at one place, with its whole-instance prices in $/h."""

    cloud: str
    instance_type: str
    gpu_type: str  # canonical catalog name (planner.gpus)
    gpu_count: int
    price: float  # on-demand
    spot_price: float | None  # None: no spot offer
    region: str = ""
    zone: str = ""
    capacity: int | None = None  # how many the provider can give at once (optional Capacity column); None: no limit

    def hourly(self, spot: bool) -> tuple[float, bool]:
        """(price, is_spot): the spot price when asked for and offered, else on-demand."""
        if spot and self.spot_price is not None:
            return self.spot_price, True
        return self.price, False


# The most GPUs a plan rents unless told (``--max-gpus``). The budget bounds a plan first; this bounds the
# search's pool where GPUs are cheap: at 64 it cut Vast's and RunPod's 7B plans at $40/h (long prompts)
# to 62-64 of the 107-156 GPUs the budget buys, 17% and 4% less goodput per dollar. The search is
# time-capped, so a larger pool does not take longer to plan (160 GPUs: 29 s at the 20 s work limit).
MAX_GPUS = 256

REQUIRED = ("InstanceType", "AcceleratorName", "AcceleratorCount", "Price")


def _num(value: str, where: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise CatalogError(f"{where}: not a number: {value!r}") from None


def _gpu_memory_gib(gpu_info: str, count: int = 1, cloud: str = "") -> float | None:
    """Per-GPU memory from SkyPilot's GpuInfo column (a Python-literal dict), if present.

    Vast's catalog writes the whole instance's GPU memory there (its 1x-Tesla_V100 row says 16384 MiB,
    its 2x row 32768, its 12x-RTX_4090 row 294768 = 12 x 24564), other clouds the per-GPU figure
    (Lambda's gpu_8x_v100: 16384): for Vast it is divided by the GPU count."""
    if not gpu_info or "{" not in gpu_info:
        return None
    try:
        info = ast.literal_eval(gpu_info)
        mib = float(info["Gpus"][0]["MemoryInfo"]["SizeInMiB"])
    except (ValueError, SyntaxError, KeyError, IndexError, TypeError):
        return None
    if cloud == "vast" and count > 1:
        mib /= count
    return mib / 1024


def _cloud_of(path: Path) -> str:
    stem = path.stem.lower()
    if stem in ("vms", "catalog") and path.parent.name:
        return path.parent.name.lower()
    return stem.removesuffix("_vms").removesuffix("-vms") or "unknown"


def parse_vms_csv(text: str, source: str, cloud: str, unknown: set[str] | None = None) -> list[Offer]:
    """Offers from the text of one vms.csv; GPU types the catalog does not know go into ``unknown``."""
    reader = csv.DictReader(io.StringIO(text.replace("\r\n", "\n")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CatalogError(f"{source}: not a SkyPilot vms.csv: missing column(s) {', '.join(missing)}")
    reader.fieldnames = header
    offers: list[Offer] = []
    for line, row in enumerate(reader, start=2):
        accel = (row.get("AcceleratorName") or "").strip()
        if not accel:
            continue
        where = f"{source}:{line}"
        count = _num(row.get("AcceleratorCount", ""), f"{where} AcceleratorCount")
        price = _num(row.get("Price", ""), f"{where} Price")
        spot = _num(row.get("SpotPrice", "") or "", f"{where} SpotPrice")
        if count is None or count <= 0 or count != int(count):
            raise CatalogError(f"{where} AcceleratorCount: expected a whole number of GPUs, got {count!r}")
        if price is None or price <= 0:
            continue  # listed without an on-demand price: nothing to budget with
        try:
            row_cloud = (row.get("Cloud") or cloud).strip().lower()
            gpu = canonical_gpu(accel, _gpu_memory_gib(row.get("GpuInfo", ""), int(count), row_cloud),
                                row.get("InstanceType", ""))
        except UnknownGpu:
            if unknown is not None:
                unknown.add(accel)
            continue
        capacity = _num(row.get("Capacity", "") or "", f"{where} Capacity")
        if capacity is not None and (capacity < 0 or capacity != int(capacity)):
            raise CatalogError(f"{where} Capacity: expected a whole number of instances, got {capacity!r}")
        spot_price = spot if spot and spot > 0 else None
        if spot_price is not None and spot_price > price:
            spot_price = price
        offers.append(Offer(
            cloud=(row.get("Cloud") or cloud).strip().lower(),
            instance_type=row["InstanceType"].strip(),
            gpu_type=gpu,
            gpu_count=int(count),
            price=price,
            spot_price=spot_price,
            region=(row.get("Region") or "").strip(),
            zone=(row.get("AvailabilityZone") or "").strip(),
            capacity=None if capacity is None else int(capacity),
        ))
    return offers


def load_offers(paths: Iterable[str | Path], unknown: set[str] | None = None) -> list[Offer]:
    """Offers from one or more SkyPilot vms.csv files (any column order); raises CatalogError."""
    offers: list[Offer] = []
    for p in paths:
        path = Path(p).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise CatalogError(f"cannot read catalog {path}: {e.strerror or e}") from e
        offers.extend(parse_vms_csv(text, str(path), _cloud_of(path), unknown))
    if not offers:
        raise CatalogError(f"no GPU offers with a price in {', '.join(map(str, paths))}")
    return offers


def sky_offers(clouds: list[str] | None = None) -> list[Offer]:
    """Offers from SkyPilot's catalog (its cached ``~/.sky/catalogs``), through ``sky.catalog``.

    Runs in-process with no API server and no credentials; a catalog that is missing from the cache
    makes SkyPilot try to download it, which fails offline, so an error here says to pass --catalog.
    """
    try:
        from sky import catalog as sky_catalog
    except ImportError as e:
        raise CatalogError("SkyPilot is not installed: pip install 'thunderserve[cloud]', or pass --catalog") from e
    try:
        listing = sky_catalog.list_accelerators(gpus_only=True, clouds=clouds, all_regions=True, require_price=True)
    except Exception as e:  # SkyPilot raises many types (network, missing files); report one line
        raise CatalogError(f"SkyPilot catalog unavailable ({type(e).__name__}: {e}); pass --catalog vms.csv") from e
    offers: list[Offer] = []
    for infos in listing.values():
        for info in infos:
            try:
                mem = info.device_memory
                if mem and str(info.cloud).lower() == "vast" and (info.accelerator_count or 1) > 1:
                    mem = mem / info.accelerator_count  # Vast's catalog gives the instance total (see above)
                gpu = canonical_gpu(info.accelerator_name, mem, info.instance_type or "")
            except UnknownGpu:
                continue
            if not info.price or info.price <= 0 or not info.accelerator_count:
                continue
            spot = info.spot_price if info.spot_price and info.spot_price > 0 else None
            offers.append(Offer(str(info.cloud).lower(), info.instance_type or f"{gpu}:{info.accelerator_count}", gpu,
                                int(info.accelerator_count), float(info.price),
                                min(spot, info.price) if spot else None, info.region or ""))
    if not offers:
        raise CatalogError("SkyPilot's catalog lists no GPU offers with prices; pass --catalog vms.csv")
    return offers


def sky_cached_clouds() -> list[str]:
    """Clouds whose SkyPilot catalog is already in the local cache (reading them needs no network)."""
    import os

    root = Path(os.environ.get("SKY_RUNTIME_DIR", str(Path.home() / ".sky"))) / "catalogs" / "v8"
    return sorted(p.parent.name for p in root.glob("*/vms.csv")) if root.is_dir() else []


def builtin_offers() -> list[Offer]:
    """A small offer table (one 'builtin' cloud, one region) priced from each GPU's reference price.

    Spot prices are the reference price; on-demand is 1.4x it. Used when neither --catalog nor
    SkyPilot's catalog is available, so `tsctl plan` always has something to plan with.
    """
    wanted = ["H200", "H100", "A100-80GB", "A100", "L40S", "L40", "A40", "RTXA6000", "L4", "A10G", "A10",
              "RTX4090", "RTX3090", "T4", "V100"]
    offers = []
    for name in wanted:
        g = GPUS[name]
        for count in (1, 2, 4, 8):
            if name in ("RTX4090", "RTX3090", "L4", "T4", "A10G", "A10") and count > 4:
                continue
            offers.append(Offer("builtin", f"{count}x_{name}", name, count, round(1.4 * g.ref_price * count, 4),
                                round(g.ref_price * count, 4), "default"))
    return offers


def offers_per_shape(offers: Iterable[Offer],
                     spot: bool) -> dict[tuple[str, str, str, int], list[tuple[Offer, float, bool]]]:
    """For each (cloud, region, gpu type, gpu count): the offers worth renting, cheapest first, each
    with its price and whether spot.

    The cheapest buys at least as many of the same instance as any other, so a dearer one is kept only
    while the cheaper ones are capped by what the provider can give (the catalog's Capacity column);
    with no capacities this is the cheapest offer alone. An instance type listed in several zones of a
    region at one price is one offer whose capacity is the zones' sum (SkyPilot picks the zone)."""
    merged: dict[tuple, tuple[Offer, float, bool]] = {}
    for o in offers:
        charge("offer")
        price, is_spot = o.hourly(spot)
        key = (o.cloud, o.region, o.gpu_type, o.gpu_count, o.instance_type, price, is_spot)
        if key in merged:
            first = merged[key][0]
            if first.capacity is not None:  # an unlimited zone leaves the offer unlimited
                total = None if o.capacity is None else first.capacity + o.capacity
                merged[key] = (replace(first, zone="", capacity=total), price, is_spot)
        else:
            merged[key] = (o, price, is_spot)
    by_shape: dict[tuple[str, str, str, int], list[tuple[Offer, float, bool]]] = {}
    for (cloud, region, gpu, count, *_), choice in merged.items():
        by_shape.setdefault((cloud, region, gpu, count), []).append(choice)
    out = {}
    for key, choices in by_shape.items():
        choices.sort(key=lambda c: c[1])  # ties: catalog order
        kept = []
        for choice in choices:
            kept.append(choice)
            if choice[0].capacity is None:
                break
        out[key] = kept
    return out
