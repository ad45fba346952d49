"""Transparent capture: the iptables/ip6tables rules that redirect a pod's outbound TCP to the
sidecar's transparent listener (``rules`` is pure; ``apply`` runs the restore tools; ``cli``
is the `egress-sidecar iptables` subcommand, run by the ``egress-init`` container)."""
