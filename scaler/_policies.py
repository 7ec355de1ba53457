"""Policies by name, each given the same per-replica target: the one knob every anchor has
(Knative's target annotation, the HPA's averageUtilization, Ray's target_ongoing_requests).
Everything else stays at each project's default (docs/SCALER.md, "Baselines")."""

from __future__ import annotations

import dataclasses

from ._baselines import HpaConfig, HpaPolicy, KpaConfig, RayServeConfig, RayServePolicy, kpa_policy
from ._config import PolicyConfig
from ._errors import ConfigError
from ._policy import ConcurrencyPolicy, Policy

NAMES = ("concurrency", "kpa", "hpa", "rayserve")


def make_policy(name: str, *, target_concurrency: float, max_concurrency: int,
                policy: PolicyConfig | None = None, max_replicas: int = 1000) -> Policy:
    if name == "concurrency":
        cfg = policy or PolicyConfig()
        return ConcurrencyPolicy(dataclasses.replace(
            cfg, target_concurrency=target_concurrency, max_replicas=max_replicas))
    if name == "kpa":
        return kpa_policy(KpaConfig(target=target_concurrency, max_replicas=max_replicas))
    if name == "hpa":
        # A utilization metric: busy slots / slots. Aiming at target/max_concurrency makes
        # the HPA aim at the same per-replica load as the others.
        util = min(1.0, target_concurrency / max_concurrency)
        return HpaPolicy(HpaConfig(target_utilization=util, max_replicas=max_replicas))
    if name == "rayserve":
        return RayServePolicy(RayServeConfig(target_ongoing_requests=target_concurrency,
                                             max_replicas=max_replicas))
    raise ConfigError(f"unknown policy {name!r} (known: {', '.join(NAMES)})")
