"""
What the fuzzing and the session model of issue 9 found, each a regression test named for
what it protects (C{tests/test_session_model.py} is the model itself).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailproxy import session as core
from mailproxy.envelope import Session as SessionInfo
from mailproxy.filters import Stage, Verdict
from mailproxy.wire import Reply
from tests.test_session import CONFIG, visible

XFORWARD = b"XFORWARD NAME ADDR PORT HELO PROTO SOURCE"


class PipeliningBehindTheIntroductionTests(SynchronousTestCase):
    def test_commandsAfterEhloGoOnOnceTheClientIsNamed(self) -> None:
        """
        Found by the session model: with an MTA offering XFORWARD (not XCLIENT) the
        client's EHLO is answered once its name is looked up; the commands it pipelined
        behind the EHLO are handled then, not only when it sends more bytes (it waits for
        their replies: the session would hang until the idle timeout).
        """
        s = core.Session(CONFIG, SessionInfo("S1", "192.0.2.7", 40000),
                         policy=core.Policy(introduce=True))  # fmt: skip
        s.start()
        s.verdict(Stage.CONNECT, Verdict.accept())
        s.mtaConnected()
        s.mtaReply(Reply(220, (b"mta.test",)))
        s.clientData(b"EHLO c.example\r\nNOOP\r\nQUIT\r\n")
        s.verdict(Stage.HELO, Verdict.accept())
        effects = visible(s.mtaReply(Reply(250, (b"mta.test", b"PIPELINING", XFORWARD))))
        self.assertEqual(effects, [core.ResolveClient("192.0.2.7")])
        effects = visible(s.clientNamed("c.example", "c.example"))
        self.assertIn(core.SendMta(b"NOOP\r\n"), effects)
        self.assertIs(s.state, core.State.QUITTING)
