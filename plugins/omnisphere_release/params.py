"""Run parameters shared by the DAGs, shaped for the UI's trigger form as much as for the API and the CLI."""

from __future__ import annotations

from airflow.sdk import Param

# What a Docker tag may be (docker's own rule); said in words in IMAGE_TAG_RULE for the form. The (?!\n) before $
# refuses "1.1.0\n": Python's $ (jsonschema's, and re.match's) also matches before a final newline, JavaScript's (the
# form's) does not, and \Z exists only in Python.
IMAGE_TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?!\n)$"
IMAGE_TAG_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 (e.g. 1.4.2)"


def optional_text(description: str, title: str | None = None) -> Param:
    """Free text that may stay empty (a reason, a note).

    Typed null-or-string on purpose: the trigger form treats a param whose type excludes null as required and
    refuses an empty string for it, so a plain string param would block every trigger until it is filled in.
    Read it as ``params.x or ''``.
    """
    if title:
        return Param(None, type=["null", "string"], maxLength=500, description=description, title=title)
    return Param(None, type=["null", "string"], maxLength=500, description=description)
