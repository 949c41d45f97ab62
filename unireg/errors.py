"""Errors a user can fix: bad files, prompts, configs, model folders.

Every such error derives from :class:`UserError`, so the command line prints it as one line
and exits 2, while anything else (a bug) keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for; the message names the input and the problem."""


class ModelLoadError(UserError):
    """A model folder cannot be loaded (missing, corrupt or inconsistent files)."""


def shorten(text: str, limit: int = 80) -> str:
    """Quote user text in messages without echoing ten thousand characters back."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
