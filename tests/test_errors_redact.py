"""Credentials inside URLs never reach an error's message, str, repr or to_dict()."""

import pytest

from gpubridge.errors import ProviderUnavailable, WorkflowInputError, redact_url, scrub


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pass@host:8000/v1", "http://***@host:8000/v1"),
        ("https://token@api.example/x", "https://***@api.example/x"),
        ("http://host/path?email=a@b.c", "http://host/path?email=a@b.c"),
        ("http://host:8188", "http://host:8188"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_error_messages_scrub_url_credentials():
    exc = ProviderUnavailable("Cannot reach the Modal job API at http://alice:hunter2@10.0.0.1:8000 (refused)")
    for text in (str(exc), repr(exc), exc.to_dict()["message"]):
        assert "hunter2" not in text and "alice" not in text
        assert "http://***@10.0.0.1:8000" in text


def test_scrub_leaves_plain_text():
    assert scrub("no url here, a@b") == "no url here, a@b"
    assert str(WorkflowInputError("x")) == "x"
