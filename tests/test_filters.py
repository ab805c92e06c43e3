"""
Tests for the built-in filters (access, size), the typed reading of filter options, and
the discovery of filters as C{twisted.plugin} dropins.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import mailproxy.plugins
from mailproxy.envelope import Envelope, Message, Session
from mailproxy.filters import Action, IFilter, IFilterFactory, OptionError, Stage, Verdict
from mailproxy.filters.access import AccessFilterFactory
from mailproxy.filters.options import Options
from mailproxy.filters.pipeline import filterFactories
from mailproxy.filters.size import SizeFilterFactory


def session(address: str = "198.51.100.9", helo: str | None = "client.example") -> Session:
    return Session("s1", address, 40000, helo=helo)


def summary(verdict: object) -> tuple[Action, int, str]:
    assert isinstance(verdict, Verdict)
    return verdict.action, verdict.code, verdict.enhanced


ACCEPT = (Action.ACCEPT, None, None)
REFUSED = (Action.REJECT, 550, "5.7.1")
TOO_BIG = (Action.REJECT, 552, "5.3.4")


class AccessTests(SynchronousTestCase):
    def build(self, **options: object) -> IFilter:
        built = AccessFilterFactory().build(options, Clock())
        self.assertTrue(verifyObject(IFilter, built))
        return built

    def connect(self, f: IFilter, address: str) -> tuple[Action, int, str]:
        return summary(f.checkConnect(session(address)))

    def test_ipv4(self) -> None:
        """An IPv4 client in a denied network is refused with 554 5.7.1 unless allowed."""
        f = self.build(
            deny_networks=["192.0.2.0/24", "203.0.113.5"], allow_networks=["192.0.2.7/32"]
        )
        self.assertEqual(self.connect(f, "192.0.2.1"), (Action.REJECT, 554, "5.7.1"))
        self.assertEqual(self.connect(f, "203.0.113.5"), (Action.REJECT, 554, "5.7.1"))
        self.assertEqual(self.connect(f, "192.0.2.7"), ACCEPT)
        self.assertEqual(self.connect(f, "198.51.100.1"), ACCEPT)
        verdict = f.checkConnect(session("192.0.2.1"))
        assert isinstance(verdict, Verdict)
        self.assertIn("[192.0.2.1]", verdict.text)

    def test_ipv6(self) -> None:
        """IPv6 networks deny and allow the same way, whatever the address's spelling."""
        f = self.build(deny_networks=["2001:db8::/32"], allow_networks=["2001:db8:1::/48"])
        self.assertEqual(self.connect(f, "2001:db8::5")[0], Action.REJECT)
        self.assertEqual(self.connect(f, "2001:DB8:0:0::5")[0], Action.REJECT)
        self.assertEqual(self.connect(f, "2001:db8:1::5"), ACCEPT)
        self.assertEqual(self.connect(f, "2001:db9::1"), ACCEPT)
        self.assertEqual(self.connect(f, "192.0.2.1"), ACCEPT)

    def test_ipv4Mapped(self) -> None:
        """A client on a dual-stack socket (::ffff:a.b.c.d) is matched as its IPv4 address."""
        f = self.build(deny_networks=["192.0.2.0/24"], allow_networks=["192.0.2.7"])
        self.assertEqual(self.connect(f, "::ffff:192.0.2.1")[0], Action.REJECT)
        self.assertEqual(self.connect(f, "::ffff:192.0.2.7"), ACCEPT)
        self.assertEqual(self.connect(f, "::ffff:198.51.100.1"), ACCEPT)

    def test_notAnAddress(self) -> None:
        """A client without an IP address (a UNIX socket) is not in any network."""
        f = self.build(deny_networks=["0.0.0.0/0", "::/0"])
        self.assertEqual(self.connect(f, ""), ACCEPT)
        self.assertEqual(self.connect(f, "unix"), ACCEPT)
        self.assertEqual(self.connect(f, "192.0.2.1")[0], Action.REJECT)

    def test_helo(self) -> None:
        """HELO names are matched by case-insensitive glob."""
        f = self.build(deny_helo=["*.invalid", "LOCALHOST"])
        for name in ("foo.invalid", "Mail.INVALID", "localhost", "LocalHost"):
            self.assertEqual(summary(f.checkHelo(session(helo=name))), REFUSED, name)
        for name in ("mx.example", "invalid", "localhost.example"):
            self.assertEqual(summary(f.checkHelo(session(helo=name))), ACCEPT, name)
        self.assertEqual(summary(f.checkHelo(session(helo=None))), ACCEPT)

    def test_senders(self) -> None:
        """Senders are matched case-insensitively, "<>" being the null sender; allow wins."""
        f = self.build(
            deny_senders=["*@spam.example", "<>"], allow_senders=["postmaster@spam.example"]
        )
        for sender in ("", "bob@spam.example", "Bob@SPAM.Example"):
            self.assertEqual(summary(f.checkMail(session(), Envelope(sender))), REFUSED, sender)
        for sender in ("POSTMASTER@spam.example", "bob@ok.example", "spam.example@ok.example"):
            self.assertEqual(summary(f.checkMail(session(), Envelope(sender))), ACCEPT, sender)
        verdict = f.checkMail(session(), Envelope(""))
        assert isinstance(verdict, Verdict)
        self.assertIn("Sender <>", verdict.text)

    def test_nullSenderAllowed(self) -> None:
        """A wildcard deny refuses the null sender too unless "<>" is allowed."""
        f = self.build(deny_senders=["*"], allow_senders=["<>"])
        self.assertEqual(summary(f.checkMail(session(), Envelope(""))), ACCEPT)
        self.assertEqual(summary(f.checkMail(session(), Envelope("a@b.example")))[0], Action.REJECT)

    def test_recipients(self) -> None:
        """Recipients are matched case-insensitively, with allow exceptions."""
        f = self.build(deny_recipients=["*@internal.example"], allow_recipients=["Help@*"])
        envelope = Envelope("a@b.example")
        self.assertEqual(
            summary(f.checkRcpt(session(), envelope, "Staff@Internal.Example")), REFUSED
        )
        self.assertEqual(summary(f.checkRcpt(session(), envelope, "help@internal.example")), ACCEPT)
        self.assertEqual(summary(f.checkRcpt(session(), envelope, "staff@public.example")), ACCEPT)

    def test_stages(self) -> None:
        """The filter asks only at the stages whose deny list is configured."""
        self.assertEqual(self.build().stages, frozenset())
        self.assertEqual(self.build(allow_networks=["192.0.2.0/24"]).stages, frozenset())
        self.assertEqual(self.build(deny_networks=["192.0.2.0/24"]).stages, {Stage.CONNECT})
        self.assertEqual(
            self.build(deny_helo=["x"], deny_recipients=["y"]).stages, {Stage.HELO, Stage.RCPT}
        )
        self.assertEqual(self.build(deny_senders=["x"]).stages, {Stage.MAIL})

    def test_badOptions(self) -> None:
        """A bad network, a non-list or an unknown key is an OptionError naming the key."""
        factory = AccessFilterFactory()
        for options, key in (
            ({"deny_networks": ["192.0.2.0/24", "192.0.2.300/32"]}, "deny_networks"),
            ({"allow_networks": ["example.org"]}, "allow_networks"),
            ({"deny_networks": "192.0.2.0/24"}, "deny_networks"),
            ({"deny_helo": ["ok", 5]}, "deny_helo"),
            ({"deny_senderz": []}, "deny_senderz"),
        ):
            error = self.assertRaises(OptionError, factory.build, options, Clock())
            self.assertEqual(error.key, key)


class SizeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.filter = SizeFilterFactory().build({"max_bytes": 1000}, Clock())

    def test_provides(self) -> None:
        """The size filter is an IFilter that checks MAIL and the message."""
        self.assertTrue(verifyObject(IFilter, self.filter))
        self.assertEqual(self.filter.stages, {Stage.MAIL, Stage.MESSAGE})

    def test_declaredSize(self) -> None:
        """A SIZE= over the limit is refused at MAIL with 552 5.3.4; at or under, accepted."""
        check = self.filter.checkMail
        self.assertEqual(
            summary(check(session(), Envelope("a@b", "BODY=8BITMIME SIZE=1001"))), TOO_BIG
        )
        self.assertEqual(summary(check(session(), Envelope("a@b", "SIZE=1000"))), ACCEPT)
        self.assertEqual(summary(check(session(), Envelope("a@b", ""))), ACCEPT)
        self.assertEqual(summary(check(session(), Envelope("a@b", "SIZE=huge"))), ACCEPT)

    def test_messageSize(self) -> None:
        """A message over the limit is refused with 552 5.3.4; at or under, accepted."""
        envelope = Envelope("a@b")
        self.assertEqual(
            summary(self.filter.checkMessage(session(), envelope, Message("/x", 1001))), TOO_BIG
        )
        self.assertEqual(
            summary(self.filter.checkMessage(session(), envelope, Message("/x", 1000))), ACCEPT
        )

    def test_badOptions(self) -> None:
        """max_bytes is required and must be a positive integer; nothing else is allowed."""
        factory = SizeFilterFactory()
        for options, key in (
            ({}, "max_bytes"),
            ({"max_bytes": 0}, "max_bytes"),
            ({"max_bytes": "10"}, "max_bytes"),
            ({"max_bytes": True}, "max_bytes"),
            ({"max_bytes": 1.5}, "max_bytes"),
            ({"max_bytes": 10, "limit": 5}, "limit"),
        ):
            error = self.assertRaises(OptionError, factory.build, options, Clock())
            self.assertEqual(error.key, key)


