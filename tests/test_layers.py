"""The modules form layers that only import downwards, so the code reads bottom to top and no change can close a
circle: every project module is placed in one layer here, and may import only modules of the layers below it
(imports inside functions included). A new module must be given its layer."""

from __future__ import annotations

import ast

from servers import ROOT

LAYERS: list[tuple[str, set[str]]] = [
    ("foundations: settings, the session payload, timestamps, stand-alone tools",
     {"config", "files", "payload", "allocator", "drain", "launcher"}),
    ("the users file (it raises config's error)", {"users"}),
    ("the storage vocabulary and interface; compare", {"stores", "stores.base", "compare"}),
    ("one module per backend; the JSON answers", {"stores.memory", "stores.sqlite", "stores.redis", "responses"}),
    ("the failover and the one factory; the body deadline; who a request is", {"storage", "deadline", "identity"}),
    ("backups", {"backup"}),
    ("off-site copies", {"offsite"}),
    ("the backup schedule", {"scheduler"}),
    ("HTTP views, the history page, the CLI", {"views", "page", "cli"}),
    ("the development server", {"devserver"}),
    ("gunicorn's worker", {"worker"}),
    ("the app and the gunicorn settings", {"app", "gunicorn.conf"}),
]
LAYER_OF = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def project_modules() -> dict[str, ast.Module]:
    files = [*ROOT.glob("*.py"), *(ROOT / "stores").glob("*.py")]
    modules = {}
    for path in files:
        name = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        modules[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return modules


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules `tree` imports, anywhere in it (`from stores import memory` names `stores.memory`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & known


def test_every_module_has_a_layer() -> None:
    assert set(project_modules()) == set(LAYER_OF), "give each new module its layer in LAYERS (and drop gone ones)"


def test_no_module_imports_one_above_or_beside_it() -> None:
    modules = project_modules()
    wrong = [f"{name} (layer {LAYER_OF[name]}) imports {other} (layer {LAYER_OF[other]})"
             for name, tree in modules.items()
             for other in sorted(imported(tree, set(modules)))
             if other != name and LAYER_OF[other] >= LAYER_OF[name]]
    assert wrong == []


def test_the_check_sees_a_circle() -> None:
    """The walk finds imports inside functions too (as `build_storage` once imported the backends)."""
    tree = ast.parse("def f():\n    import storage\n\nfrom stores import redis\n")
    assert imported(tree, {"storage", "stores.redis", "stores"}) == {"storage", "stores", "stores.redis"}
