"""
The stand-in MTA: what a client sees (reply codes, queue ids), what it records (the raw
transcript, the accepted messages) and what it stores (the Maildir files), and its knobs
for misbehaving.

Protocol tests run in memory on a L{StringTransport}; the last ones use a real loopback
socket.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.smtp import sendmail
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailproxy.localmta import LocalMTA, ReceivedMessage

PEER = IPv4Address("TCP", "127.0.0.1", 54321)
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-F]{10})$")
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


class Client:
    """One in-memory connection to a stand-in: feed it bytes, read its reply lines."""

    def __init__(self, mta: LocalMTA, peer: Any = PEER) -> None:
        protocol = mta.buildFactory().buildProtocol(peer)
        assert isinstance(protocol, Protocol)
        self.protocol = protocol
        self.transport = StringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> list[bytes]:
        """The reply lines written since the last call."""
        written: bytes = self.transport.value()
        lines = written.split(b"\r\n")
        self.transport.clear()
        assert lines[-1] == b"", lines
        return lines[:-1]

    def send(self, data: bytes) -> list[bytes]:
        """Deliver C{data} in one chunk; return the reply lines it caused."""
        self.protocol.dataReceived(data)
        return self.take()

    def close(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


def codes(lines: list[bytes]) -> list[bytes]:
    """The status codes of the last lines of replies (multi-line continuations dropped)."""
    return [line[:3] for line in lines if line[3:4] == b" "]


def submit(client: Client, content: bytes, envelope: bytes = ENVELOPE) -> list[bytes]:
    """Run one transaction, C{content} already dot-stuffed; return all reply lines."""
    lines = client.send(envelope)
    lines += client.send(b"DATA\r\n")
    lines += client.send(content + b".\r\n")
    return lines


class GreetingTests(SynchronousTestCase):
    def test_greeting(self) -> None:
        """A connection is greeted with 220 and the configured hostname."""
        client = Client(LocalMTA(hostname="mx.test"))
        self.assertEqual(client.greeting, [b"220 mx.test ESMTP mailproxy-localmta"])

    def test_ehloDefaultExtensions(self) -> None:
        """EHLO announces PIPELINING, 8BITMIME, a large SIZE and ENHANCEDSTATUSCODES."""
        client = Client(LocalMTA())
        self.assertEqual(
            client.send(b"EHLO client.example\r\n"),
            [
                b"250-localmta.invalid Hello 127.0.0.1, nice to meet you",
                b"250-PIPELINING",
                b"250-8BITMIME",
                b"250-SIZE 1000000000",
                b"250 ENHANCEDSTATUSCODES",
            ],
        )

    def test_ehloExtraExtensions(self) -> None:
        """
        Extensions given to the constructor are announced after the defaults, bare
        keywords included, and one that is already a default replaces its arguments.
        """
        mta = LocalMTA(
            extensions={
                b"CHUNKING": [],
                b"XCLIENT": [b"ADDR", b"NAME", b"HELO"],
                b"SIZE": [b"5000"],
            }
        )
        lines = Client(mta).send(b"EHLO client.example\r\n")
        self.assertEqual(
            lines[1:],
            [
                b"250-PIPELINING",
                b"250-8BITMIME",
                b"250-SIZE 5000",
                b"250-ENHANCEDSTATUSCODES",
                b"250-CHUNKING",
                b"250 XCLIENT ADDR NAME HELO",
            ],
        )

    def test_extensionsAttributeEditable(self) -> None:
        """Replacing C{extensions} changes what the next EHLO announces."""
        mta = LocalMTA()
        mta.extensions = {b"STARTTLS": [], b"SIZE": [b"10"]}
        lines = Client(mta).send(b"EHLO client.example\r\n")
        self.assertEqual(lines[1:], [b"250-STARTTLS", b"250 SIZE 10"])

    def test_ehloOverUnixSocket(self) -> None:
        """EHLO works when the peer has no IP address (a UNIX socket)."""
        client = Client(LocalMTA(), peer=UNIXAddress(None))
        lines = client.send(b"EHLO client.example\r\n")
        self.assertEqual(codes(lines), [b"250"])

    def test_helo(self) -> None:
        """Plain HELO gets a one-line 250 and allows a transaction."""
        client = Client(LocalMTA())
        lines = client.send(b"HELO client.example\r\n")
        self.assertEqual(lines, [b"250 localmta.invalid Hello 127.0.0.1, nice to meet you"])
        lines = submit(client, MESSAGE, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
        self.assertRegex(lines[-1], QUEUED)


class TransactionTests(SynchronousTestCase):
    def test_queued(self) -> None:
        """
        A message is accepted with Postfix-like replies; the final one names a queue id,
        which the recorded message carries with its envelope and exact content.
        """
        mta = LocalMTA()
        client = Client(mta)
        lines = submit(client, MESSAGE)
        self.assertEqual(
            lines[-4:-1],
            [
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"354 End data with <CR><LF>.<CR><LF>",
            ],
        )
        match = QUEUED.match(lines[-1])
        assert match is not None, lines[-1]
        self.assertEqual(
            mta.messages,
            [
                ReceivedMessage(
                    mailFrom="a@example.com",
                    recipients=["b@example.net"],
                    content=MESSAGE,
                    queueId=match.group(1).decode(),
                    size=len(MESSAGE),
                    helo="client.example",
                )
            ],
        )

    def test_queueIdsUnique(self) -> None:
        """Each message on a connection gets its own queue id, and is recorded in order."""
        mta = LocalMTA()
        client = Client(mta)
        first = submit(client, b"one\r\n")[-1]
        second = submit(client, b"two\r\n", b"MAIL FROM:<c@x>\r\nRCPT TO:<d@y>\r\n")[-1]
        self.assertNotEqual(first, second)
        self.assertEqual([m.content for m in mta.messages], [b"one\r\n", b"two\r\n"])
        self.assertEqual([m.queueId.encode() for m in mta.messages], [first[-10:], second[-10:]])

    def test_manyRecipientsOneMessage(self) -> None:
        """A transaction with several recipients is one message listing them all."""
        mta = LocalMTA()
        lines = submit(
            Client(mta),
            MESSAGE,
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\n",
        )
        self.assertRegex(lines[-1], QUEUED)
        [message] = mta.messages
        self.assertEqual(message.recipients, ["b@y", "c@y"])

    def test_nullSender(self) -> None:
        """The null sender C{<>} is accepted and recorded as the empty string."""
        mta = LocalMTA()
        submit(Client(mta), MESSAGE, b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@y>\r\n")
        self.assertEqual(mta.messages[0].mailFrom, "")

    def test_mailParameters(self) -> None:
        """ESMTP parameters on MAIL FROM (SIZE, BODY) are accepted."""
        client = Client(LocalMTA())
        lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x> SIZE=100 BODY=8BITMIME\r\n")
        self.assertEqual(lines[-1], b"250 2.1.0 Ok")

    def test_dotStuffingRemoved(self) -> None:
        """Dot-stuffed lines come out with one leading dot fewer, wherever they are."""
        mta = LocalMTA()
        submit(Client(mta), b"..first\r\n\r\n..\r\nmid..dle\r\n...\r\n..last\r\n")
        self.assertEqual(mta.messages[0].content, b".first\r\n\r\n.\r\nmid..dle\r\n..\r\n.last\r\n")

    def test_contentExactlyAsSent(self) -> None:
        """
        A message without headers is stored unchanged: no C{Received:} header is added
        and no blank line inserted before a first line without a colon (both of which
        stock twisted.mail does).
        """
        mta = LocalMTA()
        submit(Client(mta), b"no header here\r\nsecond\r\n")
        self.assertEqual(mta.messages[0].content, b"no header here\r\nsecond\r\n")

    def test_emptyMessage(self) -> None:
        """A message with no content at all is accepted with empty content."""
        mta = LocalMTA()
        lines = submit(Client(mta), b"")
        self.assertRegex(lines[-1], QUEUED)
        self.assertEqual(mta.messages[0].content, b"")

    def test_longLines(self) -> None:
        """
        Body lines of 5000 bytes, and of 3 MiB (beyond the command-line limit), survive
        intact and the message is accepted.
        """
        mta = LocalMTA()
        content = b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n" + b"y" * (3 << 20) + b"\r\n"
        lines = submit(Client(mta), content)
        self.assertRegex(lines[-1], QUEUED)
        self.assertEqual(mta.messages[0].content, content)

    def test_bareLineEndingsAreContent(self) -> None:
        """
        Only CRLF.CRLF ends the data: bare-LF and bare-CR lookalikes of the end marker
        are kept as content.
        """
        mta = LocalMTA()
        content = b"a\n.\nb\r.\rc\n.\r\nd\r\n"
        lines = submit(Client(mta), content)
        self.assertEqual(codes(lines)[-1], b"250")
        self.assertEqual(mta.messages[0].content, content)

    def test_byteAtATime(self) -> None:
        """
        A dialogue delivered one byte at a time gets the same replies and the same
        message as when delivered in one chunk.
        """
        dialogue = ENVELOPE + b"DATA\r\n" + b"..a\r\n\r\nb\r\n.\r\n" + b"QUIT\r\n"
        mta = LocalMTA()
        whole = Client(mta)
        replies = whole.send(dialogue)
        split = Client(mta)
        for i in range(len(dialogue)):
            split.protocol.dataReceived(dialogue[i : i + 1])
        self.assertEqual(codes(split.take()), codes(replies))
        self.assertEqual(mta.messages[0].content, mta.messages[1].content)
        self.assertEqual(mta.messages[1].content, b".a\r\n\r\nb\r\n")

    @settings(max_examples=200, deadline=None)
    @given(
        lines=st.lists(st.binary(max_size=12).filter(lambda b: b"\r\n" not in b), max_size=12),
        data=st.data(),
    )
    def test_anySplitAnyContent(self, lines: list[bytes], data: st.DataObject) -> None:
        """
        However a dot-stuffed message is split into chunks, the content stored is the
        message before stuffing.
        """
        content = b"".join(line + b"\r\n" for line in lines)
        stuffed = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
        stream = stuffed + b".\r\n"
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        mta = LocalMTA()
        client = Client(mta)
        client.send(ENVELOPE + b"DATA\r\n")
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            client.protocol.dataReceived(stream[start:end])
        self.assertRegex(client.take()[-1], QUEUED)
        self.assertEqual(mta.messages[0].content, content)

    def test_pipelinedCommands(self) -> None:
        """
        Commands pipelined in one chunk are answered in order, including those that
        follow the end of data in the same chunk as the content.
        """
        mta = LocalMTA()
        client = Client(mta)
        first = client.send(ENVELOPE + b"DATA\r\n")
        second = client.send(MESSAGE + b".\r\nMAIL FROM:<c@x>\r\nRCPT TO:<d@y>\r\nDATA\r\n")
        third = client.send(b"x\r\n.\r\nQUIT\r\n")
        self.assertEqual(codes(first), [b"250", b"250", b"250", b"354"])
        self.assertEqual(codes(second), [b"250", b"250", b"250", b"354"])
        self.assertEqual(codes(third), [b"250", b"221"])
        self.assertEqual([m.content for m in mta.messages], [MESSAGE, b"x\r\n"])
        self.assertTrue(client.transport.disconnecting)

    def test_contentInSameChunkAsData(self) -> None:
        """Content sent in the same chunk as the DATA command is still read as content."""
        mta = LocalMTA()
        lines = Client(mta).send(ENVELOPE + b"DATA\r\n..x\r\n.\r\n")
        self.assertEqual(codes(lines), [b"250", b"250", b"250", b"354", b"250"])
        self.assertEqual(mta.messages[0].content, b".x\r\n")


class CommandTests(SynchronousTestCase):
    def test_refuseRecipients(self) -> None:
        """
        A recipient the C{refuseRecipients} knob refuses gets 550 5.1.1; the others are
        accepted and the message lists only them.
        """
        mta = LocalMTA()
        mta.refuseRecipients = lambda rcpt: rcpt.startswith("nobody@")
        client = Client(mta)
        lines = client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody@y>\r\nRCPT TO:<b@y>\r\n")
        self.assertEqual(
            lines,
            [
                b"250 2.1.0 Ok",
                b"550 5.1.1 <nobody@y>: Recipient address rejected: User unknown",
                b"250 2.1.5 Ok",
            ],
        )
        submit(client, MESSAGE, b"")
        self.assertEqual(mta.messages[0].recipients, ["b@y"])

    def test_refuseSenders(self) -> None:
        """A sender the C{refuseSenders} knob refuses gets 553 5.7.1, and RCPT then 503."""
        mta = LocalMTA()
        mta.refuseSenders = lambda sender: sender == "spam@x"
        lines = Client(mta).send(b"MAIL FROM:<spam@x>\r\nRCPT TO:<b@y>\r\n")
        self.assertEqual(lines[0], b"553 5.7.1 <spam@x>: Sender address rejected: Access denied")
        self.assertEqual(codes(lines)[1], b"503")

    def test_refuseMessage(self) -> None:
        """
        The C{refuseMessage} knob's reply is sent at end of data, and the message is
        neither recorded nor stored.
        """
        mta = LocalMTA(maildir=self.mktemp())
        seen: list[bytes] = []

        def refuse(message: ReceivedMessage) -> tuple[int, str]:
            seen.append(message.content)
            return (554, "5.7.1 Spam")

        mta.refuseMessage = refuse
        lines = submit(Client(mta), MESSAGE)
        self.assertEqual(lines[-1], b"554 5.7.1 Spam")
        self.assertEqual(seen, [MESSAGE])
        self.assertEqual(mta.messages, [])
        assert mta.maildir is not None
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "new")), [])
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "tmp")), [])

    def test_dataNeedsMailAndRcpt(self) -> None:
        """DATA without MAIL, or without an accepted RCPT, gets 503 5.5.1."""
        client = Client(LocalMTA())
        self.assertEqual(client.send(b"DATA\r\n"), [b"503 5.5.1 Error: need MAIL command"])
        client.send(b"MAIL FROM:<a@x>\r\n")
        self.assertEqual(client.send(b"DATA\r\n"), [b"503 5.5.1 Error: need RCPT command"])

    def test_rset(self) -> None:
        """RSET forgets the transaction: DATA then fails, and a new MAIL is accepted."""
        client = Client(LocalMTA())
        client.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
        self.assertEqual(client.send(b"RSET\r\n"), [b"250 2.0.0 Ok"])
        self.assertEqual(codes(client.send(b"DATA\r\n")), [b"503"])
        self.assertEqual(client.send(b"MAIL FROM:<c@x>\r\n"), [b"250 2.1.0 Ok"])

    def test_noop(self) -> None:
        """NOOP gets 250."""
        self.assertEqual(Client(LocalMTA()).send(b"NOOP\r\n"), [b"250 2.0.0 Ok"])

    def test_unimplementedCommands(self) -> None:
        """
        Commands the stand-in does not implement (VRFY, BDAT, and STARTTLS, XCLIENT or
        XFORWARD when not announced) get 502 5.5.2, as from Postfix.
        """
        client = Client(LocalMTA())
        for command in [b"VRFY b", b"BDAT 10 LAST", b"STARTTLS", b"AUTH PLAIN", b"XCLIENT A=1"]:
            self.assertEqual(
                client.send(command + b"\r\n"), [b"502 5.5.2 Error: command not recognized"]
            )
        self.assertEqual(codes(client.send(b"XFORWARD ADDR=1.2.3.4\r\n")), [b"502"])

    def test_announcedStartTLSUnavailable(self) -> None:
        """STARTTLS, when a test announces it, answers 454: there is no certificate."""
        client = Client(LocalMTA(extensions={b"STARTTLS": []}))
        self.assertEqual(codes(client.send(b"STARTTLS\r\n")), [b"454"])

    def test_emptyLine(self) -> None:
        """An empty command line gets 500."""
        self.assertEqual(codes(Client(LocalMTA()).send(b"\r\n")), [b"500"])

    def test_quit(self) -> None:
        """QUIT gets 221 and the server closes the connection."""
        client = Client(LocalMTA())
        self.assertEqual(client.send(b"QUIT\r\n"), [b"221 2.0.0 Bye"])
        self.assertTrue(client.transport.disconnecting)

    def test_commandLineTooLong(self) -> None:
        """A command line over 1 MiB gets 500 5.5.2 and the connection is closed."""
        client = Client(LocalMTA())
        lines = client.send(b"NOOP " + b"x" * (1 << 20) + b"\r\nNOOP\r\n")
        self.assertEqual(lines, [b"500 5.5.2 Error: line too long"])
        self.assertTrue(client.transport.disconnecting)

    def test_xclient(self) -> None:
        """
        An announced XCLIENT gets the 220 greeting again; its attributes (xtext-decoded)
        are recorded with the message.
        """
        mta = LocalMTA(extensions={b"XCLIENT": [b"ADDR", b"NAME", b"HELO"]})
        client = Client(mta)
        lines = client.send(b"XCLIENT ADDR=192.0.2.1 NAME=mail.example HELO=x+2By\r\n")
        self.assertEqual(lines, client.greeting)
        submit(client, MESSAGE)
        self.assertEqual(
            mta.messages[0].xclient,
            {"ADDR": "192.0.2.1", "NAME": "mail.example", "HELO": "x+y"},
        )

    def test_xclientUnannouncedAttribute(self) -> None:
        """An XCLIENT attribute that was not announced gets 501 5.5.4 and is not kept."""
        mta = LocalMTA(extensions={b"XCLIENT": [b"ADDR"]})
        client = Client(mta)
        self.assertEqual(
            client.send(b"XCLIENT ADDR=192.0.2.1 PORT=25\r\n"),
            [b"501 5.5.4 Bad XCLIENT attribute name: PORT"],
        )
        submit(client, MESSAGE)
        self.assertEqual(mta.messages[0].xclient, {})

    def test_xforward(self) -> None:
        """An announced XFORWARD gets 250 and its attributes are recorded with the message."""
        mta = LocalMTA(extensions={b"XFORWARD": [b"ADDR", b"NAME"]})
        client = Client(mta)
        self.assertEqual(
            client.send(b"XFORWARD ADDR=192.0.2.1 NAME=[UNAVAILABLE]\r\n"), [b"250 2.0.0 Ok"]
        )
        submit(client, MESSAGE)
        self.assertEqual(mta.messages[0].xforward, {"ADDR": "192.0.2.1", "NAME": "[UNAVAILABLE]"})


class KnobTests(SynchronousTestCase):
    def test_dropAfterDataBytes(self) -> None:
        """
        With C{dropAfterDataBytes}, the connection is aborted once that many bytes of
        DATA have arrived: nothing is answered after the 354, nothing is recorded or
        left in the Maildir.
        """
        mta = LocalMTA(maildir=self.mktemp())
        mta.dropAfterDataBytes = 10
        client = Client(mta)
        self.assertEqual(codes(client.send(ENVELOPE + b"DATA\r\n"))[-1], b"354")
        self.assertEqual(client.send(b"12345"), [])
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(client.send(b"67890abcdef\r\n.\r\n"), [])
        self.assertTrue(client.transport.disconnected)  # aborted, not closed cleanly
        client.close()
        self.assertEqual(mta.messages, [])
        assert mta.maildir is not None
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "new")), [])

    def test_dropAfterZeroDataBytes(self) -> None:
        """C{dropAfterDataBytes = 0} aborts right after the 354."""
        mta = LocalMTA()
        mta.dropAfterDataBytes = 0
        client = Client(mta)
        lines = client.send(ENVELOPE + b"DATA\r\n" + MESSAGE + b".\r\n")
        self.assertEqual(codes(lines)[-1], b"354")
        self.assertTrue(client.transport.disconnected)

    def test_dropAfterDataBytesNotReached(self) -> None:
        """A message whose DATA stream ends within C{dropAfterDataBytes} is accepted."""
        mta = LocalMTA()
        mta.dropAfterDataBytes = len(MESSAGE + b".\r\n")
        client = Client(mta)
        lines = submit(client, MESSAGE)
        self.assertRegex(lines[-1], QUEUED)
        self.assertFalse(client.transport.disconnecting)

    def test_silentAfterData(self) -> None:
        """
        With C{silentAfterData}, end of data is never answered, nor anything after it;
        the connection stays open, the message is not recorded, the transcript is.
        """
        clock = Clock()
        mta = LocalMTA(clock=clock)
        mta.silentAfterData = True
        client = Client(mta)
        lines = submit(client, MESSAGE)
        self.assertEqual(codes(lines)[-1], b"354")
        self.assertEqual(client.send(b"RSET\r\nQUIT\r\n"), [])
        clock.advance(3600)
        self.assertEqual(client.take(), [])
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(mta.messages, [])
        self.assertTrue(bytes(mta.transcripts[0]).endswith(b".\r\nRSET\r\nQUIT\r\n"))

    def test_keepContentOff(self) -> None:
        """
        With C{keepContent} off the content is not held in memory, but its size is
        counted and the Maildir file is complete.
        """
        mta = LocalMTA(maildir=self.mktemp())
        mta.keepContent = False
        submit(Client(mta), MESSAGE)
        [message] = mta.messages
        self.assertEqual((message.content, message.size), (b"", len(MESSAGE)))
        assert message.path is not None
        with open(message.path, "rb") as f:
            self.assertEqual(f.read(), MESSAGE)

    def test_keepTranscriptsOff(self) -> None:
        """With C{keepTranscripts} off each connection still has an (empty) transcript."""
        mta = LocalMTA()
        mta.keepTranscripts = False
        submit(Client(mta), MESSAGE)
        self.assertEqual(mta.transcripts, [bytearray()])

    def test_recordOff(self) -> None:
        """
        A long-running stand-in (C{record=False}, as C{--local-mta} and the command line
        use it) keeps nothing in memory per message or connection, and still delivers
        every message to the Maildir with its queue id in the reply.
        """
        mta = LocalMTA(maildir=self.mktemp(), record=False)
        for _ in range(3):
            client = Client(mta)
            lines = submit(client, MESSAGE)
            self.assertRegex(lines[-1], QUEUED)
            client.close()
        self.assertEqual((mta.messages, mta.transcripts), ([], []))
        assert mta.maildir is not None
        new = os.path.join(mta.maildir, "new")
        for name in os.listdir(new):
            with open(os.path.join(new, name), "rb") as f:
                self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(len(os.listdir(new)), 3)

    def test_idleTimeout(self) -> None:
        """With a clock, an idle client gets 421 4.4.2 and is disconnected."""
        clock = Clock()
        mta = LocalMTA(clock=clock)
        mta.idleTimeout = 30
        client = Client(mta)
        clock.advance(29)
        client.send(b"NOOP\r\n")
        clock.advance(29)
        self.assertFalse(client.transport.disconnecting)
        clock.advance(1)
        self.assertEqual(client.take(), [b"421 4.4.2 localmta.invalid Error: timeout exceeded"])
        self.assertTrue(client.transport.disconnecting)


class RecordingTests(SynchronousTestCase):
    def test_transcriptIsRawBytes(self) -> None:
        """
        Each connection's transcript holds exactly the bytes it sent, dot-stuffing and
        all, in order; whenClosed fires with it once the connection has ended.
        """
        mta = LocalMTA()
        first, second = Client(mta), Client(mta)
        sent = ENVELOPE + b"DATA\r\n..x\r\n.\r\n"
        first.send(sent)
        second.send(b"NOOP\r\n")
        self.assertEqual(mta.transcripts, [bytearray(sent), bytearray(b"NOOP\r\n")])
        closed = mta.whenClosed(1)
        self.assertNoResult(closed)
        second.close()
        self.assertEqual(self.successResultOf(closed), b"NOOP\r\n")
        first.close()
        self.assertEqual(self.successResultOf(mta.whenClosed(0)), sent)

    def test_maildirLayout(self) -> None:
        """The Maildir and its tmp, new and cur directories are created."""
        maildir = self.mktemp()
        LocalMTA(maildir=maildir)
        self.assertEqual(sorted(os.listdir(maildir)), ["cur", "new", "tmp"])

    def test_maildirFile(self) -> None:
        """
        An accepted message is one private file in new/ named with its queue id,
        holding the content byte for byte; tmp/ is left empty.
        """
        mta = LocalMTA(maildir=self.mktemp())
        submit(Client(mta), b"Subject: x\r\n\r\n..dot\r\n")
        [message] = mta.messages
        assert mta.maildir is not None and message.path is not None
        [name] = os.listdir(os.path.join(mta.maildir, "new"))
        self.assertEqual(message.path, os.path.join(mta.maildir, "new", name))
        self.assertIn("Q" + message.queueId + ".", name)
        with open(message.path, "rb") as f:
            self.assertEqual(f.read(), b"Subject: x\r\n\r\n.dot\r\n")
        self.assertEqual(stat.S_IMODE(os.stat(message.path).st_mode), 0o600)
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "tmp")), [])

    def test_maildirWrittenThroughTmp(self) -> None:
        """While the content arrives it is in tmp/, and nothing is in new/."""
        mta = LocalMTA(maildir=self.mktemp())
        client = Client(mta)
        client.send(ENVELOPE + b"DATA\r\npartial\r\n")
        assert mta.maildir is not None
        [name] = os.listdir(os.path.join(mta.maildir, "tmp"))
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "new")), [])
        client.send(b".\r\n")
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "new")), [name])

    def test_connectionLostMidData(self) -> None:
        """A client that disconnects during DATA leaves no message and no file."""
        mta = LocalMTA(maildir=self.mktemp())
        client = Client(mta)
        client.send(ENVELOPE + b"DATA\r\npartial\r\n")
        client.close()
        self.assertEqual(mta.messages, [])
        assert mta.maildir is not None
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(mta.maildir, "new")), [])

    def test_noMaildir(self) -> None:
        """Without a Maildir the message is recorded in memory only."""
        mta = LocalMTA()
        submit(Client(mta), MESSAGE)
        self.assertIsNone(mta.messages[0].path)


class RawClient(Protocol):
    """A client that records what it receives and can wait for a given reply."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for waiting in self._waiting[:]:
            if waiting[0] in self.received:
                self._waiting.remove(waiting)
                waiting[1].callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost.callback(None)

    def waitFor(self, marker: bytes) -> Deferred[None]:
        """Fire once C{marker} has been received."""
        d: Deferred[None] = Deferred()
        self._waiting.append((marker, d))
        self.dataReceived(b"")
        return d


