"""
Run one fuzz target: C{python -m fuzz.run TARGET [--seconds N] [-- LIBFUZZER-ARGS...]}.

Under atheris (libFuzzer, coverage-guided: C{pip install atheris}, a binary wheel for
Linux x86-64) the target's seed corpus C{fuzz/corpus/TARGET} is read and new inputs go to
a scratch directory (or C{--grow}: into the seed corpus itself). A crash or broken
invariant prints the traceback, writes the input to C{--artifacts} (default: a scratch
directory, named in the output) and exits non-zero. Without atheris the seed corpus is
replayed and then randomly mutated for the time given: much weaker, but the same
invariants.

C{python -m fuzz.run TARGET FILE...} replays the given inputs (a crash file) once.
C{python -m fuzz.run --list} names the targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

#: The targets (L{fuzz.targets.TARGETS}), with libFuzzer's longest input for each (a MIME
#: message needs more room than a command).
MAX_LEN = {"commands": 4096, "replies": 4096, "data": 8192, "chunks": 8192,
           "mime": 32768, "headers": 8192, "headergrammar": 8192}  # fmt: skip
#: Targets whose module may not be there yet (the header grammar's), by that module.
OPTIONAL = {"headergrammar": "mailproxy.headergrammar"}
#: Targets without seeds of their own read another's.
SEEDS_OF = {"headergrammar": "headers"}


def available() -> list[str]:
    """The targets that can run here, found without importing their modules."""
    return [
        name for name in MAX_LEN
        if name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[name]) is not None
    ]  # fmt: skip
#: Per input: a target that takes longer, or more memory, than this is a finding too.
TIMEOUT_SECONDS = 10
RSS_LIMIT_MB = 1024


def _targets() -> dict[str, Callable[[bytes], None]]:
    from fuzz.targets import TARGETS

    return TARGETS


def _instrumented(atheris: object) -> dict[str, Callable[[bytes], None]]:
    with atheris.instrument_imports(include=["mailproxy", "fuzz", "email"]):  # type: ignore[attr-defined]
        return _targets()


def seeds(name: str) -> list[bytes]:
    """The seed corpus of target C{name}, in a stable order."""
    folder = CORPUS / name
    if not folder.is_dir():
        folder = CORPUS / SEEDS_OF.get(name, name)
    if not folder.is_dir():
        return []
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One random edit of C{data}: flip, insert, delete, duplicate, splice with a seed."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        at = rng.randint(0, len(out))
        if choice == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif choice == 1:
            out[at:at] = bytes([rng.choice(b"\r\n.\t \x00:<>=-+\x0b\x0c")])
        elif choice == 2 and out:
            del out[at : at + rng.randint(1, 8)]
        elif choice == 3 and out:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 32)]
        elif choice == 4 and pool:
            other = rng.choice(pool)
            cut = rng.randint(0, len(other))
            out[at:] = other[cut:]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 4))
    return bytes(out)


def _fallback(name: str, target: Callable[[bytes], None], seconds: float, artifacts: Path) -> int:
    pool = seeds(name) or [b""]
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")) or None)
    deadline = time.monotonic() + seconds
    runs = 0
    inputs = iter(pool)
    while True:
        data = next(inputs, None)
        if data is None:
            if time.monotonic() >= deadline:
                break
            data = _mutate(rng, rng.choice(pool), pool)
        runs += 1
        try:
            target(data)
        except Exception:
            artifacts.mkdir(parents=True, exist_ok=True)
            crash = artifacts / f"crash-{name}-{runs}"
            crash.write_bytes(data)
            traceback.print_exc()
            print(f"fuzz {name}: crash after {runs} runs, input in {crash}", file=sys.stderr)
            return 1
    print(f"fuzz {name}: {runs} runs in {seconds:.0f} s (no atheris: random mutations), no crash")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("target", nargs="?")
    parser.add_argument("inputs", nargs="*", help="replay these files once")
    parser.add_argument("--list", action="store_true", help="name the targets and exit")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    parser.add_argument("--grow", action="store_true", help="add new inputs to the seed corpus")
    parser.add_argument("--artifacts", type=Path, help="where crash inputs go")
    parser.add_argument("--no-atheris", action="store_true", help="the random fallback")
    args, libfuzzer = parser.parse_known_args(argv)
    libfuzzer = [a for a in libfuzzer if a != "--"]
    if args.list:
        print("\n".join(available()))
        return 0
    # Not through _targets(): under atheris the modules must first be imported instrumented.
    if args.target not in available():
        parser.error(f"target must be one of {', '.join(available())}")
    name = args.target
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-artifacts-"))
    if args.inputs:
        target = _targets()[name]
        for path in args.inputs:
            print(f"replaying {path}")
            target(Path(path).read_bytes())
        return 0
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is None or args.no_atheris:
        return _fallback(name, _targets()[name], args.seconds, artifacts)
    target = _instrumented(atheris)[name]
    scratch = CORPUS / name if args.grow else Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    scratch.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"fuzz {name}: atheris for {args.seconds:.0f} s; new inputs in {scratch}, "
          f"crashes in {artifacts}", flush=True)  # fmt: skip
    flags = [
        f"-max_total_time={int(args.seconds)}",
        f"-max_len={MAX_LEN.get(name, 4096)}",
        f"-timeout={TIMEOUT_SECONDS}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        *libfuzzer,
    ]
    seedDir = CORPUS / name if (CORPUS / name).is_dir() else CORPUS / SEEDS_OF.get(name, name)
    corpora = [str(scratch)] + ([str(seedDir)] if not args.grow else [])
    atheris.Setup([sys.argv[0], *flags, *corpora], target)
    atheris.Fuzz()  # exits the process: 0 at the time limit, non-zero on a finding
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
