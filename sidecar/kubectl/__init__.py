"""`kubectl egress`: the kubectl plugin (console script `kubectl-egress`).

``plan`` is pure (what to propose, what would change, how tables look); ``cluster`` talks to
the API server with the official client; ``cli`` wires them to argparse. The sidecar's own
process never imports this package (the kubernetes client is heavy; see pyproject's contracts).
"""
