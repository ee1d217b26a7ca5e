"""The request schema: what is accepted, with which defaults (the rejections: tests/test_api.py)."""

import json

import pytest

from app.params import GenerationParams
from app.validation import InvalidRequest, parse_request


def parse(**fields):
    return parse_request(json.dumps(fields).encode())


def test_defaults_are_the_documented_ones():
    assert parse(description="x") == GenerationParams(description="x", duration=30, mbd=False, top_k=250, top_p=0.0,
                                                      temperature=1.0, cfg_coef=3.0, seed=None)


@pytest.mark.parametrize("fields", [
    {"duration": 1}, {"duration": 60}, {"top_k": 0}, {"top_k": 2048}, {"top_p": 0}, {"top_p": 1},
    {"top_p": 0.95}, {"temperature": 0}, {"temperature": 10}, {"cfg_coef": 0}, {"cfg_coef": 30},
    {"seed": 0}, {"seed": 2**32 - 1}, {"mbd": True}, {"description": "x" * 2000},
    {"description": "  padded  "},
])
def test_boundaries_are_accepted(fields):
    params = parse(**{"description": "x", **fields})
    for name, value in fields.items():
        assert getattr(params, name) == (value.strip() if isinstance(value, str) else value)


def test_integers_are_accepted_where_numbers_are_expected():
    params = parse(description="x", top_p=1, temperature=2, cfg_coef=5)
    assert (params.top_p, params.temperature, params.cfg_coef) == (1.0, 2.0, 5.0)


def test_description_is_trimmed_and_unicode_kept():
    assert parse(description="  钢琴独奏  ").description == "钢琴独奏"


def test_utf8_body_with_byte_order_mark_or_other_encodings_is_json():
    assert parse_request('{"description": "é"}'.encode("utf-16")).description == "é"


@pytest.mark.parametrize("body", [b"1", b'"text"', b"true", b"null"])
def test_json_that_is_not_an_object_is_refused(body):
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        parse_request(body)


def test_huge_integers_are_refused_not_crashed_on():
    with pytest.raises(InvalidRequest):
        parse_request(b'{"description": "x", "seed": ' + b"9" * 5000 + b"}")
