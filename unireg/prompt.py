"""Text-like registration prompts.

Users steer UniReg with short strings such as ``"intra-subject | liver, spleen"``,
``"inter | left kidney, right kidney | smooth=0.3"`` or plain sentences like
``"align the pancreas between two patients"``. :func:`parse_prompt` turns any of these into a
:class:`Prompt` and fails with a message that lists close matches for what it cannot read.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from .organs import ORGANS, known_names, resolve_organ

REGISTRATION_TYPES = ("inter", "intra")

_TYPE_WORDS = {
    "inter": "inter", "inter_subject": "inter", "intersubject": "inter", "inter_patient": "inter",
    "atlas": "inter", "intra": "intra", "intra_subject": "intra", "intrasubject": "intra",
    "intra_patient": "intra", "longitudinal": "intra", "follow_up": "intra", "respiratory": "intra",
    "breathing": "intra",
}
_TYPE_PHRASES = [  # for free text, checked in order
    ("same patient", "intra"), ("same subject", "intra"), ("follow-up", "intra"),
    ("breathing", "intra"), ("respiratory", "intra"), ("longitudinal", "intra"), ("intra", "intra"),
    ("two patients", "inter"), ("different patients", "inter"), ("between patients", "inter"),
    ("atlas", "inter"), ("inter", "inter"),
]
_SMOOTH = re.compile(r"^(smooth|smoothness|lambda|λ|reg)\s*[=:]\s*([-+0-9.eE]+)$")


class PromptError(ValueError):
    """A prompt could not be read; the message says what and suggests fixes."""


@dataclass(frozen=True)
class Prompt:
    type: str = "inter"
    organs: tuple[str, ...] = ()
    smoothness: float | None = None
    text: str = ""

    def __post_init__(self):
        if self.type not in REGISTRATION_TYPES:
            raise PromptError(f"registration type must be one of {REGISTRATION_TYPES}, got {self.type!r}")
        unknown = [o for o in self.organs if o not in ORGANS]
        if unknown:
            raise PromptError(_unknown_message(unknown[0]))
        if self.smoothness is not None and not 0.0 <= self.smoothness <= 1.0:
            raise PromptError(f"smoothness must lie in [0, 1], got {self.smoothness}")

    def __str__(self) -> str:
        parts = [self.type, ", ".join(self.organs) or "whole body"]
        if self.smoothness is not None:
            parts.append(f"smooth={self.smoothness:.2f}")
        return " | ".join(parts)


def parse_prompt(prompt: "str | Prompt | None", default_type: str = "inter") -> Prompt:
    """Read a prompt string (structured ``type | organs | smooth=x`` or free text)."""
    if isinstance(prompt, Prompt):
        return prompt
    if prompt is None or not str(prompt).strip():
        return Prompt(type=default_type)
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = prompt.strip()
    try:
        return _parse_structured(text, default_type)
    except PromptError as structured_error:
        if "|" in text or len(text.split()) < 3:
            raise
        parsed = _parse_free_text(text, default_type)
        if parsed is None:
            raise structured_error
        return parsed


def _parse_structured(text: str, default_type: str) -> Prompt:
    reg_type, organs, smoothness = None, [], None
    for part in (p.strip() for p in text.split("|")):
        if not part:
            continue
        key = _token(part)
        smooth = _SMOOTH.match(part.strip().lower())
        if key in _TYPE_WORDS:
            if reg_type is not None:
                raise PromptError(f"prompt {text!r} names the registration type twice")
            reg_type = _TYPE_WORDS[key]
        elif smooth:
            try:
                smoothness = float(smooth.group(2))
            except ValueError:
                raise PromptError(f"cannot read smoothness value {smooth.group(2)!r}") from None
        else:
            organs.extend(_parse_organ_list(part))
    return Prompt(type=reg_type or default_type, organs=_unique(organs), smoothness=smoothness, text=text)


def _parse_organ_list(part: str) -> list[str]:
    out = []
    for name in re.split(r",|;|\band\b|\+", part):
        if not name.strip():
            continue
        classes = resolve_organ(name)
        if classes is None:
            raise PromptError(_unknown_message(name.strip()))
        out.extend(classes)
    return out


def _parse_free_text(text: str, default_type: str) -> Prompt | None:
    lowered = " " + " ".join(text.lower().replace(",", " ").replace(".", " ").split()) + " "
    reg_type = next((t for phrase, t in _TYPE_PHRASES if phrase in lowered), None)
    words = lowered.split()
    organs: list[str] = []
    used = [False] * len(words)
    for n in (3, 2, 1):  # longest names first: "left kidney" before "kidney"
        for i in range(len(words) - n + 1):
            if any(used[i:i + n]):
                continue
            classes = resolve_organ(" ".join(words[i:i + n]))
            if classes:
                organs.extend(classes)
                used[i:i + n] = [True] * n
    if not organs and reg_type is None:
        return None
    return Prompt(type=reg_type or default_type, organs=_unique(organs), text=text)


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(_token(name), known_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; names follow TotalSegmentator classes, e.g. liver, kidney_left, vertebrae_L1"
    return f"unknown organ {name!r}{hint}"


def _token(text: str) -> str:
    return "_".join(text.strip().lower().replace("-", " ").replace("_", " ").split())


def _unique(items):
    return tuple(dict.fromkeys(items))