class OptionsTests(SynchronousTestCase):
    def test_strings(self) -> None:
        """A list or tuple of strings is read as a tuple; a missing key gives the default."""
        options = Options({"a": ["x", "y"], "b": ("z",)})
        self.assertEqual(options.strings("a"), ("x", "y"))
        self.assertEqual(options.strings("b"), ("z",))
        self.assertEqual(options.strings("c", ("d",)), ("d",))
        options.finish()

    def test_stringsWrongType(self) -> None:
        """A string, a number, or a list holding a non-string is refused, naming the key."""
        for value in ("x", 5, None, {"k": "v"}, ["x", 1], [["x"]]):
            error = self.assertRaises(OptionError, Options({"a": value}).strings, "a")
            self.assertEqual(error.key, "a")
            self.assertIn("must be a list of strings", error.message)

    def test_integer(self) -> None:
        """Integers are read with a default and a minimum."""
        options = Options({"n": 7})
        self.assertEqual(options.integer("n", minimum=1), 7)
        self.assertEqual(options.integer("m", default=3), 3)

    def test_integerWrongType(self) -> None:
        """Booleans, floats and strings are not integers; a value under the minimum is refused."""
        for value, words in (
            (True, "integer"),
            (1.0, "integer"),
            ("5", "integer"),
            (0, "at least 1"),
        ):
            error = self.assertRaises(OptionError, Options({"n": value}).integer, "n", minimum=1)
            self.assertEqual(error.key, "n")
            self.assertIn(words, error.message)
        error = self.assertRaises(OptionError, Options({}).integer, "n")
        self.assertEqual((error.key, error.message), ("n", "is required"))

    def test_unknownKey(self) -> None:
        """An unread key is refused, with a did-you-mean hint when one is close."""
        options = Options({"deny_senders": [], "deny_sendres": []})
        options.strings("deny_senders")
        options.strings("allow_senders")
        error = self.assertRaises(OptionError, options.finish)
        self.assertEqual(error.key, "deny_sendres")
        self.assertEqual(error.message, 'unknown option (did you mean "deny_senders"?)')

    def test_unknownKeyNoHint(self) -> None:
        """An unread key like nothing known has no hint."""
        options = Options({"colour": "blue"})
        options.strings("deny_senders")
        error = self.assertRaises(OptionError, options.finish)
        self.assertEqual((error.key, error.message), ("colour", "unknown option"))


class DiscoveryTests(SynchronousTestCase):
    def test_builtins(self) -> None:
        """The built-in filters are found as plugins, under their section names."""
        factories = filterFactories()
        self.assertIsInstance(factories["access"], AccessFilterFactory)
        self.assertIsInstance(factories["size"], SizeFilterFactory)
        for name, factory in factories.items():
            self.assertTrue(verifyObject(IFilterFactory, factory))
            self.assertTrue(IPlugin.providedBy(factory))
            self.assertEqual(factory.name, name)
        found = {f.name for f in getPlugins(IFilterFactory, mailproxy.plugins)}
        self.assertTrue({"access", "size"} <= found)


class ThirdPartyTests(TestCase):
    """A third-party filter, discovered by a fresh interpreter as the service would."""

    async def test_thirdParty(self) -> None:
        """
        A third party adds a filter by shipping one module in a C{mailproxy/plugins}
        directory (without C{__init__.py}) anywhere on C{sys.path}: a new interpreter
        with that directory's root on its path finds the factory through
        C{getPlugins(IFilterFactory, mailproxy.plugins)}, and so does filterFactories(),
        with nothing but the path set up for it.
        """
        root = os.path.abspath(self.mktemp())
        directory = os.path.join(root, "mailproxy", "plugins")
        os.makedirs(directory)
        with open(os.path.join(directory, "mailproxy_greylist_test.py"), "w") as f:
            f.write(
                textwrap.dedent(
                    """
                    from twisted.plugin import IPlugin
                    from zope.interface import implementer

                    from mailproxy.filters import BaseFilter, IFilterFactory

                    @implementer(IPlugin, IFilterFactory)
                    class Factory:
                        name = "greylist_test"

                        def build(self, options, reactor):
                            return BaseFilter()

                    greylist = Factory()
                    """
                )
            )
        discover = textwrap.dedent(
            """
            import json

            from twisted.plugin import getPlugins
            from zope.interface.verify import verifyObject

            import mailproxy
            import mailproxy.plugins
            from mailproxy.filters import IFilterFactory
            from mailproxy.filters.pipeline import filterFactories

            found = {f.name: f for f in getPlugins(IFilterFactory, mailproxy.plugins)}
            greylist = found["greylist_test"]
            assert verifyObject(IFilterFactory, greylist)
            print(json.dumps({
                "found": sorted(found),
                "module": type(greylist).__module__,
                "mailproxy": mailproxy.__file__,
                "registry": sorted(filterFactories()),
            }))
            """
        )
        ours = os.path.dirname(os.path.dirname(os.path.abspath(mailproxy.__file__)))
        out, err, status = await getProcessOutputAndValue(
            sys.executable,
            ["-c", discover],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([root, ours])},
        )
        self.assertEqual((status, err), (0, b""), err.decode(errors="replace"))
        result = json.loads(out)
        # The code under test, not an installed copy of mailproxy.
        self.assertEqual(result["mailproxy"], os.path.join(ours, "mailproxy", "__init__.py"))
        self.assertIn("greylist_test", result["found"])
        self.assertIn("access", result["found"])
        self.assertEqual(result["module"], "mailproxy.plugins.mailproxy_greylist_test")
        self.assertEqual(result["registry"], result["found"])
