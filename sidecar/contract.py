"""Names, ports and identities fixed by the product contract (shared/DESIGN.md).

Pure constants: the injector, the iptables rules and the proxy all import them from here so
that a port or a UID is written down once.
"""

from typing import Final

PREFIX: Final = "egress-sidecar.io/"

SIDECAR_CONTAINER: Final = "egress-sidecar"
INIT_CONTAINER: Final = "egress-init"
PROXY_UID: Final = 1337
PROXY_GID: Final = 1337

EXPLICIT_PORT: Final = 15001
TRANSPARENT_PORT: Final = 15002
HEALTH_PORT: Final = 15021
DNS_LISTEN_PORT: Final = 15053  # the sidecar's DNS listener, UDP and TCP (the app's 53 goes here)
DNS_PORT: Final = 53  # the pod's resolvers; the only UDP transparent capture lets out

DEFAULT_ALLOWLIST_CONFIGMAP: Final = "egress-allowlist"
ALLOWLIST_KEY: Final = "allowlist.yaml"

ANNOTATION_INJECT: Final = PREFIX + "inject"
LABEL_INJECTION: Final = PREFIX + "injection"
ANNOTATION_ALLOWLIST: Final = PREFIX + "allowlist"
ANNOTATION_MODE: Final = PREFIX + "mode"
ANNOTATION_CAPTURE: Final = PREFIX + "capture"
ANNOTATION_EXCLUDE_CIDRS: Final = PREFIX + "exclude-outbound-cidrs"
ANNOTATION_EXCLUDE_PORTS: Final = PREFIX + "exclude-outbound-ports"
ANNOTATION_INCLUDE_PORTS: Final = PREFIX + "include-outbound-ports"
# Transparent capture rejects outbound UDP but DNS to the pod's name servers; these open more.
ANNOTATION_EXCLUDE_UDP_PORTS: Final = PREFIX + "exclude-outbound-udp-ports"
ANNOTATION_EXCLUDE_UDP_CIDRS: Final = PREFIX + "exclude-outbound-udp-cidrs"
ANNOTATION_STATUS: Final = PREFIX + "status"

# Environment the injector sets on the sidecar and the sidecar reads (all optional for local runs).
ENV_CONFIGMAPS: Final = "EGRESS_CONFIGMAPS"  # "[ns/]name[,...]", same as --configmap
ENV_ALLOWLIST_FILE: Final = "EGRESS_ALLOWLIST_FILE"  # same as --allowlist-file
ENV_MODE: Final = "EGRESS_MODE"  # enforce | audit
ENV_CAPTURE: Final = "EGRESS_CAPTURE"  # transparent | explicit
ENV_ALLOW_PRIVATE_RANGES: Final = "EGRESS_ALLOW_PRIVATE_RANGES"  # comma-separated CIDRs
ENV_POD_NAME: Final = "POD_NAME"
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"
ENV_NODE_NAME: Final = "NODE_NAME"
ENV_WORKLOAD_KIND: Final = "EGRESS_WORKLOAD_KIND"  # e.g. Deployment
ENV_WORKLOAD_NAME: Final = "EGRESS_WORKLOAD_NAME"  # e.g. web

# Opt-in HTTPS inspection (issue 12): the namespace's CA, a kubernetes.io/tls Secret whose tls.crt
# and tls.key the injector mounts read-only into the sidecar container only, at INSPECT_CA_DIR
# (the sidecar's --inspect-ca-dir / EGRESS_INSPECT_CA_DIR). Pods opt in with the annotation.
ANNOTATION_INSPECT_CA: Final = PREFIX + "inspect-ca"
INSPECT_CA_SECRET: Final = "egress-ca"
INSPECT_CA_DIR: Final = "/etc/egress-sidecar/ca"
ENV_INSPECT_CA_DIR: Final = "EGRESS_INSPECT_CA_DIR"

HEALTH_LIVE_PATH: Final = "/healthz/live"
HEALTH_READY_PATH: Final = "/healthz/ready"
METRICS_PATH: Final = "/metrics"
DEBUG_DESTINATIONS_PATH: Final = "/debug/destinations"  # read-only summary of what was decided
