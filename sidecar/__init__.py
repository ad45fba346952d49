"""egress-sidecar: the per-pod egress allowlist proxy."""
