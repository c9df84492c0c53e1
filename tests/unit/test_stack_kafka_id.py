"""The local Kafka's cluster id never starts with '-' (kafka-storage would read it as an option)."""
from __future__ import annotations

import base64
import uuid

import pytest

from stack.services import kafka


def test_a_cluster_id_that_would_start_with_a_dash_is_drawn_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dash = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64url of 0xf8.. starts with '-'
    assert base64.urlsafe_b64encode(dash.bytes).decode().startswith("-")
    plain = uuid.UUID(bytes=b"\x10" + bytes(15))
    draws = iter([dash, dash, plain])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(draws))
    cid = kafka.new_cluster_id()
    assert cid == base64.urlsafe_b64encode(plain.bytes).rstrip(b"=").decode()
    assert len(cid) == 22 and not cid.startswith("-")
