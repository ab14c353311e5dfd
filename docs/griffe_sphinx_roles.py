"""A griffe extension for the API reference: the package's docstrings use Sphinx roles (``:class:`X```),
which Markdown would show verbatim; each becomes inline code, and a fully qualified ``sentio_lab`` target
becomes a link (mkdocs-autorefs; a target that no page documents fails the strict build, so links stay true).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj|const):`(~?)([^`<>]+)`")


def _replace(match: re.Match[str]) -> str:
    """One role as Markdown: code, linked when the target is a full ``sentio_lab.`` path."""
    tilde, target = match.groups()
    target = target.strip().rstrip("()")
    text = target.rsplit(".", 1)[-1] if tilde else target
    if target.startswith("sentio_lab.") and not any(part.startswith("_") for part in target.split(".")):
        return f"[`{text}`][{target}]"
    return f"`{text}`"


def markdown_roles(docstring: str) -> str:
    """``docstring`` with every Sphinx cross-reference role turned into Markdown."""
    return ROLE.sub(_replace, docstring)


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place."""
        if obj.docstring is not None:
            obj.docstring.value = markdown_roles(obj.docstring.value)
