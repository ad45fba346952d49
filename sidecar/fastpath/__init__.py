"""The fast path: our own front door on the proxy listeners (asyncio Protocols, httptools),
handling ordinary calls itself and handing the rest to mitmproxy, which is loaded on first need."""