class LoopbackTests(TestCase):
    """Over a real socket on 127.0.0.1."""

    async def _listen(self, mta: LocalMTA) -> int:
        from twisted.internet import reactor

        port = await mta.listen(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[attr-defined, no-any-return]

    def test_sendmail(self) -> Deferred[None]:
        """
        Mail sent with twisted.mail's own client is accepted: the raw transcript is the
        client's dialogue byte for byte, a 5000-byte line and a dot-stuffed line survive,
        and the Maildir file holds the content.
        """

        async def go() -> None:
            from twisted.internet import reactor

            mta = LocalMTA(maildir=self.mktemp())
            port = await self._listen(mta)
            long = b"z" * 5000
            sent = b"Subject: hi\n\n" + long + b"\n.dot\n"
            result = await sendmail(
                "127.0.0.1",
                "alice@example.com",
                ["bob@example.net"],
                sent,
                senderDomainName="client.example",
                port=port,
                reactor=reactor,
            )
            self.assertEqual(result[0], 1)
            transcript = await mta.whenClosed(0)
            content = b"Subject: hi\r\n\r\n" + long + b"\r\n.dot\r\n"
            self.assertEqual(
                transcript,
                b"EHLO client.example\r\n"
                b"MAIL FROM:<alice@example.com>\r\n"
                b"RCPT TO:<bob@example.net>\r\n"
                b"DATA\r\n"
                + content.replace(b"\r\n.", b"\r\n..")
                + b".\r\nRSET\r\nQUIT\r\n",  # twisted.mail's client resets before QUIT
            )
            [message] = mta.messages
            self.assertEqual(message.content, content)
            assert message.path is not None
            with open(message.path, "rb") as f:
                self.assertEqual(f.read(), content)

        return Deferred.fromCoroutine(go())

    def test_dropAfterDataBytes(self) -> Deferred[None]:
        """
        Over a real socket, C{dropAfterDataBytes} cuts the connection in the middle of a
        large message: the client never gets a reply to it, and nothing is recorded.
        """

        async def go() -> None:
            from twisted.internet import reactor

            mta = LocalMTA()
            mta.dropAfterDataBytes = 100_000
            port = await self._listen(mta)
            client = RawClient()
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
            await connectProtocol(endpoint, client)
            assert client.transport is not None
            client.transport.write(ENVELOPE + b"DATA\r\n")
            await client.waitFor(b"354 ")
            client.transport.write((b"x" * 998 + b"\r\n") * 1000 + b".\r\n")
            await client.lost
            await mta.whenClosed(0)
            self.assertEqual(mta.messages, [])
            self.assertTrue(client.received.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"))
            self.assertGreaterEqual(len(mta.transcripts[0]), 100_000)

        return Deferred.fromCoroutine(go())


class ChunkingTests(SynchronousTestCase):
    """BDAT (RFC 3030), understood when CHUNKING is announced."""

    def test_chunksStoredAsSent(self) -> None:
        """
        Chunks are content as they are (a dot line included), answered 250 each; BDAT
        LAST's reply is the end-of-data reply; the bytes after a chunk are commands.
        """
        mta = LocalMTA(extensions={b"CHUNKING": []})
        client = Client(mta)
        client.send(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
        lines = client.send(b"BDAT 6\r\n.\r\nab\rBDAT 3 LAST\r\n\ncdNOOP\r\n")
        self.assertEqual(codes(lines), [b"250", b"250", b"250"])
        [message] = mta.messages
        self.assertEqual(message.content, b".\r\nab\r\ncd")
        self.assertIn(message.queueId.encode(), lines[1])

    def test_refusedChunkDiscarded(self) -> None:
        """A BDAT without MAIL gets 503 once its bytes are read; they are no commands."""
        client = Client(LocalMTA(extensions={b"CHUNKING": []}))
        self.assertEqual(codes(client.send(b"BDAT 6 LAST\r\nRSET\r\nNOOP\r\n")), [b"503", b"250"])

    def test_rsetDropsChunks(self) -> None:
        """RSET between chunks forgets the message."""
        mta = LocalMTA(extensions={b"CHUNKING": []})
        client = Client(mta)
        client.send(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 1\r\nxRSET\r\n")
        self.assertEqual(codes(client.send(b"BDAT 1 LAST\r\ny")), [b"503"])
        self.assertEqual(mta.messages, [])
