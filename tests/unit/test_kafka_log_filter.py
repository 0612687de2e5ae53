"""kafka-python's error for a read on a transport it had closed is dropped; any other read
error, and anything else it logs, still shows."""

import logging
import sys

import pytest
from kafka.net.transport import KafkaTCPTransport

from deploy.cli import ReadAfterCloseFilter


class _Transport:
    """Stands for a KafkaTCPTransport: what the filter reads is its ``_closed`` flag."""

    def __init__(self, closed: bool) -> None:
        self._closed = closed


def _record(msg: str, *args: object) -> logging.LogRecord:
    try:
        raise AttributeError("'NoneType' object has no attribute 'recv'")
    except AttributeError:
        exc_info = sys.exc_info()
    return logging.LogRecord("kafka.net.transport", logging.ERROR, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize(("closed", "shown"), [(True, False), (False, True)])
def test_only_a_read_on_a_closed_transport_is_dropped(closed: bool, shown: bool) -> None:
    record = _record("%s: Error receiving network data closing socket", _Transport(closed))
    assert ReadAfterCloseFilter().filter(record) is shown


def test_other_kafka_errors_still_show() -> None:
    assert ReadAfterCloseFilter().filter(_record("%s: socket disconnected", _Transport(True)))
    assert ReadAfterCloseFilter().filter(_record("no arguments at all"))


def test_kafka_python_still_marks_a_closed_transport_the_way_the_filter_reads() -> None:
    """The filter reads kafka-python's private ``_closed``, set by close() and abort(): a
    version that renames it fails here, not silently in production."""
    for method in (KafkaTCPTransport.close, KafkaTCPTransport.abort, KafkaTCPTransport.__str__):
        assert "_closed" in method.__code__.co_names
