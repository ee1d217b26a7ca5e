import json

from app import sse


def test_a_message_is_one_data_line_and_a_blank_line():
    text = sse.message({"event": "error", "message": "two\nlines\r\nand \u2028 more"})
    assert text.endswith("\n\n") and text.count("\n") == 2 and text.startswith("data: ")
    assert json.loads(text[len("data: "):]) == {"event": "error", "message": "two\nlines\r\nand \u2028 more"}


def test_the_original_example_format_is_kept():
    assert sse.message({"event": "start"}) == 'data: {"event": "start"}\n\n'


def test_keepalive_is_a_comment_only_message():
    assert sse.KEEPALIVE.startswith(":") and sse.KEEPALIVE.endswith("\n\n") and "data:" not in sse.KEEPALIVE


def test_terminal_events():
    assert sse.is_terminal({"event": "completed"}) and sse.is_terminal({"event": "error"})
    assert not sse.is_terminal({"event": "progress", "progress": 100.0})
