"""`python -m bench.soak` (`make soak`): the sidecar under sustained mixed load while its
allowlist flips, checked request by request.

Many concurrent asyncio clients send plain-HTTP GETs and CONNECT + TLS + GET through the real
sidecar to an nginx upstream on loopback, for four host names: allowed by both allowlist
versions, only by version A, only by version B, by neither. The allowlist file is replaced every
``--flip-interval`` seconds, alternating A and B. Each request is joined to the sidecar's
decision line (by its client address: every request comes from its own 127.64.0.0/10 source
address) and judged against the policy version that the decision names. The sidecar's RSS and
open file descriptors are sampled every second. Traffic goes to loopback only; every loop is
bounded in time and count.

Modules: ``model`` (pure: allowlist versions, parsers, judging, aggregation, the report),
``clients`` (the asyncio clients), ``runner`` (processes, flips, sampling), ``__main__`` (CLI).
"""
