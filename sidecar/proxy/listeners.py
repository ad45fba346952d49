"""mitmproxy's ERROR for a connection to the transparent port that iptables did not redirect,
turned into one warning per interval."""

from __future__ import annotations

import logging
import time

from sidecar.fastpath.accept import LOG_INTERVAL_SECONDS

log = logging.getLogger(__name__)


class UnredirectedConnections(logging.Filter):
    """Turns mitmproxy's ERROR for a connection to the transparent port that iptables did not
    redirect (it has no original destination; mitmproxy closes it) into one warning per interval.

    Any process in the pod can connect to that port directly: an ERROR line for each would let it
    flood the sidecar's log.
    """

    MARK = "Transparent mode failure"

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        super().__init__()
        self._interval = interval
        self._last: float | None = None
        self._since = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MARK):
            return True
        self._since += 1
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        detail = record.getMessage().removeprefix(self.MARK).strip(": ")
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = (
            "closed connections to the transparent port that were not redirected there "
            "(no original destination)"
        )
        record.args = ()
        record.__dict__.update(times=self._since, interval_s=self._interval, error=detail)
        self._since = 0
        return True


def install_unredirected_filter() -> None:
    logger = logging.getLogger("mitmproxy.proxy.mode_servers")
    if not any(isinstance(f, UnredirectedConnections) for f in logger.filters):
        logger.addFilter(UnredirectedConnections())
