"""The prose a user reads: no dates or clock times outside CHANGELOG.md and git, and a README whose
first screens hold the two commands, the guarantees and the main settings, with commands that parse.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A calendar date, a clock time with a zone or in a range (hh:mm-hh:mm), an ISO timestamp, or the
# word UTC in prose (``datetime.UTC``, ``now(UTC)`` and ``import UTC`` are code, not prose).
_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
_CLOCK = re.compile(
    r"\b([01]?\d|2[0-3]):[0-5]\d(:[0-5]\d)?\s*(UTC|GMT|CET|Z)\b"
    r"|\b\d\d:[0-5]\d\s*-\s*\d\d:[0-5]\d\b"
    r"|\d{4}-\d\d-\d\dT\d\d:\d\d"
)
_UTC_WORD = re.compile(r"(?<![.\w(])UTC\b(?![,)])")
_UTC_CODE = re.compile(r"^\s*from datetime import .*\bUTC\b")


def _prose_files() -> list[Path]:
    files = [README]
    for folder in ("stream_trainer", "consumers", "bench", "scripts"):
        files += [p for p in (ROOT / folder).rglob("*.py")]
    files += [p for p in (ROOT / "scripts").glob("*.sh")]
    files += [p for p in (ROOT / "docs").glob("*.md")]
    return sorted(files)


def dated_lines(text: str) -> list[tuple[int, str]]:
    """The (line number, line) pairs of ``text`` that carry a date or a clock time.

    >>> dated_lines("re-run at 22:19 UTC\\nbatch sizes 1:64\\nfrom datetime import UTC")
    [(1, 're-run at 22:19 UTC')]
    >>> dated_lines("until 2026-11-28 the rows were scored")
    [(1, 'until 2026-11-28 the rows were scored')]
    >>> dated_lines("now = dt.datetime.now(dt.UTC)")
    []
    """

    def dated(line: str) -> bool:
        prose_utc = _UTC_WORD.search(line) is not None and not _UTC_CODE.search(line)
        return bool(_DATE.search(line) or _CLOCK.search(line) or prose_utc)

    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if dated(line)]


def test_the_checker_catches_what_it_should() -> None:
    assert dated_lines("frames re-run (03:36 UTC), docs quote it")
    assert dated_lines("the runs between 22:10-23:37 on the final code")
    assert dated_lines("- date: 2026-11-29T03:36:04+00:00")
    assert dated_lines("a measurement in UTC time")
    assert not dated_lines("--batch-sizes 1:64 and 16:32, bootstrap 127.0.0.1:9092")
    assert not dated_lines("stamp = (created_at or datetime.now(UTC)).isoformat()")
    assert not dated_lines("from datetime import UTC, datetime")


@pytest.mark.parametrize("path", _prose_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dates_or_clock_times(path: Path) -> None:
    hits = dated_lines(path.read_text(encoding="utf-8"))
    assert not hits, f"{path.relative_to(ROOT)}: dates belong in CHANGELOG.md and git: {hits}"


def test_readme_first_screens_hold_the_commands_guarantees_and_settings() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    first = "\n".join(lines[:80])
    assert "./scripts/run.sh" in first and "./scripts/test.sh" in first
    assert "## Guarantees and limits" in first
    assert "## Configuration" in "\n".join(lines[:100])
    assert "| limit | setting | default | rejection reason |" in "\n".join(lines)


def test_the_two_commands_and_ci_exist() -> None:
    for script in ("scripts/run.sh", "scripts/test.sh", ".ci/run"):
        path = ROOT / script
        assert path.is_file() and path.stat().st_mode & 0o111, script
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _readme_commands() -> list[str]:
    """Every ``stream-trainer ...`` line of the README's code blocks, continuations joined."""
    commands, in_code, pending = [], False, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        text = text.split("  #", 1)[0].strip()
        if text.startswith("stream-trainer "):
            commands.append(text)
    return commands


def test_readme_commands_parse() -> None:
    from stream_trainer.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("name", ["README.md", "docs/decisions.md", "CHANGELOG.md"])
def test_links_resolve(name: str) -> None:
    """Every relative link of the user's documents points at a file, and every #anchor at a
    heading of its document."""
    path = ROOT / name
    text = path.read_text(encoding="utf-8")
    slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in slugs, f"{name}: no heading for {target}"
        else:
            assert (path.parent / target).exists(), f"{name}: {target} does not exist"
