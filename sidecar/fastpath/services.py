"""What every phase of a client connection uses: the policy, the reporter, the resolver, the
settings, the second tier, the fast path's upstream HTTP pool and the front door's state."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.fastpath.config import ProxyConfig
from sidecar.fastpath.handover import SecondTier
from sidecar.fastpath.http_pool import HttpPool
from sidecar.policy.store import PolicyStore
from sidecar.proxy.resolver import Resolver
from sidecar.reporter import Reporter


@dataclass(slots=True)
class FrontState:
    """What the front door tells its connections: draining, a response says connection: close."""

    draining: bool = False


@dataclass(frozen=True, slots=True)
class Services:
    config: ProxyConfig
    store: PolicyStore
    reporter: Reporter
    resolver: Resolver
    second_tier: SecondTier
    http_pool: HttpPool = field(default_factory=HttpPool)
    front: FrontState = field(default_factory=FrontState)
