"""The pure decision core: allowlist parsing, host and address matching, the address guard.

Nothing in this package performs I/O or imports mitmproxy, kubernetes or opentelemetry
(enforced by the import-linter contract in pyproject.toml).
"""

from sidecar.policy.addresses import AddressClass, classify, is_public
from sidecar.policy.engine import Policy, Rule, combine
from sidecar.policy.errors import AllowlistError, InvalidHost, PolicyError, Problem
from sidecar.policy.hosts import normalize_host, parse_ip, split_host_port
from sidecar.policy.parse import digest, parse_allowlist, validate_text

__all__ = [
    "AddressClass",
    "AllowlistError",
    "InvalidHost",
    "Policy",
    "PolicyError",
    "Problem",
    "Rule",
    "classify",
    "combine",
    "digest",
    "is_public",
    "normalize_host",
    "parse_allowlist",
    "parse_ip",
    "split_host_port",
    "validate_text",
]
