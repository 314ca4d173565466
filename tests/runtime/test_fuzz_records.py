"""Fuzz of the raw-record path: nothing a Kafka record holds escapes as an exception.

`decode` raises `Invalid` (with a known error type) and nothing else; `Router.process`
finishes every record of a batch exactly once, through its handler or to the DLQ, with a
dead letter that parses and fits one Kafka message, and a `rejected` TuneStatus answer for a
tune request that does not decode.

Hypothesis generates the records, several per example, so the fuzz covers more than
10,000 records in seconds. Records of a megabyte or two are a fixed list instead: one per
generated example would take minutes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta, timezone
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from conftest import TECHLEAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ings_daemon.config import Settings
from ings_daemon.contract.erasure import AdapterRetired, ForgetRequest
from ings_daemon.contract.events import (
    AdapterReady,
    DeadLetter,
    Handshake,
    Interaction,
    RecallRequest,
    TrainJob,
    TuneRequest,
    TuneStatus,
)
from ings_daemon.contract.feedback import Feedback
from ings_daemon.contract.ids import DID_RE
from ings_daemon.ingest.tune import TuneRequests
from ings_daemon.runtime.deadletters import ENVELOPE_BYTES, ERROR_TYPES, KEY_CHARS, original_value
from ings_daemon.runtime.decode import Incoming, Invalid, decode, json_object
from ings_daemon.runtime.kafka import EventTooLarge, Producer, Publish, Record, Unreadable
from ings_daemon.runtime.router import Outcome, Route, Router

MAX_EVENT_BYTES = 1_000_000  # INGS_MAX_EVENT_BYTES's default
MAX_MESSAGE_BYTES = 1_048_576  # KAFKA_MAX_MESSAGE_BYTES's default
# The largest value a dead letter still carries whole (deadletters.letter_for's `room`).
LETTER_ROOM = (MAX_MESSAGE_BYTES - ENVELOPE_BYTES) * 3 // 4
MIN_RECORDS = 10_000

SETTINGS = Settings()
TOPICS = SETTINGS.topics
ECHO_TOPIC = "fuzz.echo"
INGEST_MODELS: dict[str, type[BaseModel]] = {
    TOPICS.handshake: Handshake,
    TOPICS.interaction: Interaction,
    TOPICS.tune_request: TuneRequest,
    TOPICS.recall_request: RecallRequest,
    TOPICS.forget: ForgetRequest,
    TOPICS.feedback: Feedback,
}
# The serving role's inputs too: the daemon reads the adapter events another instance wrote.
ALL_MODELS: tuple[type[BaseModel], ...] = (
    *(Handshake, Interaction, TuneRequest, RecallRequest, ForgetRequest, Feedback, TrainJob),
    *(AdapterReady, AdapterRetired),
)

# Records seen by each property, checked at the end of its test.
SEEN: Counter[str] = Counter()
DECODE_KINDS = ("empty", "not_json", "too_deep", "invalid_unicode", "not_object", "invalid_did", "invalid_event")
# Malformed JSON nested some hundreds deep (b"[" * 950) is `too_deep` when json.loads runs
# out of stack before it reaches the error, `not_json` when it does not: which one depends
# on how deep the caller's stack already is, so the router (under asyncio and tenacity) and
# a direct call can disagree.
DEPTH_DEPENDENT = {"not_json", "too_deep"}
# How each decode ended: "decoded" or the error type (each branch must be exercised).
KINDS: Counter[str] = Counter()


@dataclass(eq=False)
class Rec:
    """A consumer record as the router reads it (compared by identity)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class FetchError:
    """Stands for an offset whose batch could not be fetched (an `Unreadable`)."""

    reason: str


Value = bytes | None
Spec = Value | FetchError


# --- strategies: JSON, events --------------------------------------------------------------

