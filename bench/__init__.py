"""`python -m bench`: egress-sidecar against Squid, same upstream, same load generators.

Scenarios (each proxy pinned to one core, load generators and the nginx upstream on the other):
plain-HTTP keep-alive req/s at c=16, new CONNECT tunnels/s at c=16, requests/s over long-lived
tunnels at c=16, one 100 MB download through one tunnel, added p50/p99 latency at c=1 against
direct, RSS idle and under load, CPU-seconds per 10k requests, RSS per idle tunnel with 2,000
held. Then the sidecar alone, against its own reference: span export on (OTLP to a receiver in
the bench), a 10,000-rule allowlist, transparent capture (iptables REDIRECT in network
namespaces, HTTP and new TLS connections). Traffic goes to loopback only, or stays inside the
namespaces the bench creates (198.18.0.0/15).
"""
