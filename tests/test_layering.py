"""
The layering of the C{mailproxy} package, read from its source with L{ast}: no two
modules import each other, however indirectly, and the sans-IO session core imports
nothing from Twisted.

Every import statement counts, wherever it is: at module level, inside a function
(a late import is still a dependency, only a hidden one), and under C{TYPE_CHECKING}
(a cycle that only the type checker sees is still two layers that know each other).
The one exception is a module's C{if __name__ == "__main__":} block: it runs only when
the file is the program (C{python -m ...}), never when the module is imported, so it is
a separate program that happens to live in the file (C{python -m mailproxy.quarantine}
forwards to L{mailproxy.quarantinectl} that way).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator, Mapping

from twisted.trial.unittest import SynchronousTestCase

import mailproxy

PACKAGE = "mailproxy"
ROOT = os.path.dirname(os.path.abspath(mailproxy.__file__))


def moduleFiles(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """Every module of the package under C{root}, by dotted name, with its file's path."""
    found = {}
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        relative = os.path.relpath(directory, root)
        parts = [package] + ([] if relative == "." else relative.split(os.sep))
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            stem = name[: -len(".py")]
            dotted = ".".join(parts if stem == "__init__" else [*parts, stem])
            found[dotted] = os.path.join(directory, name)
    return found


def _isMainBlock(node: ast.AST) -> bool:
    """Whether C{node} is C{if __name__ == "__main__":}."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    return (
        isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of C{tree}, but those of its C{if __name__ == "__main__":} blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        pending.extend(child for child in ast.iter_child_nodes(node) if not _isMainBlock(child))


def importedNames(tree: ast.AST, module: str, isPackage: bool) -> Iterator[str]:
    """
    The dotted names a module's import statements name (relative ones resolved): for
    C{from a.b import c}, both C{a.b} and C{a.b.c}, since C{c} may be a module.
    """
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                # A package's own name is the anchor of its relative imports.
                base = base if isPackage else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"


def importGraph(files: Mapping[str, str]) -> dict[str, set[str]]:
    """
    Which package modules each package module imports. Importing C{a.b.c} runs
    C{a/__init__.py} and C{a/b/__init__.py} first: those count as imported too.
    """
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
        isPackage = os.path.basename(path) == "__init__.py"
        edges: set[str] = set()
        for name in importedNames(tree, module, isPackage):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                candidate = ".".join(parts[:end])
                if candidate in files:
                    edges.add(candidate)
        edges.discard(module)  # a module importing itself (under __main__) is no cycle
        graph[module] = edges
    return graph


def findCycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of C{graph} as C{[a, b, ..., a]}, or L{None} if it has none."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # A depth-first walk; path holds the modules being visited, in order.
        path = [start]
        pending = [iter(sorted(graph.get(start, ())))]
        while pending:
            successor = next(pending[-1], None)
            if successor is None:
                done.add(path.pop())
                pending.pop()
            elif successor in path:
                return [*path[path.index(successor) :], successor]
            elif successor not in done:
                path.append(successor)
                pending.append(iter(sorted(graph.get(successor, ()))))
    return None


def importsOf(path: str, prefix: str) -> list[str]:
    """The import statements of a file naming C{prefix} or a module under it, as text."""
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(name == prefix or name.startswith(prefix + ".") for name in names):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


class LayeringTests(SynchronousTestCase):
    """The import structure of the package."""

    def test_moduleFiles(self) -> None:
        """The walk finds the package's modules by their dotted names."""
        files = moduleFiles()
        for module in ("mailproxy", "mailproxy.relay", "mailproxy.filters", "mailproxy.plugins"):
            self.assertIn(module, files)

    def test_findCycle(self) -> None:
        """The cycle finder finds an indirect cycle, and none where there is none."""
        self.assertEqual(
            findCycle({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}),
            ["a", "b", "c", "a"],
        )
        self.assertIsNone(findCycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}))

    def test_graphSeesEveryImport(self) -> None:
        """
        Late imports (inside functions), C{from package import module}, relative imports
        and the packages a dotted import runs all count as edges; the imports of a
        C{__main__} block do not.
        """
        root = self.mktemp()
        os.makedirs(os.path.join(root, "sub"))
        sources = {
            "__init__.py": "",
            "a.py": "def late():\n    from p import b\n",
            "b.py": "from .sub import c\n",
            "sub/__init__.py": "",
            "sub/c.py": "from .. import d\n",
            "d.py": "import p.sub.c\n",
            "e.py": 'import p.a\nif __name__ == "__main__":\n    from p import f\n',
            "f.py": "from p import e\n",
        }
        for name, source in sources.items():
            with open(os.path.join(root, name), "w") as f:
                f.write(source)
        graph = importGraph(moduleFiles(root, "p"))
        self.assertEqual(graph["p.a"], {"p", "p.b"})
        self.assertEqual(graph["p.b"], {"p", "p.sub", "p.sub.c"})
        self.assertEqual(graph["p.sub.c"], {"p", "p.d"})
        self.assertEqual(graph["p.e"], {"p", "p.a"})
        self.assertEqual(findCycle(graph), ["p.sub.c", "p.d", "p.sub.c"])

    def test_noImportCycle(self) -> None:
        """No module of the package imports itself through others."""
        cycle = findCycle(importGraph(moduleFiles()))
        if cycle is not None:
            self.fail("import cycle: " + " -> ".join(cycle))

    def test_filtersImportNoFilter(self) -> None:
        """
        A built-in filter module (one the built-in dropin registers) imports no other
        filter module: what they share lives in support modules.
        """
        files = moduleFiles()
        graph = importGraph(files)
        builtin = graph["mailproxy.plugins.mailproxy_builtin"]
        filters = {m for m in builtin if m.startswith("mailproxy.filters.")}
        self.assertIn("mailproxy.filters.access", filters)
        self.assertNotIn("mailproxy.filters.support", filters)
        found = {
            module: sorted(graph[module] & filters) for module in filters if graph[module] & filters
        }
        self.assertEqual(found, {})

    def test_oneWayToThreads(self) -> None:
        """
        Blocking work reaches the thread pool one way only, L{inThreadPool} in
        C{mailproxy/filters/support.py} (and the test reactor that provides a pool):
        no other module names Twisted's thread functions.
        """
        threaded = {
            "deferToThread",
            "deferToThreadPool",
            "callInThread",
            "callInThreadWithCallback",
            "getThreadPool",
            "twisted.internet.threads",
        }
        allowed = {"mailproxy.filters.support", "mailproxy.testing_threads"}
        found = {}
        for module, path in moduleFiles().items():
            if module in allowed:
                continue
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
            names = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Name):
                    names.add(node.id)
                elif isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.ImportFrom):
                    names.add(node.module or "")
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
            if names & threaded:
                found[module] = sorted(names & threaded)
        self.assertEqual(found, {})

    def test_sessionImportsNoTwisted(self) -> None:
        """The sans-IO session core, C{mailproxy/session.py}, imports nothing from Twisted."""
        path = os.path.join(ROOT, "session.py")
        if not os.path.exists(path):
            raise self.skipTest("mailproxy/session.py does not exist yet")
        self.assertEqual(importsOf(path, "twisted"), [])