LOWER = "abcdefghijklmnopqrstuvwxyz"
# DIDs built from parts (st.from_regex(DID_PATTERN) is several times slower).
dids = st.one_of(
    st.just(TECHLEAD),
    st.builds(
        "did:nings:artificial:llm:{}:v{}:{}".format,
        st.text(LOWER + "0123456789_-", min_size=0, max_size=8).map(lambda rest: "t" + rest),
        st.sampled_from(["1", "2.0", "10.4.1", "0.0.0.1"]),
        st.text(LOWER + "0123456789", min_size=6, max_size=12),
    ),
)
texts = st.text(min_size=1, max_size=24)
shorts = st.text(max_size=16)
keys = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["__class__", "__dict__", "model_config", "_private", "persona", "event_id", "metadata"]),
)
ints = st.integers(min_value=-(2**80), max_value=2**80)
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=16))
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=10,
)
meta_values = st.one_of(st.text(max_size=16), ints, floats, st.booleans())
timestamps = st.datetimes(
    timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11))])
).map(lambda d: d.isoformat())

interactions = st.fixed_dictionaries(
    {"persona_id": dids, "input": texts, "output": texts},
    optional={
        "event_id": shorts,
        "session_id": shorts,
        "mode": shorts,
        "occurred_at": timestamps,
        "metadata": st.dictionaries(keys, json_values, max_size=3),
    },
)
# The origin's names, wrapped as its records are (other wrapper keys ignored).
origin_interactions = st.fixed_dictionaries(
    {"persona_id": dids, "message": texts, "response": texts},
    optional={"timestamp": timestamps, "metadata": st.dictionaries(keys, json_values, max_size=3)},
).flatmap(lambda inner: st.sampled_from([inner, {"version": "2.0", "interaction": inner, "protocol": "INGS"}]))
personas = st.fixed_dictionaries(
    {"name": texts},
    optional={
        "persona_id": dids,
        "model_type": shorts,
        "default_mode": shorts,
        "description": shorts,
        "metadata": st.dictionaries(keys, json_values, max_size=3),
    },
)
# Unknown top-level keys of a persona document are kept, so `guide` is valid.
handshakes = st.fixed_dictionaries(
    {"persona": personas}, optional={"event_id": shorts, "version": shorts, "guide": json_values}
)
loras = st.fixed_dictionaries(
    {},
    optional={
        "model_name": texts,
        "rank": st.integers(1, 256),
        "alpha": st.floats(0.5, 4096),
        "dropout": st.floats(0, 0.99),
        "target_modules": st.lists(st.text(LOWER + "_.0123456789", min_size=1, max_size=12), max_size=3),
        "epochs": st.integers(1, 100),
        "learning_rate": st.floats(1e-6, 1),
        "max_seq_len": st.integers(16, 8192),
    },
)
tune_requests = st.fixed_dictionaries(
    {"persona_id": dids},
    optional={
        "training_data": st.lists(st.fixed_dictionaries({"input": texts, "output": texts}), max_size=3),
        "lora_config": loras,
        "include_memory": st.booleans(),
        "event_id": shorts,
        "request_id": shorts,
    },
)
recall_requests = st.fixed_dictionaries(
    {"persona_id": dids, "query": texts, "request_id": shorts},
    optional={"k": st.integers(1, 100), "event_id": shorts},
)
forgets = st.one_of(
    st.fixed_dictionaries({"request_id": shorts, "persona_id": dids, "scope": st.just("persona")}),
    st.fixed_dictionaries(
        {"request_id": shorts, "persona_id": dids, "scope": st.just("session"), "session_id": shorts}
    ),
    st.fixed_dictionaries(
        {"request_id": shorts, "persona_id": dids, "scope": st.just("events"), "event_ids": st.lists(texts, min_size=1)}
    ),
    # Fields the scope does not take, or none it needs: invalid.
    st.fixed_dictionaries(
        {"request_id": shorts, "persona_id": dids, "scope": st.sampled_from(["persona", "session", "events", "all"])},
        optional={"session_id": shorts, "event_ids": st.lists(texts, max_size=2)},
    ),
)
feedbacks = st.fixed_dictionaries(
    {
        "persona_id": dids,
        "rating": st.one_of(st.sampled_from(["up", "down", "meh"]), st.integers(-1, 7), floats, st.booleans()),
    },
    # None, one or several of the three ways to name the exchange: exactly one is valid.
    optional={
        "interaction_event_id": shorts,
        "completion_id": shorts,
        "memory_id": st.one_of(st.binary(min_size=16, max_size=16).map(bytes.hex), shorts),
        "correction": st.one_of(st.none(), texts, st.just("")),
        "comment": st.one_of(st.none(), st.text(max_size=30)),
        "request_id": shorts,
        "event_id": shorts,
    },
)
train_jobs = st.fixed_dictionaries(
    {
        "job_id": shorts,
        "persona_id": dids,
        "trigger": shorts,
        "base_model": shorts,
        "lora": loras,
        "examples": st.fixed_dictionaries(
            {
                "collection": st.sampled_from(["memory", "examples"]),
                "ids": st.lists(st.text(min_size=1, max_size=64), max_size=3),
                "sha256": st.binary(min_size=32, max_size=32).map(bytes.hex),
            }
        ),
        "created_at": timestamps,
    }
)
events: st.SearchStrategy[dict[str, Any]] = st.one_of(
    interactions, origin_interactions, handshakes, tune_requests, recall_requests, forgets, feedbacks, train_jobs
)


