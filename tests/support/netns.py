"""Network-namespace harness: a "pod" and an "outside" world joined by a veth pair.

Needs root, ``ip`` (iproute2), ``setpriv``/``unshare`` (util-linux). Only addresses from
198.18.0.0/15 and fd00::/8 are used, and only inside namespaces created here.

- Namespace names are unique per run (``egsc-<pid>-<random>-pod``); ``reap_stale`` removes the
  ones left by an earlier run whose process is gone.
- ``World.close`` ends every process it started (by process group id), then every process still
  inside its namespaces (``ip netns pids``), then deletes the namespaces: call it from a
  finalizer so it runs when a test fails.
- ``Netns.run``/``popen`` run a command in the namespace as a given UID/GID via
  ``ip netns exec NS setpriv --reuid U --regid G --clear-groups --``, with an environment free of
  proxy variables; ``binds`` bind-mounts files (e.g. a hosts file over ``/etc/hosts``) in a
  private mount namespace (``unshare -m``) for that process only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography import x509

from tests.support.tls import TestCA

PREFIX: Final = "egsc-"
REPO: Final = Path(__file__).resolve().parents[2]
UPSTREAM_SCRIPT: Final = Path(__file__).with_name("netns_upstream.py")
CLIENT_SCRIPT: Final = Path(__file__).with_name("netns_client.py")

POD4: Final = "198.18.0.1"
POD6: Final = "fd00:e5::1"
# Outside addresses: [0] the allowed web host, [1] an address no allow rule names,
# [2] the raw-TCP host named by cidr rules.
OUT4: Final = ("198.18.0.2", "198.18.0.3", "198.18.0.4")
OUT6: Final = ("fd00:e5::2", "fd00:e5::3", "fd00:e5::4")

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class HarnessError(RuntimeError):
    """Setting up or running something in a namespace failed; the message says what."""


def _check_address(addr: str) -> None:
    ip = ipaddress.ip_address(addr)
    allowed = ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fd00::/8")
    if not any(ip in net for net in allowed if net.version == ip.version):
        raise HarnessError(f"{addr} is outside 198.18.0.0/15 and fd00::/8")


def sh(argv: Sequence[str], *, timeout: float = 20, check: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in _PROXY_VARS and not k.startswith(("PYTEST_", "COV_"))
    }
    env.update(extra or {})
    return env


def make_traversable(*paths: Path) -> list[Path]:
    """Add o+x (search only, not read) to every directory on the way to ``paths`` that lacks
    it, so other UIDs can start the interpreter (pyenv lives under /root, mode 700).
    Returns the directories changed."""
    changed = []
    for path in paths:
        for d in [path.resolve(), *path.resolve().parents]:
            if not d.is_dir():
                continue
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                d.chmod(mode | stat.S_IXOTH)
                changed.append(d)
    return changed


def interpreter_paths() -> list[Path]:
    return [Path(sys.executable), Path(sys.executable).resolve(), REPO]


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def prefix(
        self,
        uid: int | None = None,
        gid: int | None = None,
        binds: Mapping[str, Path] | None = None,
    ) -> list[str]:
        argv = ["ip", "netns", "exec", self.name]
        if binds:
            script = " && ".join(
                f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}"
                for dst, src in binds.items()
            )
            argv += ["unshare", "-m", "--propagation", "private", "--", "sh", "-c"]
            argv += [script + ' && exec "$@"', "sh"]
        if uid is not None:
            g = uid if gid is None else gid
            argv += ["setpriv", f"--reuid={uid}", f"--regid={g}", "--clear-groups", "--"]
        return argv

    def run(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float = 15,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        binds: Mapping[str, Path] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*self.prefix(uid, gid, binds), *argv],
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                env=clean_env(env),
                check=False,
                cwd="/",
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"in {self.name}: {shlex.join(argv)} timed out ({timeout} s)"
            ) from exc

    def ok(self, argv: Sequence[str], **kwargs: Any) -> str:
        proc = self.run(argv, **kwargs)
        if proc.returncode != 0:
            raise HarnessError(
                f"in {self.name}: {shlex.join(argv)} failed ({proc.returncode}): "
                f"{proc.stderr.strip()}"
            )
        return proc.stdout

    def popen(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        binds: Mapping[str, Path] | None = None,
        env: Mapping[str, str] | None = None,
        output: Path,
    ) -> subprocess.Popen[bytes]:
        with output.open("ab") as out:
            proc = subprocess.Popen(
                [*self.prefix(uid, gid, binds), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_env(env),
                start_new_session=True,  # own process group: killed as a group at teardown
                cwd="/",
            )
        self.procs.append(proc)
        return proc

    def python(self) -> list[str]:
        return [sys.executable]

    def kill_all(self) -> None:
        for proc in self.procs:
            _stop(proc)
        self.procs.clear()
        for pid in _netns_pids(self.name):
            _kill_pid(pid)

    def delete(self) -> None:
        self.kill_all()
        sh(["ip", "netns", "del", self.name], check=False)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(3)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def _netns_pids(name: str) -> list[int]:
    out = sh(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Delete namespaces (and kill their processes) left by earlier runs that died."""
    reaped = []
    for line in sh(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        owner = name.removeprefix(PREFIX).split("-")[0]
        if owner.isdigit() and not _alive(int(owner)):
            Netns(name).delete()
            reaped.append(name)
    return reaped


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path
    ca_subject_cn: str
    leaf_der_sha256: str  # hex, lower case


def make_certs(directory: Path, names: Sequence[str], ips: Sequence[str]) -> Certs:
    """A test CA and a leaf for ``names``/``ips``: the upstream's own certificate."""
    ca = TestCA(f"egress-sidecar netns test CA {secrets.token_hex(4)}")
    leaf = ca.issue(*names, *ips)
    # Chain in the server file: the client sees leaf + CA, as from a real server.
    cert_pem, key_pem = leaf.write(directory, "upstream", chain=True)
    certs = Certs(
        ca_pem=ca.write_ca(directory / "upstream-ca.pem"),
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_subject_cn=ca.common_name,
        leaf_der_sha256=leaf.fingerprint_sha256,
    )
    for p in (certs.ca_pem, certs.cert_pem):
        p.chmod(0o644)
    return certs


def pem_certificates(text: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``text`` (e.g. ``openssl s_client -showcerts`` output)."""
    out = []
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    rest = text
    for _ in range(20):
        start = rest.find(begin)
        if start < 0:
            break
        stop = rest.index(end, start) + len(end)
        out.append(x509.load_pem_x509_certificate(rest[start:stop].encode()))
        rest = rest[stop:]
    return out


# --- the world ------------------------------------------------------------------------------


@dataclass
class Upstream:
    log: Path

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def mark(self) -> int:
        """Position to compare against later: records after it are new."""
        return len(self.records())

    def since(self, mark: int) -> list[dict[str, Any]]:
        return self.records()[mark:]


@dataclass
class World:
    pod: Netns
    outside: Netns
    workdir: Path
    changed_dirs: list[Path] = field(default_factory=list)

    def close(self) -> None:
        errors = []
        for ns in (self.pod, self.outside):
            try:
                ns.delete()
            except Exception as exc:  # keep tearing down the rest
                errors.append(exc)
        shutil.rmtree(self.workdir, ignore_errors=True)
        remaining = {line.split()[0] for line in sh(["ip", "netns", "list"]).splitlines() if line}
        leaked = remaining & {self.pod.name, self.outside.name}
        if leaked or errors:
            raise HarnessError(f"teardown left {sorted(leaked)}; errors {errors}")

    def start_servers(
        self, ns: Netns, name: str, certs: Certs | None = None, **listen: Sequence[str]
    ) -> Upstream:
        """Run ``netns_upstream.py`` in ``ns`` (kinds: http, https, echo, banner, udp, capture)."""
        log = self.workdir / f"{name}.jsonl"
        ready = self.workdir / f"{name}.ready"
        output = self.workdir / f"{name}.out"
        argv = [sys.executable, str(UPSTREAM_SCRIPT), "--log", str(log), "--ready", str(ready)]
        if certs is not None:
            argv += ["--cert", str(certs.cert_pem), "--key", str(certs.key_pem)]
        for kind, specs in listen.items():
            for spec in specs:
                argv += [f"--{kind}", spec]
        proc = ns.popen(argv, output=output)
        wait_for(ready.exists, 15, f"{name} servers", proc, output)
        return Upstream(log)

    def client(
        self,
        *args: str,
        uid: int | None,
        timeout: float = 15,
        binds: Mapping[str, Path] | None = None,
    ) -> dict[str, Any]:
        """Run ``netns_client.py`` in the pod as ``uid``; its JSON result."""
        argv = [sys.executable, str(CLIENT_SCRIPT), *args]
        proc = self.pod.run(argv, uid=uid, timeout=timeout, binds=binds)
        if proc.returncode != 0:
            raise HarnessError(f"client {args} as {uid} failed: {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result


def wait_for(
    condition: Any,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    output: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            tail = output.read_text()[-3000:] if output and output.exists() else ""
            raise HarnessError(f"{what} exited ({proc.returncode}) before ready:\n{tail}")
        time.sleep(0.05)
    tail = output.read_text()[-3000:] if output and output.exists() else ""
    raise HarnessError(f"{what} not ready after {timeout} s:\n{tail}")


def create_world() -> World:
    """Two namespaces, a veth pair, IPv4+IPv6 addresses, lo up in both."""
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    workdir = Path(tempfile.mkdtemp(prefix=tag + "-"))
    workdir.chmod(0o755)  # the sidecar and the app (other UIDs) read files here
    world = World(Netns(tag + "-pod"), Netns(tag + "-out"), workdir)
    try:
        world.changed_dirs = make_traversable(*interpreter_paths(), workdir)
        for addr in (POD4, POD6, *OUT4, *OUT6):
            _check_address(addr)
        for ns in (world.pod, world.outside):
            sh(["ip", "netns", "add", ns.name])
            sh(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        veth = ["type", "veth", "peer", "name", "eth0", "netns", world.outside.name]
        sh(["ip", "-n", world.pod.name, "link", "add", "eth0", *veth])
        sh(["ip", "-n", world.pod.name, "addr", "add", f"{POD4}/24", "dev", "eth0"])
        sh(["ip", "-n", world.pod.name, "addr", "add", f"{POD6}/64", "dev", "eth0", "nodad"])
        for a4 in OUT4:
            sh(["ip", "-n", world.outside.name, "addr", "add", f"{a4}/24", "dev", "eth0"])
        for a6 in OUT6:
            sh(["ip", "-n", world.outside.name, "addr", "add", f"{a6}/64", "dev", "eth0", "nodad"])
        for ns in (world.pod, world.outside):
            sh(["ip", "-n", ns.name, "link", "set", "eth0", "up"])
    except BaseException:
        world.close()
        raise
    return world


def hosts_file(path: Path, entries: Mapping[str, str]) -> Path:
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
    lines += [f"{addr} {name}" for name, addr in entries.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)
    return path


def resolv_conf(path: Path) -> Path:
    """Name servers on loopback only: an unknown name fails at once, no query leaves."""
    path.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    path.chmod(0o644)
    return path


def owned_dir(path: Path, uid: int, gid: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    return path


def iter_lines(path: Path) -> Iterator[str]:
    if path.exists():
        yield from path.read_text().splitlines()


def pod_curl(w: World, args: Sequence[str], *, uid: int, max_time: int = 5) -> tuple[int, str, str]:
    """curl in the pod namespace as ``uid``, no proxy variables honoured: only the capture
    stands between it and the destination. Exit code, stdout, stderr."""
    argv = ["curl", "-sS", "--max-time", str(max_time), "--noproxy", "*", *args]
    proc = w.pod.run(argv, uid=uid, timeout=max_time + 10)
    return proc.returncode, proc.stdout, proc.stderr


def mark_netns(items: Sequence[pytest.Item], directory: Path) -> None:
    """Mark the collected tests under ``directory`` ``netns`` (root, namespaces, iptables)."""
    for item in items:
        if directory in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.netns)


def decisions(path: Path) -> list[dict[str, Any]]:
    """The sidecar's decision log lines in its output file (other lines are passed over)."""
    return [json.loads(line) for line in iter_lines(path) if '"egress decision"' in line]


SIDECAR: Final = [sys.executable, "-m", "sidecar.cli"]
PROXY_UID: Final = 1337


@dataclass
class PodSidecar:
    """The sidecar started by ``start_pod_sidecar``: its process, output file, state dir and
    the files bind-mounted over the pod's /etc."""

    proc: subprocess.Popen[bytes]
    out: Path
    state: Path
    binds: dict[str, Path]


def start_pod_sidecar(
    w: World,
    allowlist: str,
    hosts: Mapping[str, str],
    *,
    private_ranges: Sequence[str] = ("198.18.0.0/15",),
    listen6: str = "off",
    health: str = "0.0.0.0:15021",
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> PodSidecar:
    """`egress-sidecar run` as UID 1337 in the pod namespace, with the allowlist text, /etc/hosts
    from ``hosts`` and a loopback-only resolver; returns once /healthz/ready answers 200.
    Its state dir is ``w.workdir / "sidecar"`` (known before the call, for ``extra`` paths)."""
    path = w.workdir / "allowlist.yaml"
    path.write_text(allowlist)
    path.chmod(0o644)
    state = owned_dir(w.workdir / "sidecar", PROXY_UID, PROXY_UID)
    out = w.workdir / "sidecar.out"
    binds: dict[str, Path] = {
        "/etc/hosts": hosts_file(w.workdir / "hosts", hosts),
        "/etc/resolv.conf": resolv_conf(w.workdir / "resolv.conf"),
    }
    argv = [*SIDECAR, "run", "--allowlist-file", str(path)]
    for cidr in private_ranges:
        argv += ["--allow-private-range", cidr]
    argv += [
        "--explicit-listen", "127.0.0.1:15001", "--transparent-listen", "127.0.0.1:15002",
        "--transparent-listen6", listen6, "--health-listen", health,
        "--confdir", str(state / "mitmproxy"), *extra,
    ]  # fmt: skip
    proc_env = {"HOME": str(state), **(env or {})}
    proc = w.pod.popen(argv, uid=PROXY_UID, binds=binds, env=proc_env, output=out)

    def ready() -> bool:
        url = "http://127.0.0.1:15021/healthz/ready"
        probe = w.pod.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "1", url],
            timeout=5,
        )
        return probe.stdout == "200"

    wait_for(ready, 30, "sidecar", proc, out)
    return PodSidecar(proc, out, state, binds)
