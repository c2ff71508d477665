"""start-storyart.ps1, checked without PowerShell: parsed with tree-sitter-powershell.

It must parse cleanly (no ERROR or MISSING node), declare the parameters the contract names, use nothing that
Windows PowerShell 5.1 cannot run, and map its parameters onto options launcher.py really has. When `pwsh`
is installed, PowerShell's own parser checks it too.
"""

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tree_sitter_powershell
from tree_sitter import Language, Node, Parser, Tree

import launcher

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "start-storyart.ps1"

PARSER = Parser(Language(tree_sitter_powershell.language()))
# Parameters of cmdlets that only exist from PowerShell 6/7 on.
PS7_ONLY_PARAMETERS = {
    "-parallel", "-ashashtable", "-skipcertificatecheck", "-additionalchildpath", "-noproxy",
}


def parse(source: str) -> Tree:
    return PARSER.parse(source.encode("utf-8"))


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


def syntax_errors(tree: Tree) -> list[str]:
    """'line:col: ERROR|MISSING ...' for every node tree-sitter could not fit into the grammar (1-based)."""
    problems = []
    for node in walk(tree.root_node):
        if node.type == "ERROR" or node.is_missing:
            kind = f"MISSING {node.type!r}" if node.is_missing else "ERROR"
            text = node.text.decode("utf-8", errors="replace")[:40] if node.text else ""
            problems.append(f"{node.start_point.row + 1}:{node.start_point.column + 1}: {kind} {text!r}")
    return problems


def ps7_only_syntax(tree: Tree) -> list[str]:
    """'line:col: token' for PowerShell 7 operators: && || ?? ??= ?. ?[ and the ternary ? :.

    Strings, comments, variables ($?), bare words (a?.txt), parameters (-?) and the `?` alias of Where-Object
    are blanked first; in Windows PowerShell 5.1 code no `?`, `&&` or `||` is left after that.
    """
    source = bytearray(tree.root_node.text or b"")
    blank = {"comment", "string_literal", "variable", "generic_token", "command_parameter"}
    for node in walk(tree.root_node):
        if node.type in blank or (node.type == "command_name" and node.text == b"?"):
            for i in range(node.start_byte, node.end_byte):
                if source[i] not in b"\r\n":
                    source[i] = ord(" ")
    found = []
    text = source.decode("utf-8", errors="replace")
    for match in re.finditer(r"&&|\|\||\?\?=?|\?\.|\?\[|\?", text):
        line = text.count("\n", 0, match.start()) + 1
        col = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
        found.append(f"{line}:{col}: {match.group()}")
    return found


def ps7_only_parameters(tree: Tree) -> list[str]:
    """Cmdlet parameters PowerShell 5.1 lacks, and Join-Path with more than two positional arguments."""
    found = []
    for node in walk(tree.root_node):
        where = f"{node.start_point.row + 1}:{node.start_point.column + 1}"
        if node.type == "command_parameter" and (node.text or b"").decode().lower() in PS7_ONLY_PARAMETERS:
            found.append(f"{where}: {node.text.decode()}")
        if node.type == "command" and node.children[0].text == b"Join-Path":
            elements = next((c for c in node.children if c.type == "command_elements"), None)
            args = [c for c in (elements.children if elements else []) if c.type != "command_argument_sep"]
            if len(args) > 2 and not any(a.type == "command_parameter" for a in args):
                found.append(f"{where}: Join-Path with {len(args)} paths")
    return found


def script_parameters(tree: Tree) -> dict[str, dict[str, str]]:
    """The script's own param() block: name (lower case) -> {'type': ..., 'default': ...}."""
    blocks = [c for c in tree.root_node.children if c.type == "param_block"]
    assert len(blocks) == 1, "the script must start with exactly one param() block"
    params = {}
    for node in walk(blocks[0]):
        if node.type != "script_parameter":
            continue
        info: dict[str, str] = {}
        for child in node.children:
            if child.type == "variable":
                name = child.text.decode().lstrip("$")
            elif child.type == "script_parameter_default":
                info["default"] = child.text.decode().lstrip("=").strip()
            elif child.type == "attribute_list":
                types = [n.text.decode() for n in walk(child) if n.type == "type_literal"]
                info["type"] = types[-1].strip("[]").lower() if types else ""
        params[name.lower()] = info
    return params


@pytest.fixture(scope="module")
def script() -> str:
    return SCRIPT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tree(script: str) -> Tree:
    return parse(script)


# ---------------------------------------------------------------------------------------------------------


def test_script_parses_without_errors(tree: Tree) -> None:
    problems = syntax_errors(tree)
    assert problems == [], "start-storyart.ps1 does not parse:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        "param(\n    [string]$A\n\nif ($A) {\n    Write-Host $A\n",
        "if ($x) {\n    Write-Host 'x'\n}\n}\n",
        "$v = @(1, 2\n",
        "function f {\n    param([switch]$A\n    $A\n}\n",
    ],
    ids=["unclosed-param-and-block", "extra-brace", "unclosed-array", "unclosed-param"],
)
def test_the_syntax_check_rejects_broken_scripts(snippet: str) -> None:
    problems = syntax_errors(parse(snippet))
    assert problems, f"a broken snippet passed the check:\n{snippet}"
    assert all(re.match(r"\d+:\d+: (ERROR|MISSING)", p) for p in problems)


