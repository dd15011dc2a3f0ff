from __future__ import annotations

import pytest
from _support import CHARS

from rome_lens import (
    EditRequest,
    InvalidRequestError,
    RomeLensError,
    SubjectNotFoundError,
    subject_token_span,
)
from rome_lens.requests import target_text, target_tokens


def _bos(model) -> int:
    return int(model.tokenizer.bos_token_id)


def _chars(model, ids) -> str:
    """The characters of character-level tokens (decode() would join them with spaces)."""
    return "".join(model.tokenizer.convert_ids_to_tokens(ids.tolist()))


# ---------------------------------------------------------------- EditRequest


def test_template_and_full_prompt_give_same_text() -> None:
    templ = EditRequest("{} lives in the city of", "Alice Smith", "Paris", "Rome")
    full = EditRequest("Alice Smith lives in the city of", "Alice Smith", "Paris", "Rome")
    assert templ.text == full.text == "Alice Smith lives in the city of"
    assert templ.template == full.template == "{} lives in the city of"


def test_full_prompt_with_subject_in_the_middle() -> None:
    full = EditRequest("Yesterday Alice Smith moved to", "Alice Smith", "Paris")
    assert full.template == "Yesterday {} moved to"
    assert full.text == "Yesterday Alice Smith moved to"
    # Only the first occurrence becomes the slot; the text is unchanged.
    twice = EditRequest("Bob met Bob in", "Bob", "Paris")
    assert twice.template == "{} met Bob in"
    assert twice.text == "Bob met Bob in"


def test_request_dict_round_trip() -> None:
    req = EditRequest("{} plays", "Dave", "tennis", "chess")
    assert req.to_dict() == {
        "prompt": "{} plays", "subject": "Dave", "target_new": "tennis", "target_true": "chess",
    }
    assert EditRequest.from_dict(req.to_dict()) == req
    assert EditRequest.from_dict({"prompt": "{} plays", "subject": "Dave",
                                  "target_new": "tennis"}).target_true is None


def test_subject_missing_raises() -> None:
    with pytest.raises(SubjectNotFoundError, match="Bob"):
        EditRequest("Alice Smith lives in", "Bob", "Paris")
    # case matters: no silent fuzzy match
    with pytest.raises(SubjectNotFoundError):
        EditRequest("alice smith lives in", "Alice Smith", "Paris")


@pytest.mark.parametrize("target", ["", " ", "   ", "\t\n"])
def test_empty_or_whitespace_target_new_raises(target: str) -> None:
    with pytest.raises(InvalidRequestError, match="target_new"):
        EditRequest("{} lives in", "Alice", target)


@pytest.mark.parametrize("target_true", ["", "  "])
def test_empty_target_true_raises(target_true: str) -> None:
    with pytest.raises(InvalidRequestError, match="target_true"):
        EditRequest("{} lives in", "Alice", "Paris", target_true)


@pytest.mark.parametrize(("new", "true"), [("Paris", "Paris"), (" Paris", "Paris"),
                                           ("Paris ", " Paris")])
def test_target_new_equal_to_target_true_raises(new: str, true: str) -> None:
    with pytest.raises(InvalidRequestError, match="equals target_true"):
        EditRequest("{} lives in", "Alice", new, true)


@pytest.mark.parametrize(
    ("prompt", "subject"), [("{} lives in", ""), ("{} lives in", "  "), ("   ", "Alice")]
)
def test_empty_prompt_or_subject_raises(prompt: str, subject: str) -> None:
    with pytest.raises(InvalidRequestError):
        EditRequest(prompt, subject, "Paris")


def test_two_slots_raise() -> None:
    with pytest.raises(InvalidRequestError, match="more than one"):
        EditRequest("{} and {} live in", "Alice", "Paris")


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        EditRequest("Alice lives in", "Bob", "Paris")
    assert issubclass(SubjectNotFoundError, RomeLensError)
    assert issubclass(InvalidRequestError, RomeLensError)


# ---------------------------------------------------------------- targets


def test_target_text_adds_one_leading_space() -> None:
    assert target_text("Paris") == " Paris"
    assert target_text(" Paris") == " Paris"
    assert target_text("\tParis") == "\tParis"


def test_target_tokens(model) -> None:
    ids = target_tokens(model, "Rome")
    assert _chars(model, ids) == " Rome"
    assert ids.shape == (5,)  # character-level: space + 4 letters, no BOS
    assert _bos(model) not in ids.tolist()
    with pytest.raises(InvalidRequestError):
        target_tokens(model, "  ")


# ---------------------------------------------------------------- subject_token_span


def _check_span(model, text: str, subject: str, char_start: int, **kw) -> tuple[int, int]:
    assert set(text) <= set(CHARS)
    tokens, (start, end) = subject_token_span(model, text, subject, **kw)
    # character-level tokenizer: BOS, then one token per character
    assert tokens.shape == (len(text) + 1,)
    assert int(tokens[0]) == _bos(model)
    assert start >= 1, "the span must never include the BOS position"
    assert (start, end) == (1 + char_start, 1 + char_start + len(subject))
    assert _chars(model, tokens[start:end]) == subject
    return start, end


def test_span_multi_token_subject_at_start(model) -> None:
    text = "Alice Smith lives in the city of"
    assert _check_span(model, text, "Alice Smith", 0) == (1, 12)


def test_span_subject_in_the_middle(model) -> None:
    text = "Yesterday Alice Smith moved to"
    assert _check_span(model, text, "Alice Smith", 10) == (11, 22)


def test_span_subject_at_the_end(model) -> None:
    text = "The capital is Rome"
    assert _check_span(model, text, "Rome", 15) == (16, 20)


def test_span_subject_with_leading_space(model) -> None:
    text = "Yesterday Alice Smith moved to"
    # the leading space belongs to the subject, so its token is inside the span
    assert _check_span(model, text, " Alice Smith", 9) == (10, 22)


def test_span_one_character_subject_at_start_excludes_bos(model) -> None:
    assert _check_span(model, "X is a letter", "X", 0) == (1, 2)


def test_span_from_request_text(model) -> None:
    req = EditRequest("In {} people speak", "New York", "French")
    _, span = subject_token_span(model, req.text, req.subject)
    assert span == (4, 12)


def test_span_occurrence_and_char_start(model) -> None:
    text = "Bob met Bob in Rome"
    _, last = subject_token_span(model, text, "Bob")
    _, first = subject_token_span(model, text, "Bob", occurrence=0)
    _, at = subject_token_span(model, text, "Bob", char_start=0)
    assert last == (9, 12)
    assert first == at == (1, 4)
    with pytest.raises(SubjectNotFoundError):
        subject_token_span(model, text, "Bob", char_start=1)


def test_span_missing_subject_raises(model) -> None:
    with pytest.raises(SubjectNotFoundError, match="Carol"):
        subject_token_span(model, "Alice lives in Rome", "Carol")
    with pytest.raises(SubjectNotFoundError):
        subject_token_span(model, "Alice lives in Rome", "")


def test_span_fallback_without_offsets_matches(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix-counting fallback (slow tokenizers) finds the same spans."""
    cases = [("Alice Smith lives in", "Alice Smith"), ("Yesterday Alice Smith moved", " Alice"),
             ("X is a letter", "X")]
    fast = [subject_token_span(model, t, s)[1] for t, s in cases]
    monkeypatch.setattr(type(model.tokenizer), "is_fast", property(lambda self: False))
    assert not model.tokenizer.is_fast
    slow = [subject_token_span(model, t, s)[1] for t, s in cases]
    assert slow == fast == [(1, 12), (10, 16), (1, 2)]
