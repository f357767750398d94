"""The README and docs/ as a newcomer walks them: every link resolves, every path shown exists, every recipe shown
validates, and every `compress` command shown names a real subcommand with real flags. No model runs."""

from __future__ import annotations

import glob
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w/.-])(?:eval|examples|tests|recipes|compress)/[\w./*{},-]*[\w*}]")
SPLIT = {"&&", "||", ";", "|"}


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def fences(page: Path, lang: str | None = None) -> list[str]:
    return [body for kind, body in FENCE.findall(text(page)) if lang is None or kind == lang]


def prose(page: Path) -> str:
    return FENCE.sub("", text(page))


def command_lines(page: Path) -> list[tuple[list[str], list[str]]]:
    """Every shell command shown, as (tokens, flags named in its trailing comment): the lines of bash blocks
    (continuations joined) and inline code that starts with a command; each line split at &&, ; and pipes."""
    lines = []
    for block in fences(page, "bash"):
        lines += block.replace("\\\n", " ").splitlines()
    lines += [" ".join(span.split()) for span in INLINE.findall(prose(page))]
    commands = []
    for line in lines:
        code, *comment = re.split(r"(?:^|\s)#(?=\s|$)", line, maxsplit=1)
        before = len(commands)
        try:
            tokens = shlex.split(code)
        except ValueError:  # an inline span that is not a command (an unbalanced quote in prose)
            continue
        current: list[str] = []
        for token in [*tokens, ";"]:
            if token in SPLIT:
                if current:
                    commands.append((current, []))
                current = []
            else:
                current.append(token)
        if comment and len(commands) > before:  # `# --dry-run first`: a flag of the command on that line
            commands[-1][1].extend(flags(comment))
    return commands


def compress_invocations(page: Path) -> list[tuple[str, list[str]]]:
    """(line, the arguments after `compress`) for `compress ...`, `python -m compress ...` and a launcher's
    `-m compress ...`."""
    found = []
    for tokens, noted in command_lines(page):
        line = shlex.join(tokens)
        if tokens[0] == "compress":
            found.append((line, tokens[1:] + noted))
        elif tokens[0] in {"python", "python3", "torchrun", "accelerate"} and "compress" in tokens:
            at = tokens.index("compress")
            if tokens[at - 1] == "-m":
                found.append((line, tokens[at + 1:] + noted))
    return found


def script_invocations(page: Path) -> list[tuple[str, str, list[str]]]:
    found = []
    for tokens, noted in command_lines(page):
        if tokens[0] in {"python", "python3"} and len(tokens) > 1 and tokens[1].endswith(".py"):
            found.append((shlex.join(tokens), tokens[1], tokens[2:] + noted))
    return found


def flags(args: list[str]) -> list[str]:
    return [m.split("=")[0] for a in args for m in re.findall(r"(?<![\w-])--[a-z][\w-]*", a)]


def subcommand(args: list[str]) -> list[str]:
    words = [a for a in args if not a.startswith("-")][:2]
    if not words:
        return []
    return words if words[0] == "data" else words[:1]


@cache
def help_text(*words: str) -> str:
    result = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0, f"compress {' '.join(words)} --help failed:\n{result.output}"
    return result.output


def expand(pattern: str) -> list[str]:
    """Brace expansion ({a,b}) then globbing, relative to the repo root."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        head, tail = pattern[:match.start()], pattern[match.end():]
        return [p for alt in match.group(1).split(",") for p in expand(head + alt + tail)]
    return [str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / pattern))]


def validate(*paths: str) -> None:
    result = CliRunner().invoke(app, ["validate", *paths])
    assert result.exit_code == 0, result.output


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(page), re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_resolve(page):
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{rel(page)}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{rel(page)}: link to {target}: no such heading in {dest.name}"


def test_readme_links_every_docs_page_and_stays_short():
    readme = text(ROOT / "README.md")
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme) if t.startswith("docs/")}
    assert {p.resolve() for p in PAGES[1:]} <= linked, "a docs/ page the README does not link"
    assert len(readme.splitlines()) <= 250


def test_readme_setup_and_ci_test_command():
    """.ci/run's awk: the first bash block after the test-command marker. It must stay a pytest run with the test
    extras; the main job's command stays in the set-up."""
    lines = text(ROOT / "README.md").splitlines()
    start = next(i for i, line in enumerate(lines) if "<!-- test-command" in line)
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```bash"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    command = "\n".join(lines[fence + 1:end])
    assert "pytest" in command and 'pip install -e ".[test]"' in command
    shown = [b.strip() for b in fences(ROOT / "docs" / "development.md", "bash")]
    assert command in shown, "docs/development.md shows another test command"
    setup = fences(ROOT / "README.md", "bash")[0]
    assert "pip install -e . " in setup and "compress run recipes/smollm2-135m-4bit-prune25.yaml" in setup


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_paths_exist(page):
    for pattern in set(PATH.findall(text(page))):
        assert expand(pattern), f"{rel(page)}: {pattern} does not exist"


def test_recipes_shown_validate():
    recipes = set()
    for page in PAGES:
        recipes |= {p for pattern in re.findall(r"recipes/[\w.*{},-]+\.yaml", text(page)) for p in expand(pattern)}
        for line, args in compress_invocations(page):
            if args[:1] == ["validate"] and args[1:]:  # a bare `compress validate` in prose names the command only
                shown = [p for a in args[1:] for p in expand(a)]
                assert shown, f"{rel(page)}: {line}: nothing to validate"
                recipes |= set(shown)
    assert recipes
    validate(*sorted(recipes))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_recipe_blocks_validate(page, tmp_path):
    """A whole recipe shown as YAML (one with `name:` and `steps:` at the top level) passes `compress validate`."""
    whole = re.compile(r"^name:.*^steps:", re.DOTALL | re.MULTILINE)
    blocks = [b for b in fences(page, "yaml") if whole.search(b)]
    for i, block in enumerate(blocks):
        path = tmp_path / f"shown{i}.yaml"
        path.write_text(block)
        validate(str(path))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_compress_commands_and_flags(page):
    for line, args in compress_invocations(page):
        words = subcommand(args)
        if not words:
            continue
        shown = help_text(*words)
        for flag in flags(args):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", shown), (
                f"{rel(page)}: `{line}`: compress {' '.join(words)} has no {flag}")


def script_source(path: Path) -> str:
    """A script's text and that of the modules beside it that it imports (eval scripts share their options)."""
    source = path.read_text()
    for module in re.findall(r"^from (\w+) import", source, re.M):
        if (path.parent / f"{module}.py").is_file():
            source += (path.parent / f"{module}.py").read_text()
    return source


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_script_commands_and_flags(page):
    for line, script, args in script_invocations(page):
        path = ROOT / script
        assert path.is_file(), f"{rel(page)}: `{line}`: no {script}"
        source = script_source(path)
        for flag in flags(args):
            negated = flag.startswith("--no-") and re.search(  # argparse's --no-X of a BooleanOptionalAction --X
                rf'"--{re.escape(flag[5:])}",[^)]*BooleanOptionalAction', source)
            assert f'"{flag}"' in source or negated, f"{rel(page)}: `{line}`: {script} defines no {flag}"


def test_the_extraction_finds_commands():
    """The checks above see what they should: the README's commands, the docs' scripts."""
    readme = [" ".join(args) for _, args in compress_invocations(ROOT / "README.md")]
    assert any(a.startswith("validate recipes/") for a in readme) and any(a.startswith("eval ") for a in readme)
    assert sum(len(script_invocations(p)) for p in PAGES) >= 10