def test_the_syntax_check_says_where() -> None:
    problems = syntax_errors(parse("if ($x) {\n    Write-Host 'x'\n}\n}\n"))
    assert problems[0].startswith("4:1: ERROR"), problems


def test_the_syntax_check_accepts_a_valid_script() -> None:
    assert syntax_errors(parse("param([switch]$A)\nif ($A) { Write-Host 'a' } else { exit 1 }\n")) == []


def test_script_declares_the_contract_parameters(tree: Tree) -> None:
    params = script_parameters(tree)
    for name in ("frontenddir", "nofrontend", "nobrowser", "port", "help"):
        assert name in params, f"-{name} is missing from param()"
    assert params["frontenddir"]["type"] == "string"
    assert params["frontenddir"]["default"].lower() == "$env:storyart_frontend_dir"
    for switch in ("nofrontend", "nobrowser", "help"):
        assert params[switch]["type"] == "switch", f"-{switch} must be a [switch]"
    assert params["port"]["type"] == "int"


def test_script_uses_no_powershell_7_operators(tree: Tree) -> None:
    found = ps7_only_syntax(tree) + ps7_only_parameters(tree)
    assert found == [], "start-storyart.ps1 must run on Windows PowerShell 5.1:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    ["git status && echo ok", "Test-Path x || exit 1", "$v = $a ?? 'b'", "$v ??= 3", "$n = $x ? 1 : 2",
     "${p}?.Name", "${a}?[0]", "1..3 | ForEach-Object -Parallel { $_ }", "Join-Path $a 'b' 'c'",
     "ConvertFrom-Json $t -AsHashtable"],
)
def test_the_powershell_7_check_catches(snippet: str) -> None:
    tree = parse(snippet + "\n")
    assert ps7_only_syntax(tree) + ps7_only_parameters(tree), f"not caught: {snippet}"


@pytest.mark.parametrize(
    "snippet",
    ["Write-Host 'a && b ?? c'", "# a || b ? c", "if (-not $?) { exit 1 }", "Get-ChildItem | ? { $_.Length }",
     'Write-Host "x ?? $y"', "Join-Path (Join-Path $a 'b') 'c'", "Get-Help -?", "$x -and $y -or $z"],
)
def test_the_powershell_7_check_lets_5_1_code_pass(snippet: str) -> None:
    tree = parse(snippet + "\n")
    assert ps7_only_syntax(tree) + ps7_only_parameters(tree) == []


def test_is_windows_is_only_read_behind_a_version_check(tree: Tree) -> None:
    """$IsWindows does not exist in Windows PowerShell 5.1 (and strict mode makes reading it an error)."""
    for node in walk(tree.root_node):
        if node.type == "variable" and node.text.decode().lower() == "$iswindows":
            function = node.parent
            while function is not None and function.type != "function_statement":
                function = function.parent
            line = node.start_point.row + 1
            assert function is not None, f"$IsWindows read outside a function at line {line}"
            assert b"$PSVersionTable.PSVersion.Major -lt 6" in function.text


def test_script_is_ascii(script: str) -> None:
    """Windows PowerShell 5.1 reads a file without BOM as ANSI: any non-ASCII character would be garbled."""
    bad = [f"{n}: {line!r}" for n, line in enumerate(script.splitlines(), 1) if not line.isascii()]
    assert bad == []


def test_help_documents_every_parameter(script: str, tree: Tree) -> None:
    help_block = tree.root_node.children[0]
    assert help_block.type == "comment", "comment-based help comes first"
    assert help_block.text.startswith(b"<#")
    text = help_block.text.decode()
    assert ".SYNOPSIS" in text and ".EXAMPLE" in text
    for name in script_parameters(tree):
        assert re.search(rf"\.PARAMETER {name}\b", text, re.IGNORECASE), f".PARAMETER {name} is missing"


def test_script_passes_only_options_the_launcher_has(script: str, tree: Tree) -> None:
    options = {
        node.text.decode().strip("'\"")
        for node in walk(tree.root_node)
        if node.type == "string_literal" and re.fullmatch(rb"'--[a-z-]+'", node.text or b"")
    }
    assert options == {"--frontend-dir", "--no-frontend", "--no-browser", "--port", "--frontend-port"}
    known = set(launcher.build_parser({})._option_string_actions)
    assert options <= known
    assert "launcher.py" in script
    assert script.rstrip().endswith("exit $LASTEXITCODE"), "the launcher's exit code must be the script's"


@pytest.mark.skipif(shutil.which("pwsh") is None, reason="PowerShell 7 (pwsh) is not installed")
def test_powershell_itself_parses_the_script_and_shows_help() -> None:
    check = (
        "$errors = $null; $null = [System.Management.Automation.Language.Parser]::ParseFile("
        f"'{SCRIPT}', [ref]$null, [ref]$errors); $errors | ForEach-Object {{ $_.ToString() }}; "
        "exit $errors.Count"
    )
    result = subprocess.run(["pwsh", "-NoProfile", "-NonInteractive", "-Command", check],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = subprocess.run(["pwsh", "-NoProfile", "-NonInteractive", "-File", str(SCRIPT), "-Help"],
                           check=False, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "FrontendDir" in shown.stdout
