"""The mitmproxy adapter: listeners, protocol layering, and the decision addon."""
