"""
The Public Suffix List, for the filters that reduce a name to the domain it is
registered under: DMARC's organisational domain (RFC 7489 §3.2) and the SURBL filter's
lookup key.

The list is the one the C{publicsuffixlist} package bundles (kept up to date by its
releases; no download at run time). Loading it takes a few milliseconds and a few MB,
so each section (the whole list, or only its ICANN part) is loaded once per process, on
first use.
"""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList


@functools.cache
def _list(icannOnly: bool) -> PublicSuffixList:
    return PublicSuffixList(only_icann=icannOnly)


def registeredDomain(name: str, icannOnly: bool = False) -> str | None:
    """
    The domain C{name} is registered under, lower-case, without a trailing dot:
    C{a.b.example.co.uk} → C{example.co.uk}; None for a public suffix itself, a single
    label, or a name with an empty label.

    @param icannOnly: use only the ICANN section of the list (the registries' own
        suffixes), not the private one (C{blogspot.com}, C{github.io}, ...).
    """
    name = name.lower().rstrip(".")
    if not name or len(name) > 253 or "" in name.split("."):
        return None
    found = _list(icannOnly).privatesuffix(name)
    return str(found) if found is not None else None
