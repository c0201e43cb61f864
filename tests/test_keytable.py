"""The receiver's compact key table (gateway.keytable): a dict of id -> key in behaviour,
a bytearray in memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gateway.keytable as keytable
from gateway.keytable import KeyTable

ids = st.text(st.sampled_from("abcdefghij-._0123456789"), min_size=1, max_size=20)
keys = st.binary(min_size=32, max_size=32)


@given(st.lists(st.tuples(ids, keys), max_size=300), st.lists(ids, max_size=20))
def test_the_table_answers_like_a_dict(pairs: list[tuple[str, bytes]], others: list[str]) -> None:
    table, expected = KeyTable(capacity=4), dict(pairs)  # tiny: it grows many times
    for device, key in pairs:
        table.add(device, key)
    assert len(table) == len(expected)
    for device, key in expected.items():
        assert table.get(device) == key
    for device in others:
        assert table.get(device) == expected.get(device)


def test_a_key_is_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        KeyTable().add("d", b"short")


def test_colliding_ids_share_a_slot_and_a_lookup_finds_one_of_their_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What gateway.ingest.verify must tolerate: with equal hashes, ids look alike."""
    monkeypatch.setattr(keytable, "_hash", lambda device: 7)
    table = KeyTable([("alice", b"a" * 32)])
    table.add("mallory", b"m" * 32)  # same hash: replaces alice's
    assert len(table) == 1
    assert table.get("alice") == b"m" * 32
    assert table.get("anyone") == b"m" * 32


def test_a_large_table_costs_far_less_than_a_dict() -> None:
    table = KeyTable((f"dev-{i:06d}", bytes(32)) for i in range(100_000))
    assert table.get("dev-099999") == bytes(32)
    assert table.get("dev-100000") is None
    assert len(table._table[0]) <= 40 * 131_072  # 52 B a device; a dict: about 190
