"""Griffe extension for the API pages: docstrings are plain text here, so `<` and `>` outside backticks are escaped
(a docstring that says '<image>' must not become an HTML image tag)."""
import re

import griffe


def escape_outside_code(text: str) -> str:
    "Escape < and > except inside `code` spans."
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


class EscapeDocstrings(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:
        if obj.docstring is not None: obj.docstring.value = escape_outside_code(obj.docstring.value)
