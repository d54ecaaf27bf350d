"""Every command-line flag that a message names (errors, warnings, log lines) exists: a
message that points to a flag the CLI does not have sends the user nowhere."""
import ast
import re
from pathlib import Path

import typer

from metafed.cli import app

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
MESSAGE_CALLS = {"warning", "info", "error", "warn", "echo", "_fail", "debug", "exception"}


def _cli_flags() -> set[str]:
    command = typer.main.get_command(app)
    flags = set()
    for sub in [command, *getattr(command, "commands", {}).values()]:
        for param in sub.params:
            flags.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return flags


def _message_strings(tree: ast.AST):
    """String constants inside raise statements and message-printing calls."""
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in MESSAGE_CALLS:
                target = node
        if target is not None:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


# flags of other programs that messages name: click's own, Flower's flower-supernode, `ray start`
EXTERNAL = {"--help", "--node-config", "--head", "--host"}


def test_every_flag_named_in_a_message_exists():
    from metafed.config import NEEDS

    known = _cli_flags() | EXTERNAL
    # the config's "X has no effect without Y" messages are built from NEEDS
    dynamic = [f"--{key.replace('_', '-')}" for key in NEEDS] + [f for _, flag in NEEDS.values()
                                                                for f in FLAG.findall(flag)]
    assert not [f for f in dynamic if f not in known], [f for f in dynamic if f not in known]
    package = Path(__file__).resolve().parents[1] / "metafed"
    missing = []
    for path in sorted(package.rglob("*.py")):
        for line, text in _message_strings(ast.parse(path.read_text())):
            missing += [f"{path.relative_to(package.parent)}:{line}: {flag}" for flag in FLAG.findall(text)
                        if flag not in known]
    assert not missing, "messages name flags the CLI lacks:\n" + "\n".join(missing)
