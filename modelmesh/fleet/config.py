"""What the fleet's decisions are tuned by (the server builds it from its settings)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FleetConfig:
    lease_seconds: float = 10.0  # the store's lease: a pod that stops answering is skipped twice as long
    forward_timeout_seconds: float = 120.0  # the longest a forwarded request may take
    capacity_wait_seconds: float = 5.0  # fleet-wide: how long a request waits for some pod's room
    load_retry_max_seconds: float = 60.0  # a pod whose load failed is not chosen again for this long
    load_timeout_seconds: float | None = 300.0  # a claim older than this (plus 5 s) is stale
    shutdown_grace_seconds: float = 10.0  # hand-off gets 60% of it
    tick_seconds: float = 0.0  # the periodic work (pod record, copies); 0: a third of the lease, 1 s at most
    # Defaults of the dynamic settings (the store's ``settings/<name>`` overrides them).
    second_copy_after_seconds: float = 420.0
    copy_rate_per_minute: float = 2000.0
    max_copies: int = 3

    @property
    def suspect_seconds(self) -> float:
        return max(2.0 * self.lease_seconds, 3.0)

    @property
    def tick_interval(self) -> float:
        return self.tick_seconds or min(1.0, self.lease_seconds / 3)

    @property
    def claim_age(self) -> float:
        return (self.load_timeout_seconds or 300.0) + 5.0
