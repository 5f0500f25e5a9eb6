"""`gen1.urls`: URLs redacted for logs and records, and which hosts count as this machine (issue 17, item 6)."""

from __future__ import annotations

import pytest

from gen1.urls import is_loopback, redact_url, with_path_suffix


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass@host:8000/v1?token=x&a=1", "https://***@host:8000/v1?token=***&a=***"),
        ("http://token@host/path", "http://***@host/path"),
        ("https://host/p#secret", "https://host/p#***"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),  # the empty authority survives
        ("s3://bucket/key?versionId=3", "s3://bucket/key?versionId=***"),
        ("/local/path", "/local/path"),
        ("databricks", "databricks"),
    ],
)
def test_redact_url_hides_userinfo_query_values_and_fragment(url, shown):
    assert redact_url(url) == shown


def test_a_malformed_url_is_redacted_to_its_scheme():
    assert redact_url("http://user:pw@[::1/x") == "http://***"


@pytest.mark.parametrize(
    ("url", "loopback"),
    [("http://127.0.0.1:8000/v1", True), ("http://127.9.9.9/", True), ("http://localhost/v1", True),
     ("http://LOCALHOST:1", True), ("http://[::1]:8000", True), ("http://10.0.0.1/", False),
     ("http://localhost.example.com/", False), ("http://[fe80::1]/", False), ("not a url", False)],
)
def test_is_loopback(url, loopback):
    assert is_loopback(url) is loopback


def test_with_path_suffix_keeps_the_query_last():
    assert with_path_suffix("https://h/v1/?api-version=2", "/chat/completions") == (
        "https://h/v1/chat/completions?api-version=2"
    )
    assert with_path_suffix("https://h/v1", "/chat/completions") == "https://h/v1/chat/completions"
