"""Records: a mapping that keeps records packed and the recently used ones unpacked
behaves exactly like a dict, whatever is packed when; reading a record and dropping it
again never packs it; peek and each change nothing."""

from __future__ import annotations

import sys
import threading

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.records import Records

Record = tuple[str, int]


class Counted:
    """pack/unpack for ``(key, number)`` records, counting calls."""

    def __init__(self) -> None:
        self.packs = 0
        self.unpacks = 0

    def pack(self, record: Record) -> bytes:
        self.packs += 1
        packed: bytes = msgpack.packb(record[1])
        return packed

    def unpack(self, key: str, data: bytes) -> Record:
        self.unpacks += 1
        return (key, msgpack.unpackb(data))


def records(limit: int = 2) -> tuple[Records[Record], Counted]:
    counted = Counted()
    return Records(counted.pack, counted.unpack, hot_limit=limit), counted


KEYS = st.sampled_from([f"d{i}" for i in range(12)])


class LikeADict(RuleBasedStateMachine):
    """Any sequence of writes, reads, deletions and loads leaves Records equal to a dict
    given the same sequence (with so few records kept unpacked that most are packed)."""

    def __init__(self) -> None:
        super().__init__()
        self.records, _ = records(limit=3)
        self.model: dict[str, Record] = {}

    @rule(key=KEYS, number=st.integers(-(2**63), 2**64 - 1))
    def write(self, key: str, number: int) -> None:
        self.records[key] = (key, number)
        self.model[key] = (key, number)

    @rule(key=KEYS, number=st.integers(0, 1000))
    def put(self, key: str, number: int) -> None:
        self.records.put(key, (key, number), msgpack.packb(number))
        self.model[key] = (key, number)

    @rule(key=KEYS)
    def read(self, key: str) -> None:
        assert self.records.get(key) == self.model.get(key)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        if key in self.model:
            del self.records[key]
            del self.model[key]
        else:
            try:
                del self.records[key]
            except KeyError:
                pass
            else:
                raise AssertionError("deleted a record that was not there")

    @rule(key=KEYS)
    def peek(self, key: str) -> None:
        expected = self.model.get(key)
        assert self.records.peek(key, msgpack.unpackb, lambda r: r[1]) == (
            None if expected is None else expected[1]
        )

    @rule(numbers=st.dictionaries(KEYS, st.integers(0, 1000), max_size=6))
    def load(self, numbers: dict[str, int]) -> None:
        self.records.load({k: msgpack.packb(n) for k, n in numbers.items()})
        self.model = {k: (k, n) for k, n in numbers.items()}

    @invariant()
    def same_content(self) -> None:
        assert len(self.records) == len(self.model)
        assert sorted(self.records) == sorted(self.model)
        assert dict(self.records.each(msgpack.unpackb, lambda r: r[1])) == {
            k: n for k, (_, n) in self.model.items()
        }


TestLikeADict = LikeADict.TestCase
TestLikeADict.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_a_record_read_and_left_unchanged_is_never_packed_again() -> None:
    recs, counted = records(limit=4)
    recs.load({f"d{i}": msgpack.packb(i) for i in range(100)})
    for i in range(100):
        assert recs[f"d{i}"] == (f"d{i}", i)
    assert counted.unpacks == 100
    assert counted.packs == 0  # dropped from the unpacked ones, their packed form kept


def test_a_changed_record_is_packed_once_when_it_leaves_the_unpacked_ones() -> None:
    recs, counted = records(limit=4)
    recs["a"] = ("a", 1)
    recs["a"] = ("a", 2)
    assert counted.packs == 0  # still unpacked
    for i in range(8):
        recs[f"other{i}"] = (f"other{i}", i)
    assert counted.packs >= 1
    assert recs["a"] == ("a", 2)
    assert len(recs) == 9


def test_a_busy_record_is_unpacked_once_while_it_stays_in_use() -> None:
    recs, counted = records(limit=4)
    recs.load({"busy": msgpack.packb(7)})
    for _ in range(50):
        assert recs["busy"] == ("busy", 7)
    assert counted.unpacks == 1


def test_peek_and_each_unpack_nothing_and_change_nothing() -> None:
    recs, counted = records(limit=4)
    recs.load({f"d{i}": msgpack.packb(i) for i in range(10)})
    recs["new"] = ("new", 99)
    assert recs.peek("d3", msgpack.unpackb, lambda r: r[1]) == 3
    assert recs.peek("new", msgpack.unpackb, lambda r: r[1]) == 99
    assert recs.peek("none", msgpack.unpackb, lambda r: r[1]) is None
    summary = dict(recs.each(msgpack.unpackb, lambda r: r[1]))
    assert summary == {**{f"d{i}": i for i in range(10)}, "new": 99}
    assert (counted.unpacks, counted.packs) == (0, 0)


@given(st.lists(st.tuples(KEYS, st.integers(0, 9)), max_size=60))
def test_iteration_runs_over_the_keys_as_they_were_when_it_began(
    writes: list[tuple[str, int]],
) -> None:
    recs, _ = records(limit=2)
    for key, number in writes:
        recs[key] = (key, number)
    seen = []
    for key in recs:  # writing while iterating, as a dict would not allow
        seen.append(key)
        recs[key] = (key, -1)
        recs["extra"] = ("extra", 0)
    assert sorted(seen) == sorted({k for k, _ in writes})


def test_a_reader_on_another_thread_never_misses_a_record_that_is_moving() -> None:
    """Verification threads peek while the event loop writes: a record moves between the
    packed and the unpacked ones all the time here, and must be found every time."""
    recs, _ = records(limit=4)
    keys = [f"d{i}" for i in range(50)]
    recs.load({key: msgpack.packb(0) for key in keys})
    done = threading.Event()
    misses: list[str] = []

    def reader() -> None:
        while not done.is_set():
            for key in keys:
                if recs.peek(key, msgpack.unpackb, lambda r: r[1]) is None:
                    misses.append(key)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns between almost any two bytecodes
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(20_000):
            key = keys[step % len(keys)]
            recs[key] = (key, step)
            _ = recs[keys[(step * 7) % len(keys)]]
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert misses == []  # without the lock in Records, some are missed every run


def test_a_record_put_with_its_packed_form_is_not_packed_again() -> None:
    recs, counted = records(limit=4)
    recs.put("a", ("a", 5), msgpack.packb(5))
    for i in range(8):
        recs.put(f"other{i}", (f"other{i}", i), msgpack.packb(i))
    assert counted.packs == 0  # each kept its packed form as it left the unpacked ones
    assert recs["a"] == ("a", 5)
    assert counted.unpacks == 1
    assert len(recs) == 9
