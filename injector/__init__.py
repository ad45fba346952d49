"""egress-injector: puts the egress-sidecar into the pods of workloads that opt in.

``injector.mutate`` is the pure core (pod spec in, pod spec out, and why); ``injector.webhook``
serves it as a Kubernetes mutating admission webhook; ``injector.offline`` applies it to manifest
files; ``injector.certs`` makes the webhook's serving certificate; ``injector.cli`` is the
``egress-injector`` command.
"""

__version__ = "0.1.0"
