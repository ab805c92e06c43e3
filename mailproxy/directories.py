"""
The directories mailproxy writes in: the spool and the quarantine.

L{mailproxy.config.load} only checks that they can be used. They are created (mode 0700)
when the service starts: under twistd in C{privilegedStartService}, still as root, where
with C{-u}/C{-g} they are also handed over to that user before twistd drops privileges.
L{check} tells, without touching anything, whether L{prepare} would succeed, so that the
usual mistakes stop start-up while twistd still parses its options.
"""

from __future__ import annotations

import os
import pwd
import stat

from mailproxy.config import Config, ConfigError

__all__ = ["check", "owner", "prepare"]


def _directories(config: Config) -> dict[str, str]:
    """The directories of a configuration, each with its key."""
    found = {config.spoolDir: "proxy.spool_dir"}
    if config.quarantine.dir is not None:
        found.setdefault(config.quarantine.dir, "quarantine.dir")
    return found


def owner(uid: int | None, gid: int | None) -> tuple[int, int] | None:
    """Whom to hand the directories to: twistd's C{-u} user when we run as root, else none."""
    if uid is None or uid == 0 or os.getuid() != 0:
        return None
    return uid, pwd.getpwuid(uid).pw_gid if gid is None else gid


def check(config: Config, uid: int | None = None, gid: int | None = None) -> None:
    """
    Whether L{prepare} would succeed, changing nothing: with twistd's C{-u} as root, each
    existing directory must be that user's (mode 0700) or one L{prepare} hands over.

    @param uid: twistd's C{-u} user, or L{None}.
    @param gid: twistd's C{-g} group, or L{None} for the user's own group.
    @raise ConfigError: naming the key of a directory the user could not write in.
    """
    _handOver(config, owner(uid, gid), act=False)


def prepare(config: Config, uid: int | None = None, gid: int | None = None) -> None:
    """
    Create the missing directories (mode 0700); as root with twistd's C{-u} user, hand
    over to that user each directory that root owns and that holds nothing else (just
    created, as a missing one is); any other must already be the user's.

    @param uid: twistd's C{-u} user, or L{None}: create only.
    @param gid: twistd's C{-g} group, or L{None} for the user's own group.
    @raise ConfigError: naming the key of a directory that cannot be created, or that
        the user could not write in.
    """
    directories = _directories(config)
    # The shallowest first: a quarantine inside the spool needs the spool.
    for path in sorted(directories, key=len):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path):
                raise ConfigError(
                    config.path, directories[path], f"{path!r} exists and is not a directory"
                ) from None
        except OSError as e:
            raise ConfigError(
                config.path, directories[path], f"cannot create {path!r}: {e.strerror}"
            ) from None
    _handOver(config, owner(uid, gid), act=True)


def _handOver(config: Config, owner: tuple[int, int] | None, act: bool) -> None:
    """
    Check (and if C{act}, make) each directory the user's; a missing one counts as
    root's and empty, since L{prepare} creates it so.
    """
    if owner is None:
        return
    uid, gid = owner
    directories = _directories(config)
    # The deepest first: a quarantine inside the spool is handed over before the spool.
    for path in sorted(directories, key=len, reverse=True):
        key = directories[path]
        try:
            info = os.stat(path)
            contents = {os.path.join(path, name) for name in os.listdir(path)}
            owned = info.st_uid
            if owned == 0 and contents <= directories.keys():
                if act:
                    os.chown(path, uid, gid)
                    info = os.stat(path)
                    owned = info.st_uid
                else:
                    owned = uid
        except FileNotFoundError:
            if not act:
                continue  # prepare creates it empty, then hands it over
            raise ConfigError(config.path, key, f"{path!r} vanished while starting") from None
        except OSError as e:
            raise ConfigError(
                config.path, key, f"cannot hand {path!r} over: {e.strerror}"
            ) from None
        if owned != uid or info.st_mode & 0o700 != 0o700:
            raise ConfigError(
                config.path,
                key,
                f"{path!r} must belong to uid {uid} (twistd -u) with mode 0700; it belongs to "
                f"uid {owned}, mode {stat.S_IMODE(info.st_mode):04o}",
            )
