"""
The fuzz targets (C{fuzz/}) on their corpus, as a quick regression run: every seed and
every input the fuzzers kept (a crash they found, once fixed, is kept there too) passes
each target's invariants. The long runs are C{python -m fuzz.run TARGET}; see
C{fuzz/README.md}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from fuzz import run, targets


class CorpusTests(SynchronousTestCase):
    def test_targetsNamed(self) -> None:
        """The runner names every target (it must, before importing them instrumented)."""
        self.assertEqual(run.available(), list(targets.TARGETS))
        self.assertLessEqual(set(targets.TARGETS), set(run.MAX_LEN))

    def test_corpus(self) -> None:
        """Every input of each target's corpus passes the target; each corpus has seeds."""
        for name, target in targets.TARGETS.items():
            inputs = run.seeds(name)
            self.assertGreater(len(inputs), 10, name)
            for data in inputs:
                target(data)

    def test_truncatedInputs(self) -> None:
        """Inputs too short for their choices (flags, cuts) are payloads all the same."""
        for target in targets.TARGETS.values():
            for data in (b"", b"\x00", b"\xff\x07", b"\x01\x03\x80"):
                target(data)
