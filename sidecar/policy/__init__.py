"""The pure decision core: allowlist parsing, host and address matching, the address guard.

Nothing in this package performs I/O or imports mitmproxy, kubernetes or opentelemetry
(enforced by the import-linter contract in pyproject.toml).
"""
