"""Kubernetes adapters: client configuration, the ConfigMap watcher, the Event recorder.

They speak the API's HTTP themselves (sidecar.k8s.client): the official ``kubernetes`` package
is kept out of the sidecar's process (an import-linter contract says so); the policy core never
sees any of it.
"""
