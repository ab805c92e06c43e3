"""
Tests for L{mailproxy.filters.daemon.ask}, the one-question connection spamd, clamd and p0f
share: its connection errors and its cancellation, on a memory reactor.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailproxy.filters import FilterError
from mailproxy.filters.daemon import ask


class Asker(Protocol):
    """Writes a question; fires its answer with what comes back."""

    def __init__(self, answer: Deferred[bytes]) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"question?")

    def dataReceived(self, data: bytes) -> None:
        self.answer.callback(data)


class AskTests(SynchronousTestCase):
    """L{ask} connects, waits for the protocol's answer, and maps failures."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 7)

    def asked(self) -> Deferred[bytes]:
        return Deferred.fromCoroutine(ask(self.endpoint, "echo at 127.0.0.1:7", Asker))

    def connect(self) -> tuple[Protocol, StringTransport]:
        """Complete the pending connection over a StringTransport."""
        [(_, _, factory, _, _)] = self.reactor.tcpClients
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        protocol.makeConnection(transport)
        return protocol, transport

    def test_answer(self) -> None:
        """The question is sent on connection and the answer is what the protocol fired."""
        d = self.asked()
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), b"question?")
        self.assertNoResult(d)
        protocol.dataReceived(b"42")
        self.assertEqual(self.successResultOf(d), b"42")

    def test_unreachable(self) -> None:
        """A refused connection is a FilterError naming the daemon and its address."""
        d = self.asked()
        [(_, _, factory, _, _)] = self.reactor.tcpClients
        [connector] = self.reactor.connectors
        factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))
        failure = self.failureResultOf(d, FilterError)
        self.assertIn("echo at 127.0.0.1:7 unreachable", str(failure.value))

    def test_cancelConnecting(self) -> None:
        """Cancelled while connecting (a timeout): a CancelledError, not a FilterError."""
        d = self.asked()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    def test_cancelWaiting(self) -> None:
        """Cancelled while waiting for the answer: the connection is aborted."""
        d = self.asked()
        _, transport = self.connect()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(transport.disconnected)
