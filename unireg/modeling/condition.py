"""Condition encoder: prompt, registration type and smoothness -> one vector per pair.

Organs are embedded one phrase each and averaged (order-free); free text without a known
organ is embedded whole. A trainable projection maps the frozen text space into the
controller's space. Instance features are added later, per level, by the controller.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import UniRegConfig
from ..organs import organ_phrase
from ..prompt import REGISTRATION_TYPES, Prompt
from .text_encoder import WHOLE_BODY, TextEmbedder


def prompt_phrases(prompt: Prompt) -> list[str]:
    if prompt.organs:
        return [organ_phrase(o) for o in prompt.organs]
    if prompt.text and not prompt.organs and "|" not in prompt.text and len(prompt.text.split()) >= 3:
        return [prompt.text]
    return [WHOLE_BODY]


class ConditionEncoder(nn.Module):
    def __init__(self, config: UniRegConfig, embedder: TextEmbedder):
        super().__init__()
        self.embedder = embedder
        self.default_smoothness = dict(config.default_smoothness)
        self.prompt_proj = nn.Sequential(nn.Linear(config.text_dim, config.prompt_dim), nn.LeakyReLU(0.2))
        self.type_embedding = nn.Embedding(len(REGISTRATION_TYPES), config.type_dim)
        self.out_dim = config.prompt_dim + config.type_dim + 4

    def text_embeddings(self, prompts: list[Prompt]) -> torch.Tensor:
        """Mean phrase embedding per prompt, [B, text_dim]."""
        return torch.stack([self.embedder.embed(prompt_phrases(p)).mean(0) for p in prompts])

    def phrase_embeddings(self, prompts: list[Prompt], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's phrases one by one, padded: [B, K, text_dim] and which are real, [B, K] (the organ map
        matches voxels against every named organ, where the condition vector needs only their mean)."""
        per_prompt = [self.embedder.embed(prompt_phrases(p)) for p in prompts]
        k = max(len(e) for e in per_prompt)
        phrases = torch.zeros(len(prompts), k, per_prompt[0].shape[1])
        valid = torch.zeros(len(prompts), k, dtype=torch.bool)
        for b, e in enumerate(per_prompt):
            phrases[b, :len(e)], valid[b, :len(e)] = e, True
        return phrases.to(device), valid.to(device)

    def forward(self, prompts: list[Prompt], device: torch.device) -> torch.Tensor:
        text = self.text_embeddings(prompts).to(device)
        dtype = self.prompt_proj[0].weight.dtype
        type_ids = torch.tensor([REGISTRATION_TYPES.index(p.type) for p in prompts], device=device)
        lam = torch.tensor([self.smoothness_of(p) for p in prompts], device=device, dtype=torch.float32)
        # Smoothness as a few Fourier features so the controller can respond non-linearly to it.
        lam_feat = torch.stack([lam, torch.sin(math.pi * lam), torch.cos(math.pi * lam), lam ** 2], dim=1)
        return torch.cat([self.prompt_proj(text.to(dtype)), self.type_embedding(type_ids),
                          lam_feat.to(dtype)], dim=1)

    def smoothness_of(self, prompt: Prompt) -> float:
        return prompt.smoothness if prompt.smoothness is not None else self.default_smoothness[prompt.type]
