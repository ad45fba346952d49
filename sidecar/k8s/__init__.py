"""Kubernetes adapters: client configuration, the ConfigMap watcher, the Event recorder.

Every import of the ``kubernetes`` client lives here or in ``sidecar.sources``; the policy core
never sees it.
"""
