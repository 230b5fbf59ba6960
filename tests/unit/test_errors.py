"""The error tree: stable, unique codes; the lookup built from the classes; bodies that round-trip."""

from __future__ import annotations

import re

import pytest

from lamina import errors
from lamina.errors import (
    ERRORS_BY_CODE,
    LaminaError,
    NotFoundError,
    OfflineError,
    SourceNotFoundError,
    UnavailableError,
    from_body,
)


def _all_classes() -> list[type[LaminaError]]:
    return [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, LaminaError) and obj.__module__ == errors.__name__
    ]


def test_every_error_class_is_in_the_lookup_under_its_own_unique_code() -> None:
    classes = _all_classes()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "two errors share a code"
    assert {cls.code: cls for cls in classes} == ERRORS_BY_CODE


def test_the_docstring_tree_lists_every_error_with_its_code_and_status() -> None:
    doc = errors.__doc__ or ""
    for cls in _all_classes():
        line = re.search(rf"\b{cls.__name__}\s+(\S+)\s+(\d+)", doc)
        assert line is not None, f"{cls.__name__} is missing from the tree in lamina/errors.py"
        assert (line.group(1), int(line.group(2))) == (cls.code, cls.status)


def test_a_missing_model_source_is_a_not_found_and_offline_is_unavailable() -> None:
    assert issubclass(SourceNotFoundError, NotFoundError)
    assert issubclass(OfflineError, UnavailableError)
    assert (SourceNotFoundError.status, OfflineError.status) == (404, 503)


@pytest.mark.parametrize("cls", _all_classes(), ids=lambda cls: cls.__name__)
def test_every_error_survives_the_trip_through_an_http_body(cls: type[LaminaError]) -> None:
    sent = cls("what happened; what to do", param="field", limit=3)
    received = from_body(sent.status, sent.to_body())
    assert type(received) is cls
    assert (received.message, received.param, received.details) == (sent.message, "field", {"limit": 3})


def test_an_unknown_code_becomes_the_base_error_with_the_message() -> None:
    received = from_body(502, {"error": {"message": "upstream broke", "code": "no_such_code"}})
    assert type(received) is LaminaError
    assert received.message == "upstream broke"
