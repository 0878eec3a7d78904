"""One-line error messages."""
from pipelines.errors import first_line


def test_first_line_of_an_exception_message_even_an_empty_one():
    assert first_line(ValueError("  bad value\nmore detail")) == "bad value"
    assert first_line(RuntimeError()) == ""  # str(exc).splitlines()[0] raised IndexError here