def dumps(obj: Any, ascii_only: bool = False) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode()


def dict_nodes(obj: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in `obj`, itself first."""
    if isinstance(obj, dict):
        yield obj
        for child in obj.values():
            yield from dict_nodes(child)
    elif isinstance(obj, list):
        for child in obj:
            yield from dict_nodes(child)


MARK = "@@fuzz-marker@@"


@st.composite
def marked(draw: st.DrawFn, raw: st.SearchStrategy[bytes]) -> bytes:
    """An event with `raw` JSON text spliced in as a key or as the value of a field (a known
    one, replacing it, or an unknown one), at the top level or in a nested object."""
    obj = draw(events)
    node = draw(st.sampled_from(list(dict_nodes(obj))))
    if draw(st.booleans()):
        node[MARK] = draw(json_values)  # `raw` is the key: it must be a JSON string then
    else:
        node[draw(st.sampled_from([*node, draw(keys)]))] = MARK
    return dumps(obj, draw(st.booleans())).replace(dumps(MARK), draw(raw))


@st.composite
def retyped(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]], fields: list[str]) -> bytes:
    """An event with one field (of `fields`, or one it has, at any depth) set to any JSON."""
    obj = draw(base)
    node = draw(st.sampled_from(list(dict_nodes(obj))))
    name = draw(st.sampled_from(fields)) if node is obj and fields else draw(st.sampled_from([*node, "x"]))
    node[name] = draw(json_values)
    return dumps(obj, draw(st.booleans()))


@st.composite
def duplicated(draw: st.DrawFn) -> bytes:
    """An event with one of its keys written twice (the second time maybe escaped)."""
    obj = draw(events)
    name = draw(st.sampled_from(list(obj)))
    spelled = draw(st.sampled_from([json.dumps(name), json.dumps(name, ensure_ascii=False)]))
    if name and draw(st.booleans()):
        spelled = '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in name) + '"'
    text = json.dumps(obj)
    return (text[:-1] + f", {spelled}: {json.dumps(draw(json_values))}}}").encode()


def nest(shape: str, n: int) -> bytes:
    return {
        "list": "[" * n + "]" * n,
        "object": '{"a":' * n + "null" + "}" * n,
        "mixed": '[{"k":' * n + "1" + "}]" * n,
        "unclosed": "[" * n,
    }[shape].encode()


depths = st.one_of(st.integers(0, 40), st.integers(980, 1020), st.integers(0, 5000))
nestings = st.builds(nest, st.sampled_from(["list", "object", "mixed", "unclosed"]), depths)
surrogates = st.sampled_from(
    [
        rb'"\udce3"',
        rb'"\ud800"',
        rb'"\uDFFF"',
        rb'"x\udbff"',
        rb'"\ude00\ud83d"',
        rb'"a\ud83d\ude00b"',  # a valid pair: an emoji, no error
        b'"\xed\xb3\xa3"',  # a surrogate encoded as UTF-8 bytes (CESU-8): not UTF-8
        b'"\xed\xa0\x80x"',
    ]
)
numbers = st.one_of(
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"-NaN", b"1e400", b"-1E999999999", b"1e-400", b"-0"]),
    st.builds(lambda n: b"1" + b"0" * n, st.integers(4200, 5100)),
    st.builds(lambda n: b"-" + b"9" * n + b".5", st.integers(4200, 5100)),
    st.builds(lambda n: b"0." + b"1" * n, st.integers(4200, 5100)),
)


@st.composite
def long_texts(draw: st.DrawFn) -> bytes:
    """An event with one field a long string, around the 16,000-character limit of Text."""
    obj = draw(st.one_of(interactions, handshakes, recall_requests))
    n = draw(st.one_of(st.sampled_from([15_999, 16_000, 16_001, 8_000, 8_001]), st.integers(0, 40_000)))
    text = draw(st.sampled_from(["x", "é", "\U0001f600", "\x01", " ", '"'])) * n
    node = obj.get("persona", obj)
    field = draw(st.sampled_from([k for k, v in node.items() if isinstance(v, str)] + ["metadata"]))
    node[field] = {"long": text} if field == "metadata" else text
    return dumps(obj, draw(st.booleans()))


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """A valid event, as most producers write it, or with a BOM, spaces, or in UTF-16."""
    text = json.dumps(draw(events), ensure_ascii=draw(st.booleans()))
    frame = draw(st.sampled_from(["plain", "plain", "plain", "bom", "spaces", "utf-16"]))
    if frame == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if frame == "spaces":
        return f" \n\t{text}\r\n ".encode()
    return text.encode("utf-16" if frame == "utf-16" else "utf-8")


LITERALS = [
    b"",
    b" ",
    b"null",
    b"true",
    b"0",
    b'"x"',
    b"[]",
    b"{}",
    b"{",
    b"}",
    b'{"a":1,"a":2}',
    b'{"a":1,"\\u0061":2}',
    b'{"a":{"b":1,"b":1}}',
    b'{"x": NaN}',
    b'{"x": [Infinity]}',
    b"\xef\xbb\xbf{}",
    b"\xff\xfe{\x00}\x00",
    b"\x00",
    b"\xc3\x28",
    b'{"persona_id": "' + TECHLEAD.encode() + b'", "input": "a", "output": "b"} trailing',
]

# Hypothesis favours the first branches: valid events first, so that many records are
# processed, not dead-lettered.
raw_values: st.SearchStrategy[Value] = st.one_of(
    framed(),
    framed(),
    st.binary(max_size=48),
    st.text(max_size=32).map(str.encode),
    st.sampled_from(LITERALS),
    st.builds(dumps, json_values, st.booleans()),
    nestings,
    marked(surrogates),
    marked(numbers),
    marked(nestings),
    duplicated(),
    retyped(interactions, sorted(Interaction.model_fields)),
    retyped(events, []),
    long_texts(),
    st.none(),
)
specs: st.SearchStrategy[Spec] = st.one_of(
    raw_values, st.builds(FetchError, st.sampled_from(["CorruptRecordException: crc", "decompression failed"]))
)
record_keys = st.one_of(st.none(), st.binary(max_size=16), dids.map(str.encode))


@st.composite
def batches(draw: st.DrawFn) -> list[Record]:
    """A batch of records: each generated value is sent to every ingest topic (so it is
    tried as each kind of event), on one of three partitions, offsets in order."""
    offsets: Counter[tuple[str, int]] = Counter()
    records: list[Record] = []
    for _ in range(draw(st.integers(min_value=6, max_value=8))):
        spec, key, partition = draw(specs), draw(record_keys), draw(st.integers(0, 2))
        for topic in INGEST_MODELS:
            offset = offsets[topic, partition]
            offsets[topic, partition] += 1
            if isinstance(spec, FetchError):
                records.append(Unreadable(topic, partition, offset, spec.reason))
            else:
                records.append(Rec(topic, partition, offset, key, spec))
    return records


# --- the router under test, with a recording producer -------------------------------------


class FakeProducer:
    """Records what the router publishes, encoded as the real producer encodes it, and
    notes (never raises: the router retries a dead letter forever) what would not do."""

    max_bytes = MAX_MESSAGE_BYTES

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.problems: list[str] = []

    async def publish(self, items: list[Publish]) -> None:
        for item in items:
            try:
                key, value = Producer.encode(cast(Producer, self), item)
                if value is None:
                    raise ValueError("a tombstone: nothing here publishes one")
                value.decode("utf-8")
                json.loads(value, parse_constant=_no_constant)
            except (EventTooLarge, ValueError) as exc:
                self.problems.append(f"{item.topic}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            self.sent.append((item.topic, key, value))

    def on(self, topic: str) -> list[tuple[bytes | None, bytes]]:
        return [(key, value) for t, key, value in self.sent if t == topic]


def _no_constant(name: str) -> Any:
    raise ValueError(f"published JSON holds {name}")


def persona_of(event: BaseModel) -> str | None:
    if isinstance(event, Handshake):
        return event.persona.persona_id
    return cast(str | None, getattr(event, "persona_id", None))


class Echo:
    """A handler that keeps what it is given and answers one small event per item (or
    nothing), keyed by the persona, carrying the item's event id."""

    def __init__(self, publish: bool) -> None:
        self.publish = publish
        self.seen: list[Incoming[Any]] = []

    async def __call__(self, items: list[Incoming[Any]]) -> Outcome:
        self.seen += items
        if not self.publish:
            return Outcome()
        answers = [(persona_of(item.event), item.event_id) for item in items]
        return Outcome(
            publish=[
                Publish(ECHO_TOPIC, pid, TuneStatus(persona_id=pid, request_id=eid, status="accepted"))
                for pid, eid in answers
            ]
        )


def check_decode(record: Record, model: type[BaseModel]) -> Incoming[Any] | Invalid:
    """Property A: an Incoming with a UTF-8 event id, or Invalid with a known kind."""
    try:
        incoming = decode(record, model, MAX_EVENT_BYTES)
    except Invalid as exc:
        assert exc.kind in ERROR_TYPES, f"{model.__name__}: unknown error type {exc.kind!r} ({exc})"
        KINDS[exc.kind] += 1
        str(exc).encode()  # the reason goes into a dead letter
        return exc
    assert isinstance(incoming.event, model)
    assert isinstance(incoming.payload, dict)
    incoming.event_id.encode()
    KINDS["decoded"] += 1
    return incoming


def run_router(records: list[Record]) -> None:
    """Property B: process `records` as one batch and check that each one ends processed
    or dead-lettered, exactly once, and that everything published is sound."""
    producer = FakeProducer()
    tune = TuneRequests(SETTINGS, cast(Any, None), cast(Any, None), cast(Any, None))
    handlers = {topic: Echo(publish=topic != TOPICS.recall_request) for topic in INGEST_MODELS}
    routes: dict[str, Route[Any]] = {
        topic: Route(model, handlers[topic], tune.on_invalid if topic == TOPICS.tune_request else None)
        for topic, model in INGEST_MODELS.items()
    }
    router = Router(routes, cast(Producer, producer), TOPICS.dlq, MAX_EVENT_BYTES, retry_max_s=0.05)
    batch: dict[Any, list[Record]] = {}
    for record in records:
        batch.setdefault(TopicPartition(record.topic, record.partition), []).append(record)

    # What decode says of each record, in the order the router meets them: it must agree.
    accepted: dict[int, Record] = {}
    rejected: dict[tuple[str, int, int], tuple[Record, str]] = {}
    for record in (r for part in batch.values() for r in part):
        if isinstance(record, Unreadable):
            rejected[record.topic, record.partition, record.offset] = (record, "fetch_error")
            continue
        result = check_decode(record, INGEST_MODELS[record.topic])
        if isinstance(result, Invalid):
            rejected[record.topic, record.partition, record.offset] = (record, result.kind)
        else:
            accepted[id(record)] = record

    finished, deferred = asyncio.run(router.process(batch))

    assert deferred == []
    assert sorted(Counter(id(r) for r in finished).values()) == [1] * len(records)
    assert {id(r) for r in finished} == {id(r) for r in records}
    assert producer.problems == []
    handled = [item.record for echo in handlers.values() for item in echo.seen]
    assert sorted(id(r) for r in handled) == sorted(accepted)

    letters = [(key, DeadLetter.model_validate_json(value)) for key, value in producer.on(TOPICS.dlq)]
    assert len(letters) == len(rejected)
    for key, letter in letters:
        record, kind = rejected[letter.topic, letter.partition, letter.offset]
        assert letter.error_type == kind or {letter.error_type, kind} == DEPTH_DEPENDENT, (letter, kind)
        value = record.value
        assert letter.value_size == len(value or b"")
        if not letter.value_truncated:
            assert original_value(letter) == value
        # The record's key as text, whitespace and all (cut to KEY_CHARS).
        if record.key is None:
            assert letter.key is None
        else:
            assert letter.key == record.key.decode("utf-8", "replace")[:KEY_CHARS]
        assert key == (letter.key.encode() if letter.key else None)

    # Every tune request that did not decode is answered `rejected`, with its clean fields.
    bad_tunes = [r for r, kind in rejected.values() if r.topic == TOPICS.tune_request and kind != "fetch_error"]
    answers = [TuneStatus.model_validate_json(value) for _, value in producer.on(TOPICS.tune_status)]
    assert len(answers) == len(bad_tunes)
    for record, answer in zip(bad_tunes, answers, strict=True):
        assert answer.status == "rejected"
        assert answer.reason
        payload = json_object(record.value) or {}
        pid = payload.get("persona_id")
        assert answer.persona_id == (pid if isinstance(pid, str) and DID_RE.fullmatch(pid) else None)

    echoed = [TuneStatus.model_validate_json(value) for _, value in producer.on(ECHO_TOPIC)]
    assert len(echoed) == sum(1 for r in accepted.values() if r.topic != TOPICS.recall_request)
    SEEN["router"] += len(records)


# --- the tests ----------------------------------------------------------------------------

FUZZ = settings(
    max_examples=450,
    deadline=None,
    database=None,  # nothing written to the working tree; a failure prints its blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """Each dead letter logs a warning; 10,000 of them only cost time here."""
    logger = logging.getLogger("ings")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def test_decode_raises_only_invalid() -> None:
    @FUZZ
    @given(st.lists(raw_values, min_size=23, max_size=32))
    def fuzz(values: list[Value]) -> None:
        for value in values:
            record = Rec(TOPICS.interaction, 0, 0, None, value)
            for model in ALL_MODELS:
                check_decode(record, model)
            json_object(value)  # the rejection hook's view of the value: never raises
        SEEN["decode"] += len(values)

    before = SEEN["decode"]
    KINDS.clear()
    fuzz()
    assert SEEN["decode"] - before >= MIN_RECORDS
    # Every branch of decode was taken (too_large: see test_huge_records).
    assert set(KINDS) >= {"decoded", *DECODE_KINDS}, KINDS


# The router's tenacity call warns on every retrying(); thousands of warnings only cost time.


def test_router_processes_or_dead_letters_every_record(quiet_logs: None) -> None:
    @FUZZ
    @given(batches())
    def fuzz(records: list[Record]) -> None:
        run_router(records)

    before = SEEN["router"]
    KINDS.clear()
    fuzz()
    assert SEEN["router"] - before >= MIN_RECORDS
    assert set(KINDS) >= {"decoded", *DECODE_KINDS}, KINDS


SURROGATE_CASES = [
    (TOPICS.handshake, {"persona": {"name": "n"}, MARK: "v"}),  # an unknown top-level key
    (TOPICS.handshake, {"persona": {"name": "n"}, "extra": MARK}),  # its value
    (TOPICS.handshake, {"persona": {"name": "n", "metadata": {"k": MARK}}}),
    (TOPICS.handshake, {"persona": {"name": "n", "metadata": {MARK: 1}}}),
    (TOPICS.handshake, {"persona": {"name": "n", "metadata": {"a": [{"b": MARK}]}}}),
    (TOPICS.tune_request, {"persona_id": TECHLEAD, "request_id": MARK}),
    (TOPICS.tune_request, {"persona_id": TECHLEAD, "request_id": "r1", "training_data": [{"input": MARK}]}),
    (TOPICS.interaction, {"persona_id": TECHLEAD, "input": MARK, "output": "b"}),
    (TOPICS.interaction, {"persona_id": TECHLEAD, "input": "a", "output": "b", "metadata": {MARK: 1}}),
    (TOPICS.recall_request, {"persona_id": TECHLEAD, "query": "q", "request_id": MARK}),
]


@pytest.mark.parametrize(
    ("escape", "kind"),
    [
        (rb'"\udce3"', "invalid_unicode"),
        (rb'"ok\ud800"', "invalid_unicode"),
        # The surrogate's raw bytes (CESU-8) are not UTF-8 at all.
        (b'"\xed\xb3\xa3"', "not_json"),
    ],
)
def test_lone_surrogates_in_known_places(escape: bytes, kind: str, quiet_logs: None) -> None:
    records: list[Record] = [
        Rec(topic, 0, offset, None, dumps(obj).replace(dumps(MARK), escape))
        for offset, (topic, obj) in enumerate(SURROGATE_CASES)
    ]
    for record in records:
        result = check_decode(record, INGEST_MODELS[record.topic])
        assert isinstance(result, Invalid) and result.kind == kind, record.value
    run_router(records)


def _interaction(**fields: Any) -> dict[str, Any]:
    return {"persona_id": TECHLEAD, "input": "a", "output": "b", **fields}


def _sized(build: Any, size: int) -> bytes:
    """`build(pad)` rendered as JSON, with `pad` grown so the value is exactly `size` bytes."""
    base = len(dumps(build("")))
    value = dumps(build("x" * (size - base)))
    assert len(value) == size
    return value


def _huge_values() -> list[tuple[str, bytes]]:
    """(topic, value) pairs of a megabyte or two, at the size limits that matter."""
    handshake = TOPICS.handshake
    interaction = TOPICS.interaction
    tune = TOPICS.tune_request
    control_keys = {"\x01" * 64 + str(i): 1 for i in range(10)}  # a long reason, escaped 6 bytes a char
    return [
        (interaction, b"x" * 2_000_000),
        (interaction, b"{" + b" " * 2_000_000 + b"}"),
        (handshake, _sized(lambda pad: {"persona": {"name": "n", "metadata": {"pad": pad}}}, MAX_EVENT_BYTES)),
        (handshake, _sized(lambda pad: {"persona": {"name": "n", "metadata": {"pad": pad}}}, MAX_EVENT_BYTES + 1)),
        (handshake, _sized(lambda pad: {"persona": {"name": "n"}, "extra": pad}, LETTER_ROOM)),
        (interaction, _sized(lambda pad: _interaction(input=pad, **control_keys), LETTER_ROOM)),
        (interaction, _sized(lambda pad: _interaction(input=pad, **control_keys), LETTER_ROOM + 1)),
        (tune, _sized(lambda pad: {"persona_id": TECHLEAD, "request_id": "r1", "junk": pad}, MAX_EVENT_BYTES)),
        (tune, b'{"request_id": "' + b"\\udce3" * 150_000 + b'"}'),
        (tune, b'{"persona_id": "' + TECHLEAD.encode() + b'", "x": "' + b"\\udce3" * 400_000 + b'"}'),
        (interaction, b"[" * 499_999 + b"]" * 499_999),
        (interaction, b'{"a":' * 190_000 + b"1" + b"}" * 190_000),
        (interaction, b'{"persona_id": 1' + b"0" * 900_000 + b"}"),
        (handshake, b'{"persona": {"name": "n"}, "n": 0.' + b"1" * 900_000 + b"}"),
        (tune, json.dumps({"persona_id": TECHLEAD, "a": "x" * 800_000, "b": 1}).encode()[:-1] + b', "a": 2}'),
    ]


def test_huge_records(quiet_logs: None) -> None:
    records: list[Record] = []
    for offset, (topic, value) in enumerate(_huge_values()):
        key = b"\x01" * (2 * KEY_CHARS) if offset % 2 else b"\xff" * (2 * KEY_CHARS)
        records.append(Rec(topic, 0, offset, key, value))
    for record in records:
        for model in ALL_MODELS:
            check_decode(record, model)
    KINDS.clear()
    run_router(records)
    assert set(KINDS) >= {"decoded", "too_large", "too_deep", "invalid_unicode", "not_json", "invalid_event"}, KINDS
