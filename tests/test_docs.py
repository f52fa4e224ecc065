"""Prose that resolves: README's module map matches the tree, doc citations point at real
sections, nothing cites a document outside the repository, and each model constant has one home."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MODEL_DOC = ROOT / "docs" / "model.md"
PROSE = ("pid_batch", "tests", "benchmarks", "docs", "jobs")


def _text_files(suffixes=(".py", ".md")) -> list[Path]:
    files = [README]
    for top in PROSE:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in suffixes and p.is_file()]
    return [p for p in files if "__pycache__" not in p.parts]


def module_map() -> list[tuple[str, str]]:
    """(path, description) of each entry in the code block under README's `## Layout`."""
    text = README.read_text()
    section = text[text.index("\n## Layout\n") :]
    block = section.split("```")[1]
    entries = []
    for line in block.splitlines():
        if line.strip():
            path, _, desc = line.strip().partition(" ")
            entries.append((path, desc.strip()))
    return entries


def test_module_map_lists_every_module_and_nothing_else():
    listed = [path for path, _ in module_map()]
    assert len(listed) == len(set(listed)), "a path is listed twice"
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pid_batch").rglob("*.py")}
    listed_modules = {p for p in listed if p.endswith(".py")}
    assert sorted(modules - listed_modules) == [], "modules missing from README's Layout"
    assert sorted(listed_modules - modules) == [], "README's Layout lists modules that do not exist"
    for path in listed:
        assert (ROOT / path).exists(), f"README's Layout lists {path}, which does not exist"


def test_module_map_describes_each_entry_in_one_line():
    for path, desc in module_map():
        assert len(desc.split()) >= 2, f"{path} has no description in README's Layout"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def model_doc_anchors() -> set[str]:
    return {
        _slug(m.group(1))
        for m in re.finditer(r"^#{1,6} (.+)$", MODEL_DOC.read_text(), flags=re.MULTILINE)
    }


# A citation is the doc's path, "#" and a section name, optionally followed by ", #name" or
# " and #name" for more sections of the same doc.
_CITATION = re.compile(r"docs/model\.md(#[\w-]+(?:(?:,? and |, )#[\w-]+)*)")


def test_model_doc_citations_resolve():
    anchors = model_doc_anchors()
    assert {"sampler", "rope", "gates", "latent-conventions", "precision"} <= anchors
    cited: dict[str, set[str]] = {}
    for path in _text_files((".py", ".md", ".yaml")):
        for m in _CITATION.finditer(path.read_text()):
            for anchor in re.findall(r"#([\w-]+)", m.group(1)):
                cited.setdefault(anchor, set()).add(path.relative_to(ROOT).as_posix())
    for m in re.finditer(r"\]\(#([\w-]+)\)", MODEL_DOC.read_text()):  # links inside the doc
        cited.setdefault(m.group(1), set()).add("docs/model.md")
    assert len(cited) >= 20  # the code does cite the doc
    missing = {a: sorted(where) for a, where in cited.items() if a not in anchors}
    assert missing == {}, f"citations of sections docs/model.md does not have: {missing}"


def test_nothing_cites_a_document_outside_the_repository():
    outside = re.compile(r"\bSPEC(\.md\b| ?§)")  # the internal reference is not shipped
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _text_files()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert hits == []


# Each model constant's literal may appear in its home only; every other use imports the name.
ONE_HOME = [
    ("211 ms per 2048² on a GB200", r"(?<![\d.])211(\.0)?(?![\d.])", "pid_batch/config.py"),
    ("300 caption tokens", r"(?i)(txt|text|token)\w*(: int)? *= *300\b", "pid_batch/config.py"),
    ("trained sigma 0.8", r"(?i)sigma\w*(: float)? *= *0\.8\b", "pid_batch/backbones/__init__.py"),
    ("timescale 1000", r"(?i)timescale\w*(: float)? *= *1000\b", "pid_batch/config.py"),
]


@pytest.mark.parametrize("what, pattern, home", ONE_HOME, ids=[w for w, *_ in ONE_HOME])
def test_model_constants_have_one_home(what, pattern, home):
    regex = re.compile(pattern)
    where = sorted(
        p.relative_to(ROOT).as_posix()
        for top in ("pid_batch", "benchmarks")
        for p in (ROOT / top).rglob("*.py")
        if regex.search(p.read_text())
    )
    assert where == [home], f"{what}: literal found in {where}, expected only in {home}"


def readme_table(heading: str) -> dict[str, dict[str, str]]:
    """The first table under README's `### heading`: {first cell: {column name: cell}}."""
    lines = README.read_text().split(f"\n### {heading}\n", 1)[1].splitlines()
    rows: list[list[str]] = []
    for line in lines:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, _rule, *body = rows
    return {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in body}


def _ticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", text))


def test_readme_input_tables_match_what_the_reader_accepts():
    """README's input tables (one per format) list exactly the dtypes, columns, required
    columns, latent formats and image suffixes that codecs and the job accept."""
    import pyarrow as pa

    from pid_batch import codecs, job
    from pid_batch.backbones import LATENT_FORMATS

    st = readme_table("safetensors shards")

    def dtypes(cell: str) -> set[str]:
        return _ticked(cell.split("dtype", 1)[1])

    assert dtypes(st["tensor `latents`"]["type"]) == set(codecs.ST_FLOAT_DTYPES)
    assert dtypes(st["tensor `sigmas`"]["type"]) == set(codecs.ST_FLOAT_DTYPES)
    assert dtypes(st["tensor `seeds`"]["type"]) == set(codecs.ST_SEED_DTYPES)
    assert _ticked(st["metadata `latent_format`"]["type"]) == set(LATENT_FORMATS)
    assert [k for k, row in st.items() if row["required"] == "required"] == ["tensor `latents`"]

    pq = readme_table("Parquet shards")
    columns = {next(iter(_ticked(k))): row for k, row in pq.items()}
    schema = codecs.PARQUET_SHARD_SCHEMA
    assert len(columns) == len(pq) and set(columns) == set(schema.names)
    for name, row in columns.items():
        written = re.match(r"`([^`]+)`", row["type"]).group(1)  # 'float32', 'list<int32>'
        inner = re.fullmatch(r"list<(\w+)>", written)
        arrow = pa.list_(pa.type_for_alias(inner[1])) if inner else pa.type_for_alias(written)
        assert arrow == schema.field(name).type, (name, written, schema.field(name).type)
    assert _ticked(columns["dtype"]["type"].split(":", 1)[1]) == set(codecs.PARQUET_LATENT_DTYPES)
    assert _ticked(columns["latent_format"]["type"].split(":", 1)[1]) == set(LATENT_FORMATS)
    required = {name for name, row in columns.items() if row["required"] == "required"}
    assert required == set(codecs.PARQUET_REQUIRED)

    images = readme_table("Images instead of latents")
    assert _ticked(images["image file"]["type"]) == set(job.IMAGE_SUFFIXES)
