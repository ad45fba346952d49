"""Shared fixtures: a test CA, upstream servers on loopback, OTLP receivers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.otlp import OtlpGrpcReceiver, OtlpHttpReceiver
from tests.support.tls import TestCA


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="session")
def ca_file(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(test_ca.cert_pem)
    return path


@pytest.fixture(scope="module")
def otlp_http() -> Iterator[OtlpHttpReceiver]:
    receiver = OtlpHttpReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def otlp_grpc() -> Iterator[OtlpGrpcReceiver]:
    receiver = OtlpGrpcReceiver()
    yield receiver
    receiver.stop()
