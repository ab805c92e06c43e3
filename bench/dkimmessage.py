"""
Benchmark: the dkim filter's peak memory and time on one big signed message.

    PYTHONPATH=. .venv/bin/python bench/dkimmessage.py [--size-mb 100]

Three processes, so that each one's memory is its own:

  1. C{--generate}: writes a message of C{--size-mb} MB (76-character lines) to a
     temporary spool file and signs it with dkimpy (rsa-sha256, relaxed/relaxed, a key
     made for the run; dkimpy's signer holds the whole message: this process is not the
     one measured);
  2. C{--dns}: the in-process DNS server of the tests (L{tests.dnsserver}), serving the
     key record on 127.0.0.1;
  3. C{--verify}: a fresh process that builds the dkim filter from its options (as the
     proxy does, with the reactor's thread pool and a C{twisted.names} resolver), checks
     the spooled message, and prints the result, the time and its own peak RSS (VmHWM).

The filter streams the body from the spool to compute the body hash, so the peak RSS
stays flat whatever the size; the target is below 80 MB for 100 MB.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
PEAK_RSS_TARGET_MB = 80.0


def peakRSS() -> float:
    """This process's peak resident set size, in MB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def generate(path: str, sizeMB: int) -> None:
    """Write the signed message to C{path}, and its key record to C{path}.json."""
    import dkim  # type: ignore[import-untyped]

    from tests.test_dkim import rsaKey

    private, record = rsaKey()
    header = (
        b"From: Bench <bench@bench.example>\r\nTo: sink@sink.example\r\n"
        b"Subject: a big signed message\r\nMessage-ID: <big@bench.example>\r\n\r\n"
    )
    line = base64.b64encode(secrets.token_bytes(57)) + b"\r\n"  # 76 characters
    body = line * (sizeMB * MIB // len(line))
    message = header + body
    field = dkim.sign(
        message, b"big", b"bench.example", private, canonicalize=(b"relaxed", b"relaxed")
    )
    with open(path, "wb") as f:
        f.write(field)
        f.write(message)
    Path(path + ".json").write_text(json.dumps({"big._domainkey.bench.example": record}))


def serveDNS(path: str) -> None:
    """Serve the key record; print the resolver address; run until killed."""
    from twisted.internet import reactor

    from tests.dnsserver import DNSServer, txt

    records = json.loads(Path(path + ".json").read_text())
    server = DNSServer({name: [txt(value)] for name, value in records.items()})
    server.start()
    print(server.resolver, flush=True)
    reactor.run()  # type: ignore[attr-defined]


def verify(path: str, resolver: str) -> None:
    """Check the message with the dkim filter; print a JSON line of what happened."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred

    from mailproxy.envelope import Envelope, Message, Session
    from mailproxy.filters.dkim import DKIMFilterFactory

    before = peakRSS()
    f = DKIMFilterFactory().build({"resolver": resolver, "dns_timeout": 5.0}, reactor)
    envelope = Envelope("bench@bench.example")
    message = Message(path, os.path.getsize(path))
    out: dict[str, object] = {}

    async def run() -> None:
        start = time.perf_counter()
        await f.checkMessage(Session("bench", "127.0.0.1", 1), envelope, message)
        out["seconds"] = round(time.perf_counter() - start, 2)

    def done(result: object) -> None:
        out["results"] = envelope.notes.get("authentication-results")
        reactor.stop()  # type: ignore[attr-defined]

    d: Deferred[None] = ensureDeferred(run())
    d.addBoth(done)
    reactor.run()  # type: ignore[attr-defined]
    out["peak_rss_mb_before"] = round(before, 1)
    out["peak_rss_mb"] = round(peakRSS(), 1)
    out["message_mb"] = round(message.size / MIB, 1)
    print(json.dumps(out), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--generate", metavar="PATH")
    parser.add_argument("--dns", metavar="PATH")
    parser.add_argument("--verify", metavar="PATH")
    parser.add_argument("--resolver")
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.size_mb)
        return 0
    if args.dns:
        serveDNS(args.dns)
        return 0
    if args.verify:
        verify(args.verify, args.resolver)
        return 0
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory(prefix="mailproxy-bench-dkim-") as directory:
        path = os.path.join(directory, "message")
        print(f"generating and signing a {args.size_mb} MB message ...", flush=True)
        subprocess.run([*me, "--generate", path, "--size-mb", str(args.size_mb)], check=True)
        dns = subprocess.Popen([*me, "--dns", path], stdout=subprocess.PIPE, text=True)
        try:
            assert dns.stdout is not None
            resolver = dns.stdout.readline().strip()
            found = subprocess.run(
                [*me, "--verify", path, "--resolver", resolver],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            dns.terminate()
            dns.wait(10)
        result = json.loads(found.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    peak = float(result["peak_rss_mb"])
    ok = peak < PEAK_RSS_TARGET_MB and any(
        str(r).startswith("dkim=pass") for r in result["results"] or ()
    )
    print(
        f"peak RSS {peak:.1f} MB (target < {PEAK_RSS_TARGET_MB:.0f} MB): {'ok' if ok else 'NOT MET'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
