"""Where redaction applies: an interaction's text, its metadata's strings, keys and long
integers, a tune request's examples, a feedback's correction; the result redacts to itself."""

from __future__ import annotations

from collections import Counter

from ings_daemon.contract.events import Interaction, TuneRequest
from ings_daemon.ingest import privacy

PERSONA = "did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1"


def _interaction(metadata: dict[str, object]) -> Interaction:
    return Interaction.model_validate(
        {"persona_id": PERSONA, "input": "mail bob@example.com", "output": "ok", "metadata": metadata}
    )


def test_interaction_text_metadata_strings_keys_and_numbers_are_redacted() -> None:
    event = _interaction(
        {
            "reporter": {"contact": "+1 415 555 2671", "alice.key@example.com": "admin"},
            "4111111111111111": "a card as a key",
            "card": 4111111111111111,
            "phone": 14155552671,
            "tags": ["ok", "a@b.io", 5500005555555559],
            # Kept: no card nor phone (a timestamp, a count, a float, a bool, a null).
            "epoch": 1700000000,
            "n": 42,
            "amount": 4111111111111111.0,
            "flag": True,
            "none": None,
        }
    )
    counts: Counter[str] = Counter()
    out = privacy.interaction(event, counts)
    assert (out.input, out.output) == ("mail [EMAIL]", "ok")
    assert out.metadata == {
        "reporter": {"contact": "[PHONE]", "[EMAIL]": "admin"},
        "[CARD]": "a card as a key",
        "card": "[CARD]",
        "phone": "[PHONE]",
        "tags": ["ok", "[EMAIL]", "[CARD]"],
        "epoch": 1700000000,
        "n": 42,
        "amount": 4111111111111111.0,
        "flag": True,
        "none": None,
    }
    assert counts == Counter(email=3, phone=2, card=3)
    assert out.persona_id == event.persona_id and out.event_id == event.event_id


def test_keys_that_redact_alike_are_all_kept() -> None:
    # The first changed key takes the placeholder, unless an unchanged key already has it;
    # the next ones #2, #3, ... skipping any key the object already holds.
    event = _interaction({"a@b.io": 1, "[EMAIL]#2": "kept as sent", "c@d.io": 2, "e@f.io": 3})
    counts: Counter[str] = Counter()
    assert privacy.interaction(event, counts).metadata == {
        "[EMAIL]": 1,
        "[EMAIL]#2": "kept as sent",
        "[EMAIL]#3": 2,
        "[EMAIL]#4": 3,
    }
    assert counts == Counter(email=4)  # three keys and the input's address

    event = _interaction({"a@b.io": 1, "[EMAIL]": 0})
    assert privacy.interaction(event, Counter()).metadata == {"[EMAIL]#2": 1, "[EMAIL]": 0}


def test_redacted_interaction_redacts_to_itself() -> None:
    event = _interaction({"a@b.io": {"c@d.io": 4111111111111111}, "x": "call +44 20 7946 0958"})
    once = privacy.interaction(event, Counter())
    counts: Counter[str] = Counter()
    twice = privacy.interaction(once, counts)
    assert twice == once and counts == Counter()


def test_tune_request_examples_are_redacted() -> None:
    request = TuneRequest.model_validate(
        {
            "persona_id": PERSONA,
            "training_data": [{"input": "who is on 10.0.0.1?", "output": "ask ops\uff20example.com"}],
        }
    )
    counts: Counter[str] = Counter()
    out = privacy.tune_request(request, counts)
    assert [(x.input, x.output) for x in out.training_data] == [("who is on [IP]?", "ask [EMAIL]")]
    assert counts == Counter(ip=1, email=1)


def test_feedback_correction_and_comment_are_redacted() -> None:
    from ings_daemon.contract.feedback import Feedback

    fb = Feedback(
        persona_id=PERSONA,
        interaction_event_id="e1",
        rating="down",
        correction="mail ann@example.com instead",
        comment="from 10.0.0.1",
    )
    counts: Counter[str] = Counter()
    out = privacy.feedback(fb, counts)
    assert (out.correction, out.comment) == ("mail [EMAIL] instead", "from [IP]")
    assert counts == Counter(ip=1, email=1)
    assert privacy.feedback(fb.model_copy(update={"correction": None, "comment": None}), counts).correction is None
