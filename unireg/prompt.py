"""Text-like registration prompts.

Users steer UniReg with short strings such as ``"intra-subject | liver, spleen"``,
``"inter | left kidney, right kidney | smooth=0.3"`` or plain sentences like
``"align the pancreas between two patients"``. :func:`parse_prompt` turns any of these into a
:class:`Prompt` and fails with a message that lists close matches for what it cannot read.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .errors import UserError, shorten
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
_SMOOTH = re.compile(r"^(smooth|smoothness|lambda|λ|reg)\s*[=:]\s*(.*)$")
_RIGID = re.compile(r"^(rigid|keep_rigid|keep rigid)\s*[=:]\s*(.*)$")
#: Free-text words that are close to an organ name but are ordinary words, never typos.
_COMMON_WORDS = {"align", "between", "patients", "patient", "subject", "subjects", "register", "registration",
                 "the", "and", "two", "same", "scans", "scan", "images", "image", "focus", "on", "with", "of",
                 "different", "follow", "up", "phase", "phases", "breathing", "respiratory", "longitudinal",
                 "please", "match", "atlas", "to", "a", "an", "in", "for", "time", "points", "point", "inter",
                 "intra", "body", "whole", "organs", "organ", "left", "right", "inhale", "exhale", "motion"}


class PromptError(UserError):
    """A prompt could not be read; the message says what and suggests fixes."""


@dataclass(frozen=True)
class Prompt:
    type: str = "inter"
    organs: tuple[str, ...] = ()
    smoothness: float | None = None
    text: str = ""
    rigid: tuple[str, ...] = ()   # structures kept locally rigid by instance optimisation

    def __post_init__(self):
        if self.type not in REGISTRATION_TYPES:
            raise PromptError(f"registration type must be one of {REGISTRATION_TYPES}, got {self.type!r}")
        unknown = [o for o in (*self.organs, *self.rigid) if o not in ORGANS]
        if unknown:
            raise PromptError(_unknown_message(unknown[0]))
        if self.smoothness is not None and not 0.0 <= self.smoothness <= 1.0:
            raise PromptError(f"smoothness must lie in [0, 1], got {self.smoothness}")

    def __str__(self) -> str:
        parts = [self.type, ", ".join(self.organs) or "whole body"]
        if self.smoothness is not None:
            parts.append(f"smooth={self.smoothness:.2f}")
        if self.rigid:
            parts.append(f"rigid={', '.join(self.rigid)}")
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
    reg_type, organs, smoothness, rigid = None, [], None, []
    for part in (p.strip() for p in text.split("|")):
        if not part:
            continue
        key = _token(part)
        smooth = _SMOOTH.match(part.strip().lower())
        keep_rigid = _RIGID.match(part.strip().lower())
        if key in _TYPE_WORDS:
            if reg_type is not None:
                raise PromptError(f"prompt {shorten(text)!r} names the registration type twice")
            reg_type = _TYPE_WORDS[key]
        elif smooth:
            try:
                smoothness = float(smooth.group(2))
            except ValueError:
                raise PromptError(f"cannot read smoothness value {shorten(smooth.group(2), 20)!r}; "
                                  f"write smooth=<number in [0, 1]>, e.g. smooth=0.3") from None
        elif keep_rigid:
            rigid.extend(_parse_organ_list(keep_rigid.group(2)))
            if not keep_rigid.group(2).strip():
                raise PromptError("rigid= needs a structure, e.g. rigid=vertebrae_L1")
        else:
            organs.extend(_parse_organ_list(part))
    return Prompt(type=reg_type or default_type, organs=_unique(organs), smoothness=smoothness, text=text,
                  rigid=_unique(rigid))


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
    typo = next((w for w, u in zip(words, used) if not u and _looks_like_organ_typo(w)), None)
    if typo is not None:
        raise PromptError(_unknown_message(typo))
    if not organs and reg_type is None:
        return None
    return Prompt(type=reg_type or default_type, organs=_unique(organs), text=text)


def _looks_like_organ_typo(word: str) -> bool:
    """A free-text word that is no organ but close to one ('livr'): ask, never drop it silently."""
    if word in _COMMON_WORDS or len(word) < 4 or not word.isalpha():
        return False
    return bool(difflib.get_close_matches(word, known_names(), n=1, cutoff=0.75))


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(_token(name), known_names(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; names follow TotalSegmentator classes, e.g. liver, kidney_left, vertebrae_L1"
    return f"unknown organ {shorten(name, 40)!r}{hint}"


def _token(text: str) -> str:
    return "_".join(text.strip().lower().replace("-", " ").replace("_", " ").split())


def _unique(items):
    return tuple(dict.fromkeys(items))
