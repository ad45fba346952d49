"""HTTPS inspection's pod side, from the built image: a Deployment annotated
egress-sidecar.io/inspect-ca=true goes through `egress-injector inject`; the kubelet's projection of
the Secret egress-ca is made from the injected spec (its items, its mode; an empty directory when
the Secret is missing, as for an optional volume); the init container egress-ca-bundle runs from
the image (UID 1337, no capabilities, read-only root) and writes the bundle with the image's own
roots (Debian's ca-certificates, which the image installs for the sidecar's upstream checks);
then the app container (the image's python3, another UID, the injected variables, no CA path of
its own) trusts a leaf signed by the egress CA, served by a real upstream outside the pod, and finds
no private key anywhere it can read, while a container with the sidecar's mounts and user reads
the key. Without the Secret the pod still starts and the app's handshake fails.

Run by `make image-test` (EGRESS_IMAGE = the image of these sources).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from injector import certs as injector_certs
from injector.config import DEFAULT_IMAGE
from injector.mutate import CA_BUNDLE_CONTAINER, CA_CERT_VOLUME, CA_VOLUME
from sidecar import contract as c
from tests.image.runtime import ImagePodRunner, image_config, mounted_rootfs
from tests.support import netns as h
from tests.support.injection import cluster_env, deployment, inject, service_account, start_api
from tests.support.netns import OUT4, POD4
from tests.support.netns_pod import in_netns
from tests.support.tls import inspection_leaf

IMAGE = os.environ.get("EGRESS_IMAGE", DEFAULT_IMAGE)
WEB4 = OUT4[0]
HOST = "api.stripe.test"
NAMESPACE, POD_NAME, NODE = "shop", "checkout-6c9d-q7x2p", "node-a"
APP_UID = 4242

# The app: the image's python3 with nothing but the environment the injector gave it.
APP = """\
import json, os, urllib.request
out = {"env": {k: os.environ.get(k) for k in
       ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")}}
keys = []
for top in ("/etc", "/run", "/tmp", "/root"):
    for where, _, files in os.walk(top):
        for name in files:
            path = os.path.join(where, name)
            try:
                with open(path, "rb") as fh:
                    if b"PRIVATE KEY" in fh.read(1 << 20):
                        keys.append(path)
            except OSError:
                pass
out["keys"] = keys
out["sidecar_dir"] = os.path.exists("/etc/egress-sidecar/ca")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open("https://api.stripe.test/v1/charges", timeout=10) as r:
        out["status"] = r.status
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""
KEY_READER = "key-reader"


def manifest() -> str:
    doc = yaml.safe_load(
        deployment(
            NAMESPACE,
            {
                "securityContext": {"runAsUser": APP_UID, "runAsGroup": APP_UID},
                "containers": [{"name": "app", "image": IMAGE, "command": ["python3", "-c", APP]}],
            },
        )
    )
    doc["metadata"]["annotations"][c.ANNOTATION_INSPECT_CA] = "true"
    return yaml.safe_dump(doc)


def leaf_for(ca: injector_certs.InspectionCA, directory: Path) -> h.Certs:
    """The certificate the sidecar would show for HOST: a short-lived leaf signed by the CA."""
    cert, key = inspection_leaf(ca.cert_pem, ca.key_pem, HOST)
    cert_pem = directory / "leaf.pem"
    cert_pem.write_bytes(cert)
    key_pem = directory / "leaf.key"
    key_pem.write_bytes(key)
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    ca_file = directory / "egress-ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    return h.Certs(
        ca_pem=ca_file,
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_subject_cn=injector_certs.inspection_ca_name(NAMESPACE),
        leaf_der_sha256=hashlib.sha256(der).hexdigest(),
    )


def project_secret(directory: Path, volume: dict[str, Any], data: dict[str, bytes] | None) -> Path:
    """What the kubelet puts in a Secret volume: the items named (all keys without items) with
    the volume's mode; nothing when the Secret is missing and the volume optional."""
    source = volume["secret"]
    assert source["secretName"] == c.INSPECT_CA_SECRET
    path = directory / f"secret-{volume['name']}"
    path.mkdir()
    path.chmod(0o755)
    if data is None:
        assert source["optional"] is True  # else the pod would not start at all
        return path
    items = source.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        target = path / item["path"]
        target.write_bytes(data[item["key"]])
        target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
    return path


@dataclass
class Pod:
    spec: dict[str, Any]
    bundle: subprocess.CompletedProcess[str]
    app: dict[str, Any]
    key_reader: subprocess.CompletedProcess[str]
    ca: injector_certs.InspectionCA
    with_secret: bool


def _run_pod(w: h.World, with_secret: bool) -> Iterator[Pod]:
    config = image_config(IMAGE)  # fails (does not skip) when the image was not built
    image_env = dict(e.split("=", 1) for e in config.get("Env", []))
    ca = injector_certs.generate_inspection_ca(NAMESPACE, days=30)
    leaf = leaf_for(ca, w.workdir)
    w.start_servers(w.outside, "outside", leaf, https=[f"{WEB4}:443"])
    api = in_netns(w.pod.name, lambda: start_api(w.workdir))
    try:
        spec = inject(w.workdir, manifest(), {"image": IMAGE})
        # a container with exactly the sidecar's mounts and user, reading the key it is given
        (sidecar,) = [x for x in spec["initContainers"] if x["name"] == c.SIDECAR_CONTAINER]
        reader = copy.deepcopy(sidecar)
        for field in ("restartPolicy", "startupProbe", "readinessProbe", "livenessProbe", "ports"):
            reader.pop(field, None)
        reader["name"] = KEY_READER
        reader["command"] = ["python3", "-c"]
        reader["args"] = [
            "import os; d = os.environ['EGRESS_INSPECT_CA_DIR']; "
            "print(sorted(os.listdir(d))); print(open(d + '/tls.key').read().splitlines()[0])"
        ]
        spec["containers"].append(reader)
        data = (
            {"tls.crt": ca.cert_pem, "tls.key": ca.key_pem, "ca.crt": ca.cert_pem}
            if with_secret
            else None
        )
        volumes = {v["name"]: v for v in spec["volumes"]}
        provided = {
            name: project_secret(w.workdir, volumes[name], data)
            for name in (CA_VOLUME, CA_CERT_VOLUME)
        }
        sa = service_account(w.workdir, api, NAMESPACE)
        with (
            mounted_rootfs(IMAGE, f"{w.pod.name}-bundle") as bundle_root,
            mounted_rootfs(IMAGE, f"{w.pod.name}-app") as app_root,
            mounted_rootfs(IMAGE, f"{w.pod.name}-reader") as reader_root,
        ):
            runner = ImagePodRunner(
                w,
                spec,
                POD_NAME,
                NAMESPACE,
                NODE,
                POD4,
                files={
                    "/etc/hosts": h.hosts_file(w.workdir / "hosts", {HOST: WEB4}),
                    "/etc/resolv.conf": h.resolv_conf(w.workdir / "resolv.conf"),
                },
                service_account=sa,
                cluster_env=cluster_env(api),
                image_env=image_env,
                image_user=config.get("User", ""),
                roots={CA_BUNDLE_CONTAINER: bundle_root, "app": app_root, KEY_READER: reader_root},
                provided=provided,
            )
            # the kubelet's order for what this test needs: the bundle step, then the app
            bundle = runner.run(CA_BUNDLE_CONTAINER)
            app = runner.run("app")
            assert app.returncode == 0, app.stderr
            key_reader = runner.run(KEY_READER)
            yield Pod(spec, bundle, json.loads(app.stdout), key_reader, ca, with_secret)
            w.pod.kill_all()
    finally:
        api.stop()


@pytest.fixture(scope="module", params=[True, False], ids=["secret", "no-secret"])
def pod(request: pytest.FixtureRequest, reaped: list[str]) -> Iterator[Pod]:
    w = h.create_world()
    try:
        yield from _run_pod(w, bool(request.param))
    finally:
        w.close()


def test_the_bundle_step_runs_from_the_image_as_1337_with_the_images_roots(pod: Pod) -> None:
    assert pod.bundle.returncode == 0, pod.bundle.stdout + pod.bundle.stderr
    # the image's own roots (its ca-certificates package), then the CA when it is there
    assert "system roots from /etc/ssl/certs/ca-certificates.crt" in pod.bundle.stderr, (
        pod.bundle.stderr
    )
    if pod.with_secret:
        assert "+ the egress CA (CN=egress-sidecar inspection CA (shop))" in pod.bundle.stderr
    else:
        assert "warning:" in pod.bundle.stderr and "+ no egress CA" in pod.bundle.stderr


def test_the_app_trusts_the_egress_ca_through_the_injected_variables(pod: Pod) -> None:
    env = pod.app["env"]
    assert env["SSL_CERT_FILE"] == "/etc/egress-sidecar/ca-bundle/ca-certificates.crt"
    assert env["NODE_EXTRA_CA_CERTS"] == "/etc/egress-sidecar/ca-cert/ca.crt"
    if pod.with_secret:
        assert pod.app.get("status") == 200, pod.app
    else:
        # no Secret: the pod started, and the app refuses what the CA would have signed
        assert "CERTIFICATE_VERIFY_FAILED" in pod.app["error"], pod.app


def test_no_key_anywhere_in_the_app_container(pod: Pod) -> None:
    assert pod.app["keys"] == []
    assert pod.app["sidecar_dir"] is False


def test_the_sidecars_mounts_and_user_read_the_key(pod: Pod) -> None:
    if not pod.with_secret:
        # no Secret: an empty directory, the sidecar's "inspection CA not available"
        assert "No such file" in pod.key_reader.stderr
        return
    assert pod.key_reader.returncode == 0, pod.key_reader.stderr
    listing, first = pod.key_reader.stdout.splitlines()
    assert json.loads(listing.replace("'", '"')) == ["ca.crt", "tls.crt", "tls.key"]
    assert first == "-----BEGIN PRIVATE KEY-----"
    assert pod.ca.key_pem.startswith(first.encode())
