"""
L{mailproxy.directories}: the spool and quarantine directories are made when the service
starts, not when the configuration is read. (Their hand-over to twistd's C{-u} user needs
root: L{tests.system.test_service.HandOverTests}.)
"""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from mailproxy import directories
from mailproxy.config import Config, ConfigError, QuarantineSettings


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class PrepareTests(SynchronousTestCase):
    def config(self, spool: str, quarantine: str | None = None) -> Config:
        return Config(
            path="test.toml",
            listen=("tcp:0",),
            upstream="tcp:host=127.0.0.1:port=1",
            hostname="proxy.test",
            spoolDir=spool,
            quarantine=QuarantineSettings(dir=quarantine),
        )

    def test_created(self) -> None:
        """
        Missing directories are made with mode 0700, whatever the umask; a quarantine
        inside the spool after the spool.
        """
        spool = os.path.abspath(self.mktemp())
        quarantine = os.path.join(spool, "quarantine")
        self.addCleanup(os.umask, os.umask(0o002))
        directories.prepare(self.config(spool, quarantine))
        self.assertEqual((mode(spool), mode(quarantine)), (0o700, 0o700))

    def test_existingKept(self) -> None:
        """An existing directory is used as it is: its mode and its files stay."""
        spool = os.path.abspath(self.mktemp())
        os.mkdir(spool, 0o750)
        open(os.path.join(spool, "keep"), "w").close()
        directories.prepare(self.config(spool))
        self.assertEqual((mode(spool), os.listdir(spool)), (0o750, ["keep"]))

    def test_notADirectory(self) -> None:
        """A file where a directory should be is a ConfigError naming its key."""
        spool = os.path.abspath(self.mktemp())
        os.mkdir(spool)
        quarantine = os.path.join(spool, "quarantine")
        open(quarantine, "w").close()
        error = self.assertRaises(ConfigError, directories.prepare, self.config(spool, quarantine))
        self.assertEqual(error.key, "quarantine.dir")
        self.assertIn("exists and is not a directory", str(error))

    def test_cannotCreate(self) -> None:
        """A directory that cannot be made is a ConfigError naming its key."""
        spool = os.path.join(os.path.abspath(self.mktemp()), "missing", "spool")
        error = self.assertRaises(ConfigError, directories.prepare, self.config(spool))
        self.assertEqual(
            str(error),
            f"test.toml: proxy.spool_dir: cannot create {spool!r}: No such file or directory",
        )

    def test_checkChangesNothing(self) -> None:
        """check() says whether prepare() would succeed, and creates nothing."""
        spool = os.path.abspath(self.mktemp())
        directories.check(self.config(spool, os.path.join(spool, "quarantine")), os.getuid())
        self.assertFalse(os.path.lexists(spool))
