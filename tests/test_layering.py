"""pid_batch's imports point one way: config → backbones → model → sampling/checkpoint → decoder
→ stages → pipeline → cli/jobs, with storage/codecs/timing/summary and small pure helpers as leaves,
and the tools (report, plan, inspect, demo) consumed by the CLI only.

Every import counts, module-level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pid_batch"

# The layers, lowest first: a module may import its own layer and the layers above it in this
# table, never one below. An entry names a module or a package (then every module in it); the
# longest entry that names a module decides its layer, so a module inside a package can sit in
# another layer than its package by naming it here.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("config", ("pid_batch.config",)),
    ("backbones", ("pid_batch.backbones", "pid_batch.latents")),
    (
        "leaves",  # storage, formats, the timing table, pure helpers: no model, no Ray, no job
        (
            "pid_batch.assets",
            "pid_batch.storage",
            "pid_batch.codecs",
            "pid_batch.timing",
            "pid_batch.summary",  # summary.json from the timing table: every run writes it
            "pid_batch.redaction",
            "pid_batch.tiles",
            "pid_batch.sample_checks",  # torch-free checks the decoder and read workers share
        ),
    ),
    ("model", ("pid_batch.model",)),
    ("sampling/checkpoint", ("pid_batch.sampling", "pid_batch.checkpoint")),
    ("decoder", ("pid_batch.decoder", "pid_batch.tiled", "pid_batch.fake")),
    ("job spec", ("pid_batch.job",)),  # what the stages and the pipeline read; no decoder needs it
    (
        "stages",
        ("pid_batch.stages",),
    ),
    ("pipeline", ("pid_batch.pipeline", "pid_batch.lease")),
    (
        "tools",
        (
            "pid_batch.report",
            "pid_batch.plan",
            "pid_batch.inspect_data",
            "pid_batch.demo",
        ),
    ),
    ("cli/jobs", ("pid_batch.cli", "pid_batch.submit", "pid_batch.train")),
)
ROOT_LAYER = "leaves"  # pid_batch/__init__.py itself

# Imports against the table that stay, each with its reason: (importer, imported) → why.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(source: str, module: str, known: set[str], is_package: bool = False) -> set[str]:
    """The pid_batch modules `source` (the text of `module`) imports, at any depth of the tree."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import pid_batch.model.text as t` and the like
                name = name.rpartition(".")[0]
            if name.split(".")[0] == "pid_batch" and name != module:
                found.add(name)
    return found


def layer_of(module: str) -> int:
    if module == "pid_batch":
        return [name for name, _ in LAYERS].index(ROOT_LAYER)
    best = None
    for rank, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), rank)
    if best is None:
        raise KeyError(module)
    return best[1]


def edges() -> set[tuple[str, str]]:
    mods = modules()
    known = set(mods)
    return {
        (m, dep)
        for m, path in mods.items()
        for dep in imports_of(path.read_text(), m, known, path.name == "__init__.py")
    }


def upward(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in pairs if layer_of(b) > layer_of(a)}


def test_every_module_has_a_layer():
    missing = []
    for m in modules():
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"add these modules to LAYERS in {__name__}: {missing}"


def test_the_table_names_only_modules_that_exist():
    mods = set(modules())
    stale = [
        e
        for _, entries in LAYERS
        for e in entries
        if not any(m == e or m.startswith(e + ".") for m in mods)
    ]
    assert not stale, f"LAYERS names modules that are gone: {stale}"


def test_imports_point_down_the_layers():
    names = [name for name, _ in LAYERS]
    bad = sorted(upward(edges()) - set(EXCEPTIONS))
    assert not bad, "imports against the layering (importer [layer] → imported [layer]):\n" + (
        "\n".join(f"  {a} [{names[layer_of(a)]}] → {b} [{names[layer_of(b)]}]" for a, b in bad)
    )


def test_each_exception_is_still_needed():
    stale = sorted(set(EXCEPTIONS) - upward(edges()))
    assert not stale, f"no longer imported against the layering; drop from EXCEPTIONS: {stale}"


def test_the_scan_sees_lazy_relative_and_submodule_imports():
    known = {"pid_batch", "pid_batch.a", "pid_batch.b", "pid_batch.c", "pid_batch.pkg"}
    known |= {"pid_batch.pkg.d", "pid_batch.pkg.e"}
    source = (
        "import os\n"
        "from pid_batch import a, __version__\n"
        "def f():\n"
        "    from pid_batch.b import thing\n"
        "    import pid_batch.c.missing as m\n"
        "class K:\n"
        "    def g(self):\n"
        "        from . import e\n"
        "        from .d import name\n"
    )
    got = imports_of(source, "pid_batch.pkg.x", known)
    assert got == {"pid_batch", "pid_batch.a", "pid_batch.b", "pid_batch.c"} | {
        "pid_batch.pkg.e",
        "pid_batch.pkg.d",
    }


def test_a_stages_package_module_is_in_the_stages_layer():
    names = [name for name, _ in LAYERS]
    assert names[layer_of("pid_batch.stages.rows")] == "stages"
    assert names[layer_of("pid_batch.model.text")] == "model"
