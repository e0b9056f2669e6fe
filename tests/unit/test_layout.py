"""Tests that pin the layout of the cserver package: no import cycle among its
modules, no module over 400 lines, no import inside a function but of the
optional extras and the reactor.

They read the sources (with ``ast``, nothing is imported), walking every
``.py`` file under ``cserver/`` as it is today, so they follow the package as
modules are added, split or moved.  Each failure lists every offender at once."""

import ast
import os
import pathlib

from twisted.trial.unittest import SynchronousTestCase

import cserver

#: The longest a module may be, in lines.
MAX_LINES = 400

#: What a function may import: the optional extras (TLS, metrics, the fuzzer)
#: and the reactor (which must not be imported, hence installed, when a module
#: is: twistd's -r and pytest-twisted install their own).  A name matches an
#: entry equal to it or to one of its parent packages.
LAZY_IMPORTS_ALLOWED = (
    # TLS: pyOpenSSL, and what needs it.
    "OpenSSL",
    "cryptography",
    "service_identity",
    "twisted.internet.ssl",
    "twisted.internet._sslverify",
    "twisted.protocols.tls",
    "cserver.tls",
    # Metrics: prometheus_client, and what needs it.
    "prometheus_client",
    "cserver.metrics",
    # The fuzzer.
    "atheris",
    # The global reactor.
    "twisted.internet.reactor",
)


def package_directory():
    """
    The cserver package's directory: the checkout's (these tests pin the
    sources), else the one imported.
    """
    checkout = pathlib.Path(__file__).resolve().parents[2] / "cserver"
    if (checkout / "__init__.py").exists():
        return checkout
    return pathlib.Path(cserver.__file__).resolve().parent


def package_modules():
    """
    Every module of the package: a dict of dotted name -> path, the package
    ``__init__`` files under their package's name.
    """
    root = package_directory()
    modules = {}
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            name for name in subdirectories
            if (pathlib.Path(directory, name) / "__init__.py").exists()
        )
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = pathlib.Path(directory, name)
            parts = ("cserver",) + path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def relative_path(path):
    """``path`` relative to the checkout, for messages."""
    return os.path.relpath(path, package_directory().parent)


def parse(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test):
    """Whether an ``if`` test is ``TYPE_CHECKING`` (or ``typing.TYPE_CHECKING``)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_imports(tree):
    """
    The import statements of a module that run when it is imported: at
    module level, in class bodies and under module-level ``if``/``try``/
    ``with``, but not in functions, nor under ``if TYPE_CHECKING:``.
    """
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.orelse:
                    visit_statement(statement)
                continue
            visit_statement(child)

    def visit_statement(child):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child)

    visit(tree)
    return found


def function_imports(tree):
    """The import statements inside a function (or lambda) body, at any depth."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, inside)

    visit(tree, False)
    return found


def absolute_module(statement, module, is_package):
    """
    The absolute module an ``ImportFrom`` names (resolving ``from . import``
    and ``from .x import``), from a module named ``module``.
    """
    if not statement.level:
        return statement.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if statement.level > 1:
        base = base[: len(base) - (statement.level - 1)]
    return ".".join(base + ([statement.module] if statement.module else []))


def imported_names(statement, module, is_package):
    """
    The dotted names an import statement imports: ``import a.b`` -> a.b;
    ``from a import b, c`` -> a.b, a.c (each may be a module or a name in a).
    """
    if isinstance(statement, ast.Import):
        return [alias.name for alias in statement.names]
    source = absolute_module(statement, module, is_package)
    return [f"{source}.{alias.name}" if alias.name != "*" else source
            for alias in statement.names]


def internal_targets(statement, module, is_package, modules):
    """
    The package's modules an import statement imports at once: for each name
    it imports, the module of that name (``from cserver.journal import
    FileJournal`` -> cserver.journal; ``from cserver import tls`` ->
    cserver.tls; ``from cserver import __version__`` -> cserver).
    """
    targets = []
    for name in imported_names(statement, module, is_package):
        if name != "cserver" and not name.startswith("cserver."):
            continue
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            targets.append(name)
    return targets


def import_graph(modules):
    """
    The module-level imports among the package's modules: a dict of module ->
    {imported module: line of the first statement importing it}.
    """
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = {}
        for statement in import_time_imports(parse(path)):
            for target in internal_targets(statement, module, is_package, modules):
                edges.setdefault(target, statement.lineno)
        graph[module] = edges
    return graph


def strongly_connected(graph):
    """Tarjan's strongly connected components of ``graph``, in a stable order."""
    index, lowlink, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node):
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def cycle_in(component, graph):
    """One cycle through the first module of a strongly connected component."""
    members = set(component)
    start = component[0]
    # Breadth-first from start's targets back to start, inside the component.
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node]):
            if target not in members:
                continue
            if target == start:
                return paths[node] + [start]
            if target not in paths:
                paths[target] = paths[node] + [target]
                queue.append(target)
    raise AssertionError(f"no cycle in {component}")


