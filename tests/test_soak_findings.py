"""
Regressions for what bench/soak.py found, each on the session core alone (events in,
effects out), as the soak saw it happen over real sockets.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailproxy import session as core
from mailproxy.filters import Stage, Verdict
from mailproxy.wire import Reply
from tests.test_session import greeted, visible


def filtering() -> core.Session:
    """A session whose message is complete and waiting for the message filters."""
    s = greeted()
    s.clientData(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
    s.verdict(Stage.MAIL, Verdict.accept())
    s.mtaReply(Reply(250, (b"2.1.0 Ok",)))
    s.verdict(Stage.RCPT, Verdict.accept())
    s.mtaReply(Reply(250, (b"2.1.5 Ok",)))
    s.spoolOpened()
    s.clientData(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    s.spoolClosed()
    assert s.state is core.State.FILTERING, s.state
    return s


class VerdictAfterCloseTests(SynchronousTestCase):
    """
    The MTA went away (restarted) while a message was with the filters: the client got 421
    and the spool file was removed, then the filters' verdict came. The soak saw an
    AssertionError ("internal error", logged critical with a traceback) for every such
    session: the verdict was applied to a transaction that was gone.
    """

    def lostThenVerdict(self, verdict: Verdict) -> list[core.Effect]:
        s = filtering()
        lost = visible(s.mtaLost("Connection was closed cleanly."))
        self.assertIn(
            core.SendClient(b"421 4.4.2 proxy.test Error: lost connection to the MTA\r\n"), lost
        )
        self.assertIn(core.SpoolRemove(), lost)
        self.assertIn(s.state, (core.State.CLOSING, core.State.CLOSED))
        return visible(s.verdict(Stage.MESSAGE, verdict))

    def test_acceptAfterMtaLost(self) -> None:
        """An accepting verdict after the MTA was lost releases nothing and says nothing."""
        self.assertEqual(self.lostThenVerdict(Verdict.accept()), [])

    def test_refusalAfterMtaLost(self) -> None:
        """A refusal (a tempfail from a filter that found its spool file gone) after the MTA
        was lost: no second reply to the client, no quarantine, no RSET."""
        tempfail = Verdict.tempfail("Message checks temporarily unavailable")
        self.assertEqual(self.lostThenVerdict(tempfail), [])
