"""Every command in README.md's bash and python blocks has a rule in scripts/docs_check.py (which `make docs-check`
runs on CPU with tiny inputs) or a stated reason not to run. This checks the plan only, in well under a second, so
that a command added to the README without a way to check it fails `make test` too."""

from __future__ import annotations

import importlib.util
import sys

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("docs_check", REPO / "scripts" / "docs_check.py")
docs_check = sys.modules["docs_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(docs_check)


def test_every_readme_command_has_a_rule_or_a_reason():
    commands, problems = docs_check.plan((REPO / "README.md").read_text())
    assert not problems, "\n".join(problems)
    assert sum(c.rule is not None for c in commands) >= 15  # the extraction found the blocks


def test_extraction_joins_continuations_drops_comments_and_keeps_exports_with_their_command():
    readme = "\n".join([
        "text `make x` in prose", "```bash", "make demo   # a comment", "    # more comment", "export A=1 B=2  # note",
        "run --flag \\", '    prompt="a # not a comment" x=1', "```", "```", "not a command", "```",
        "```python", "import os", "print(os.sep)", "```"])
    commands = docs_check.extract(readme)
    assert [(c.line, c.lang, c.text) for c in commands] == [
        (3, "bash", "make demo"), (5, "bash", 'export A=1 B=2; run --flag prompt="a # not a comment" x=1'),
        (13, "python", "import os\nprint(os.sep)\n")]


def test_a_command_without_a_rule_is_a_problem_and_so_is_a_rule_without_a_command():
    _, problems = docs_check.plan("```bash\nrm -rf /tmp/nothing\n```\n")
    assert any("no rule runs `rm -rf /tmp/nothing`" in p for p in problems)
    assert any("matches no README command" in p for p in problems)
