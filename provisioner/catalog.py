"""Instance-type catalogs in SkyPilot's ``vms.csv`` format, read without SkyPilot.

The local provisioner declares its virtual instance types (GPU type and count, on-demand and spot
price) in ``deploy/local-catalog.csv`` with the same columns SkyPilot's catalogs use, so the planner
can price a local cluster exactly as it prices a cloud one. An empty or zero ``SpotPrice`` means the
type has no spot offer (as in SkyPilot's own catalogs).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

REQUIRED_COLUMNS = ("InstanceType", "AcceleratorName", "AcceleratorCount", "Price", "SpotPrice")
LOCAL_CATALOG_ENV = "TS_LOCAL_CATALOG"
LOCAL_PLACE = "local"  # cloud and region of every node the local provider starts (replacements too)


class CatalogError(ValueError):
    """The catalog file is missing, malformed, or has no entry for what was asked."""


@dataclass(frozen=True)
class CatalogEntry:
    instance_type: str
    gpu_type: str
    gpu_count: int
    vcpus: float
    memory_gib: float
    price: float  # on-demand $/h for the whole instance
    spot_price: float | None  # None: no spot offer
    region: str = ""
    cloud: str = ""

    def price_for(self, spot: bool) -> float:
        if not spot:
            return self.price
        if self.spot_price is None:
            raise CatalogError(f"{self.instance_type} has no spot offer in the catalog")
        return self.spot_price


def _float(row: dict[str, str], col: str, default: float | None = None) -> float | None:
    raw = (row.get(col) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as e:
        raise CatalogError(f"column {col}: {raw!r} is not a number (row {row.get('InstanceType')!r})") from e
    return None if math.isnan(value) else value


class Catalog:
    """Rows of one ``vms.csv``; one entry per instance type (the cheapest region's row)."""

    def __init__(self, entries: list[CatalogEntry], source: str = "") -> None:
        self.source = source
        self._by_type: dict[str, CatalogEntry] = {}
        for e in entries:
            seen = self._by_type.get(e.instance_type)
            if seen is None or e.price < seen.price:
                self._by_type[e.instance_type] = e

    @classmethod
    def load(cls, path: str | Path, cloud: str = LOCAL_PLACE) -> Catalog:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise CatalogError(f"cannot read catalog {path}: {e.strerror}") from e
        reader = csv.DictReader(text.splitlines())
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CatalogError(f"catalog {path} lacks column(s) {', '.join(missing)} (SkyPilot vms.csv format)")
        entries = []
        for row in reader:
            count = _float(row, "AcceleratorCount", 0.0) or 0.0
            spot = _float(row, "SpotPrice")
            price = _float(row, "Price")
            if price is None:
                raise CatalogError(f"catalog {path}: {row['InstanceType']} has no Price")
            entries.append(
                CatalogEntry(
                    instance_type=row["InstanceType"].strip(),
                    gpu_type=(row.get("AcceleratorName") or "").strip(),
                    gpu_count=int(count),
                    vcpus=_float(row, "vCPUs", 0.0) or 0.0,
                    memory_gib=_float(row, "MemoryGiB", 0.0) or 0.0,
                    price=price,
                    spot_price=spot if spot else None,
                    region=(row.get("Region") or "").strip(),
                    cloud=cloud,
                )
            )
        if not entries:
            raise CatalogError(f"catalog {path} has no rows")
        return cls(entries, source=str(path))

    def entries(self) -> list[CatalogEntry]:
        return sorted(self._by_type.values(), key=lambda e: (e.price, e.instance_type))

    def has(self, instance_type: str) -> bool:
        return instance_type in self._by_type

    def get(self, instance_type: str) -> CatalogEntry:
        try:
            return self._by_type[instance_type]
        except KeyError:
            known = ", ".join(sorted(self._by_type))
            raise CatalogError(
                f"unknown instance type {instance_type!r} in {self.source or 'the catalog'} (known: {known})"
            ) from None

    def find(self, gpu_type: str, gpu_count: int, spot: bool) -> list[CatalogEntry]:
        """Types with exactly ``gpu_count`` GPUs of ``gpu_type`` (and a spot offer if ``spot``), cheapest first."""
        found = [
            e
            for e in self._by_type.values()
            if e.gpu_type.lower() == gpu_type.lower()
            and e.gpu_count == gpu_count
            and (not spot or e.spot_price is not None)
        ]
        return sorted(found, key=lambda e: (e.price_for(spot), e.instance_type))


def default_local_catalog_path() -> Path:
    """``$TS_LOCAL_CATALOG`` if set, else ``deploy/local-catalog.csv`` of this checkout."""
    env = os.environ.get(LOCAL_CATALOG_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "deploy" / "local-catalog.csv"
