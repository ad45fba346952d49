"""The DNS listener (127.0.0.1:15053, UDP and TCP): the pod's DNS, decided by the policy core
(sidecar.policy.dns) and forwarded to the pod's own resolvers; dnspython reads and writes the
wire format."""
