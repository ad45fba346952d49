"""What every phase of a client connection uses: the policy, the reporter, the resolver, the
settings and the second tier."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.fastpath.config import ProxyConfig
from sidecar.fastpath.handover import SecondTier
from sidecar.policy.store import PolicyStore
from sidecar.proxy.resolver import Resolver
from sidecar.reporter import Reporter


@dataclass(frozen=True, slots=True)
class Services:
    config: ProxyConfig
    store: PolicyStore
    reporter: Reporter
    resolver: Resolver
    second_tier: SecondTier
