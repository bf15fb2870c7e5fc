"""A Griffe extension for the docs site: the docstrings' Sphinx roles as links or code.

The package's docstrings are Google style with Sphinx cross-reference roles
(``:func:`~pytest_kerasmp.pin_process```), which read well in the code and in ``help()``;
mkdocstrings renders Markdown and showed the roles as text. Each role becomes an autorefs
link where its target is a public name the reference documents (``pytest_kerasmp.NAME`` or
a member of one), and inline code otherwise; ``~`` shows the last part of the name only.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import pytest_kerasmp

ROLE = re.compile(r":(?:func|class|meth|data|attr|exc|mod|obj):`(~?)([\w.]+)`")
PUBLIC = set(pytest_kerasmp.__all__)


def _rewrite(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2)
    shown = target.rsplit(".", 1)[-1] if short else target
    parts = target.split(".")
    if parts[0] == "pytest_kerasmp" and len(parts) in (2, 3) and parts[1] in PUBLIC:
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_rewrite, obj.docstring.value)
