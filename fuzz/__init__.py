"""
Fuzz targets for mailproxy's parsers (issue 9, scope 5): see C{fuzz/README.md}.

L{fuzz.targets} holds the targets, plain functions of one C{bytes} input that raise on a
crash or a broken invariant; L{fuzz.run} runs one under atheris (libFuzzer), or replays
and mutates its corpus where atheris is not installed; L{fuzz.seed} writes the seed
corpus in C{fuzz/corpus/} from the sessions and messages of the tests.
"""