def describe_cycle(cycle, graph, modules):
    """``a (a.py:3) -> b (b.py:7) -> a``: each hop with the line that imports."""
    hops = [
        f"{module} ({relative_path(modules[module])}:{graph[module][target]})"
        for module, target in zip(cycle, cycle[1:], strict=False)
    ]
    return " -> ".join(hops + [cycle[-1]])


def allowed_lazily(name):
    return any(name == allowed or name.startswith(allowed + ".")
               for allowed in LAZY_IMPORTS_ALLOWED)


class PackageWalkTests(SynchronousTestCase):
    """What the layout tests walk."""

    def test_walk_finds_the_package(self):
        """The walk finds the package itself and its plain modules, under
        their dotted names, so that an empty walk cannot pass the tests below."""
        modules = package_modules()
        self.assertIn("cserver", modules)
        self.assertIn("cserver.protocol", modules)
        self.assertGreater(len(modules), 10)
        for name, path in modules.items():
            self.assertTrue(path.exists(), name)

    def test_relative_imports_resolve(self):
        """``from . import x`` and ``from .x import y`` in a module and in a
        package's ``__init__`` resolve to absolute names, so a cycle written
        with relative imports is seen."""
        tree = ast.parse("from . import a\nfrom .b import c\nfrom .. import d\n")
        statements = tree.body
        self.assertEqual(imported_names(statements[0], "cserver.journal.file", False),
                         ["cserver.journal.a"])
        self.assertEqual(imported_names(statements[1], "cserver.journal", True),
                         ["cserver.journal.b.c"])
        self.assertEqual(imported_names(statements[2], "cserver.journal.file", False),
                         ["cserver.d"])

    def test_cycle_finder(self):
        """The cycle finder reports a cycle in a made-up graph with the lines
        of its imports, and finds none in a graph without one."""
        graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7, "d": 1}, "d": {}}
        components = [c for c in strongly_connected(graph) if len(c) > 1]
        self.assertEqual(components, [["a", "b", "c"]])
        self.assertEqual(cycle_in(components[0], graph), ["a", "b", "c", "a"])
        acyclic = {"a": {"b": 1}, "b": {"c": 1}, "c": {}}
        self.assertEqual([c for c in strongly_connected(acyclic) if len(c) > 1], [])

    def test_import_time_imports_skip_functions_and_type_checking(self):
        """An import in a function or under ``if TYPE_CHECKING:`` does not run
        at import time; one under a module-level ``try`` or in a class body
        does."""
        tree = ast.parse(
            "import a\n"
            "try:\n    import b\nexcept ImportError:\n    b = None\n"
            "if TYPE_CHECKING:\n    import c\n"
            "class K:\n    import d\n"
            "def f():\n    import e\n"
        )
        names = [alias.name for statement in import_time_imports(tree)
                 for alias in statement.names]
        self.assertEqual(names, ["a", "b", "d"])
        names = [alias.name for statement in function_imports(tree)
                 for alias in statement.names]
        self.assertEqual(names, ["e"])


class LayoutTests(SynchronousTestCase):
    """The package's shape: an import graph without cycles, short modules,
    imports at the top."""

    def test_no_import_cycle(self):
        """No cycle among the package's module-level imports (a package's
        ``__init__`` counts as the package): every module imports only modules
        below it.  The failure gives one cycle for each group of modules
        importing each other, with the file and line of every import in it."""
        modules = package_modules()
        graph = import_graph(modules)
        cycles = []
        for component in strongly_connected(graph):
            if len(component) > 1:
                cycles.append(describe_cycle(cycle_in(component, graph), graph, modules))
        if cycles:
            self.fail(f"{len(cycles)} import cycle(s) among cserver's modules:\n  "
                      + "\n  ".join(cycles))

    def test_modules_are_short(self):
        """No module of the package is over MAX_LINES (400) lines: a longer one
        does more than one job.  The failure lists every one, longest first."""
        long = []
        for path in package_modules().values():
            with open(path, encoding="utf-8") as file:
                count = sum(1 for _ in file)
            if count > MAX_LINES:
                long.append((count, relative_path(path)))
        if long:
            long.sort(key=lambda item: (-item[0], item[1]))
            self.fail(f"{len(long)} module(s) over {MAX_LINES} lines:\n  "
                      + "\n  ".join(f"{path}: {count} lines" for count, path in long))

    def test_imports_are_at_module_level(self):
        """A function imports nothing but the optional extras (TLS, metrics,
        the fuzzer) and the reactor (LAZY_IMPORTS_ALLOWED): every other import
        is at the top of its module, where the import graph shows it.  The
        failure lists every other import in a function, as file:line."""
        offenders = []
        for module, path in package_modules().items():
            is_package = path.name == "__init__.py"
            for statement in function_imports(parse(path)):
                names = [name for name in imported_names(statement, module, is_package)
                         if not allowed_lazily(name)]
                if names:
                    offenders.append(
                        f"{relative_path(path)}:{statement.lineno}: {', '.join(names)}")
        if offenders:
            self.fail(f"{len(offenders)} import(s) inside a function, not of an optional"
                      " extra or the reactor:\n  " + "\n  ".join(offenders))
