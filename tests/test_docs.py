"""The repository stands alone (docs/design.md, contract 11): no file in it cites the team's documents kept outside
it, every citation of the repository's own notes ("docs/method.md §9", "docs/design.md, contract 4") names a file,
section or contract that exists, and every link into docs/ lands on a heading that exists."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTES = ("method.md", "fidelity.md", "numbers.md", "design.md")
MAX_BYTES = 4 << 20  # built shards, databases and checkpoints are larger (or binary) and cite nothing

# The outside documents, written so that this file does not cite them itself.
OUTSIDE = re.compile(r"\b(?:DESIGN|METHOD|SELF_TRANSCENDENCE|ECOSYSTEM|STYLE)\.md\b|\.\./shared\b|shared[/]docs")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$", re.M)
SECTION = re.compile(r"^(\d+(?:\.\d+)*)\.?\s")
CONTRACT = re.compile(r"^Contract (\d+)\b")
NUMBER = r"\d+(?:\.\d+)*"
# docs/<file>.md, then optionally its sections: "§9", "§3.5, §5.1", "§3.3–3.4", "§6 and §8"
SECTION_CITE = re.compile(rf"docs/(?P<file>[\w.-]+\.md)(?P<refs>(?:\s*,?\s*(?:and\s+)?§\s?{NUMBER}"
                          rf"(?:\s*[–-]\s*§?{NUMBER})?)*)")
CONTRACT_CITE = re.compile(r"docs/design\.md,?\s+contracts?\s+(?P<nums>\d+(?:\s*(?:,\s*and|,|and)\s*\d+)*)")
LINK = re.compile(r"\]\((?P<target>[^)\s#]*\.md)?(?:#(?P<anchor>[^)\s]+))?\)")


def repository_text_files():
    """(path, text) of every text file of the repository: tracked, or new and not ignored (what a commit would hold;
    built data, runs, the venv and generated package metadata are ignored, and a user's `make train` adds no file
    here)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in sorted(n for n in listed if n):
        path = ROOT / name
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_BYTES:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        yield path, data.decode("utf-8", errors="replace")


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> list[tuple[int, str]]:
    return [(len(level), title) for level, title in HEADING.findall(path.read_text())]


def sections(path: Path) -> set[str]:
    return {m.group(1) for _, title in headings(path) if (m := SECTION.match(title))}


def contracts(path: Path) -> set[int]:
    return {int(m.group(1)) for _, title in headings(path) if (m := CONTRACT.match(title))}


def citation_problems(text: str, docs: Path = DOCS) -> list[str]:
    """What is wrong with the docs/ citations in ``text``: a file, section or contract that does not exist."""
    problems = []
    for match in SECTION_CITE.finditer(text):
        note = docs / match.group("file")
        if not note.is_file():
            problems.append(f"docs/{match.group('file')} does not exist")
            continue
        known = sections(note)
        problems += [f"docs/{note.name} has no section §{n}" for n in re.findall(NUMBER, match.group("refs"))
                     if n not in known]
    for match in CONTRACT_CITE.finditer(text):
        known = contracts(docs / "design.md")
        problems += [f"docs/design.md has no contract {n}" for n in re.findall(r"\d+", match.group("nums"))
                     if int(n) not in known]
    return problems


def test_no_file_cites_a_document_outside_the_repository():
    offenders = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                 for path, text in repository_text_files() for m in OUTSIDE.finditer(text)]
    assert offenders == []


def test_every_citation_of_the_docs_names_a_section_that_exists():
    problems, cited = [], {}
    for path, text in repository_text_files():
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in citation_problems(text)]
        if DOCS not in path.parents:
            for match in SECTION_CITE.finditer(text):
                cited[match.group("file")] = cited.get(match.group("file"), 0) + 1
    assert problems == []
    # the code does cite every note (the walk saw the repository, and the citations are in the form checked here)
    assert {note: cited.get(note, 0) > 0 for note in NOTES} == {note: True for note in NOTES}
    assert sum(cited.values()) >= 40


def test_links_into_the_docs_land_on_headings():
    problems = []
    for source in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for match in LINK.finditer(source.read_text()):
            target = (source.parent / match.group("target")).resolve() if match.group("target") else source
            if DOCS not in target.parents and target.parent != DOCS:
                continue
            if not target.is_file():
                problems.append(f"{source.name}: {match.group(0)} links to a missing file")
            elif match.group("anchor") and match.group("anchor") not in {slug(t) for _, t in headings(target)}:
                problems.append(f"{source.name}: {match.group(0)} links to a missing heading")
    assert problems == []


def test_the_notes_are_numbered_without_gaps():
    for name in ("method.md", "fidelity.md", "numbers.md"):
        top = [int(m.group(1)) for level, title in headings(DOCS / name) if level == 2
               and (m := re.match(r"^(\d+)\.\s", title))]
        assert top == list(range(1, len(top) + 1)) and len(top) >= 5, name
    assert contracts(DOCS / "design.md") == set(range(1, 12))
    readme = (DOCS / "README.md").read_text()
    assert all(f"({name})" in readme for name in NOTES)


def test_the_checker_finds_what_it_is_meant_to_find():
    assert OUTSIDE.search("see " + "METHOD" + ".md §3") and OUTSIDE.search("../" + "shared/x")
    assert not OUTSIDE.search("docs/method.md §3")
    d = "docs" + "/"  # so that the repository walk does not read these wrong citations in this file
    text = (f"{d}method.md §9; {d}method.md §8.3, §99; {d}numbers.md §4–§77; {d}nope.md §1; "
            f"{d}design.md, contracts 1, 2 and 12; {d}design.md, contract 4")
    assert citation_problems(text) == [f"{d}method.md has no section §99", f"{d}numbers.md has no section §77",
                                       f"{d}nope.md does not exist", f"{d}design.md has no contract 12"]
    assert slug("Contract 1 — One time convention everywhere") == "contract-1--one-time-convention-everywhere"
    assert slug("2. Self-Transcendence's t-range") == "2-self-transcendences-t-range"


@pytest.mark.parametrize("name", NOTES)
def test_each_note_names_its_sources_or_the_code(name):
    """A note is about facts with sources: method/fidelity/numbers name papers or repositories, design names code."""
    text = (DOCS / name).read_text()
    needles = ("igdit/", "tests/") if name == "design.md" else ("paper", "code")
    assert all(needle in text for needle in needles)
