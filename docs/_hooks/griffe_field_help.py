"""Griffe extension: document dataclass fields from their ``field(metadata={"help": ...})`` text.

`ABMLLConfig` and `MetaTrainingArguments` follow the PEFT / transformers convention of describing each
field in ``metadata["help"]`` (shown by ``HfArgumentParser --help``) instead of a docstring. This turns
that text into the attribute's docstring, and shows the field's default instead of the ``field(...)``
call, so the API reference lists every knob with its meaning. Static: the package is not imported.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


class FieldHelp(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        call = getattr(node, "value", None)
        if not (isinstance(node, ast.AnnAssign) and isinstance(call, ast.Call)):
            return
        if not (isinstance(call.func, ast.Name) and call.func.id == "field"):
            return
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        try:
            help_text = ast.literal_eval(keywords["metadata"])["help"]
        except (KeyError, TypeError, ValueError, SyntaxError):
            return
        if not isinstance(help_text, str):
            return
        if attr.docstring is None:
            attr.docstring = griffe.Docstring(help_text, parent=attr)
        if "default" in keywords:
            attr.value = ast.unparse(keywords["default"])
