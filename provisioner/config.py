"""The ``provisioner:`` section of a deployment config (``deploy/example-config.yaml``), checked.

Errors name the field at fault (``provisioner.node.agent_port: ...``) so a bad config fails in one
line before anything is rented.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from provisioner.fallback import SpotFallbackPolicy
from provisioner.sky_catalog import DEFAULT_CLOUDS
from provisioner.skypilot_task import NodeTaskSettings

KINDS = ("skypilot", "local")


class ConfigError(ValueError):
    """A config field that cannot be used; the message starts with the field's path."""


@dataclass(frozen=True)
class ProvisionerConfig:
    kind: str
    clouds: tuple[str, ...]
    regions: tuple[str, ...]
    fallback: SpotFallbackPolicy
    poll_interval_s: float
    node: dict[str, Any]

    def node_settings(self, redis_url: str, deployment: str) -> NodeTaskSettings:
        return NodeTaskSettings(redis_url=redis_url, deployment=deployment, **self.node)


def _expect(value: Any, kind: type | tuple[type, ...], path: str) -> Any:
    """``value`` if it has the expected type (a bool is not a number here), else ConfigError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"{path}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def load_provisioner_config(section: dict[str, Any] | None) -> ProvisionerConfig:
    """Parse ``provisioner:``; missing fields take the defaults of the classes they configure."""
    section = dict(section or {})
    kind = _expect(section.pop("kind", "skypilot"), str, "provisioner.kind")
    if kind not in KINDS:
        raise ConfigError(f"provisioner.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    clouds = tuple(_expect(c, str, "provisioner.clouds[]").lower()
                   for c in _expect(section.pop("clouds", list(DEFAULT_CLOUDS)), list, "provisioner.clouds"))
    regions = tuple(_expect(r, str, "provisioner.regions[]")
                    for r in _expect(section.pop("regions", []) or [], list, "provisioner.regions"))
    fb = dict(_expect(section.pop("spot_fallback", {}) or {}, dict, "provisioner.spot_fallback"))
    max_failures = _expect(fb.pop("max_spot_failures", 2), int, "provisioner.spot_fallback.max_spot_failures")
    window_s = float(_expect(fb.pop("window_s", 3600), (int, float), "provisioner.spot_fallback.window_s"))
    try:
        fallback = SpotFallbackPolicy(max_spot_failures=max_failures, window_s=window_s)
    except ValueError as e:
        raise ConfigError(f"provisioner.spot_fallback: {e}") from e
    if fb:
        raise ConfigError(f"provisioner.spot_fallback.{next(iter(fb))}: unknown field")
    poll = float(_expect(section.pop("poll_interval_s", 30), (int, float), "provisioner.poll_interval_s"))
    node = dict(_expect(section.pop("node", {}) or {}, dict, "provisioner.node"))
    allowed = {f.name for f in fields(NodeTaskSettings)} - {"redis_url", "deployment"}
    for key in node:
        if key not in allowed:
            raise ConfigError(f"provisioner.node.{key}: unknown field (known: {', '.join(sorted(allowed))})")
    for key in ("agent_port", "disk_size_gb"):
        if key in node:
            _expect(node[key], int, f"provisioner.node.{key}")
    if section:
        raise ConfigError(f"provisioner.{next(iter(section))}: unknown field")
    return ProvisionerConfig(kind, clouds, regions, fallback, poll, node)
