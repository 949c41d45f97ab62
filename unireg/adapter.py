"""Few-shot adapters: a task's learned prompt embedding and low-rank controller updates.

An adapter changes only the conditioning path of a trained UniReg model, never its weights:

* ``prompt_embedding`` replaces the projected prompt vector (the first ``prompt_dim`` entries of
  ``model.condition``'s output) - a learned "word" for a structure the model was not trained on;
* per controller, a LoRA update of its first layer (``mlp[0]``: condition + instance feature ->
  hidden) and of its output layer (hidden -> dynamic-head kernels), so the generated heads can
  bend towards the new task while the frozen base stays intact.

``with adapter.applied(model): ...`` attaches these with forward hooks for the duration and
removes them after, so the base model is untouched and can serve other prompts next. While an
adapter is applied, every registration is the adapter's task: the prompt embedding is replaced
whatever the prompt text says (type and smoothness still come from the prompt).

The file is a small safetensors file whose metadata names the prompt and the base model (its id
and a fingerprint of its config and weights), so an adapter is refused on another base model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError

FORMAT = "unireg-adapter"
FORMAT_VERSION = "1"


class AdapterError(UserError):
    """An adapter file cannot be read, or does not belong to the model it is used with."""


# ------------------------------------------------------------------------------- base identity
def base_model_id(model) -> str:
    """A readable name for the base model: where it was loaded from when known."""
    for owner in (model, getattr(model, "config", None)):
        name = getattr(owner, "name_or_path", None)
        if name:
            return str(name)
    return f"unireg-{getattr(model.config, 'size', 'model')} (unnamed)"


def base_fingerprint(model) -> str:
    """sha256 (16 hex digits) of the config, every tensor's name and shape, the conditioning path's
    weights in full (prompt projection, type embedding, controllers: what an adapter builds on)
    and a strided sample of up to 4096 values of every other tensor, as float32.

    Cheap for any model size, and a fine-tuned or differently built model does not match.
    """
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().flatten()
        if not name.startswith(("condition.", "controllers.")) and values.numel() > 4096:
            values = values[:: values.numel() // 4096 + 1]
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(values.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------ weights
class LowRank(nn.Module):
    """``x -> (x @ A^T) @ B^T``: a rank-``r`` update of a ``in_dim -> out_dim`` linear layer.

    B starts at zero, so a fresh adapter leaves the model exactly as it was.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_dim, generator=generator) / math.sqrt(in_dim))
        self.B = nn.Parameter(torch.zeros(out_dim, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T


class ControllerLoRA(nn.Module):
    """LoRA for one level's controller: its hidden layer and its kernel-generating output."""

    def __init__(self, hidden_in: int, hidden: int, num_params: int, rank: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.hidden = LowRank(hidden_in, hidden, rank, generator)
        self.out = LowRank(hidden, num_params, rank, generator)

    @staticmethod
    def shape_of(controller) -> tuple[int, int, int]:
        return controller.mlp[0].in_features, controller.mlp[0].out_features, controller.out.out_features


class AdapterWeights(nn.Module):
    """The trainable part: one prompt vector and a LoRA pair per controller (none at rank 0: the
    prompt vector alone, a learned word that cannot change how the heads are built)."""

    def __init__(self, prompt_dim: int, level_shapes: list[tuple[int, int, int]], rank: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.prompt_embedding = nn.Parameter(torch.zeros(prompt_dim))
        self.controllers = nn.ModuleList(ControllerLoRA(*shape, rank, generator) for shape in level_shapes) \
            if rank > 0 else nn.ModuleList()


# ------------------------------------------------------------------------------------ adapter
class Adapter:
    """A few-shot task adapter for one base model; see the module docstring."""

    def __init__(self, weights: AdapterWeights, metadata: dict):
        self.weights = weights
        self.metadata = dict(metadata)

    @property
    def prompt(self) -> str:
        return self.metadata.get("prompt", "")

    @property
    def rank(self) -> int:
        return int(self.metadata["rank"])

    @classmethod
    def create(cls, model, prompt, rank: int = 4, seed: int = 0) -> "Adapter":
        """A fresh adapter for ``model``: the prompt's own projected embedding, zero LoRA updates
        (``rank=0``: no LoRA, the prompt embedding alone)."""
        from .prompt import parse_prompt
        if isinstance(rank, bool) or int(rank) != rank or rank < 0:
            raise AdapterError(f"adapter rank must be a whole number >= 0 (0: the prompt embedding alone), got {rank}")
        rank = int(rank)
        parsed = parse_prompt(prompt)
        with torch.no_grad():
            text = model.condition.text_embeddings([parsed]).to(next(model.parameters()).device)
            projected = model.condition.prompt_proj(text.to(model.condition.prompt_proj[0].weight.dtype))[0]
        weights = AdapterWeights(projected.shape[0], [ControllerLoRA.shape_of(c) for c in model.controllers],
                                 rank, seed)
        with torch.no_grad():
            weights.prompt_embedding.copy_(projected.float().cpu())
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "prompt": str(prompt),
                    "parsed_prompt": str(parsed), "rank": rank, "base_model": base_model_id(model),
                    "base_fingerprint": base_fingerprint(model)}
        return cls(weights, metadata)

    # ------------------------------------------------------------------------------- file
    def save(self, path: "str | Path") -> Path:
        """Write the adapter as safetensors; metadata values are stored as JSON strings."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.weights.state_dict().items()}
        save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in self.metadata.items()})
        return path

    @classmethod
    def load(cls, source: "str | Path | Adapter") -> "Adapter":
        """An adapter from a file (or an ``Adapter``, returned as is); a clear error otherwise."""
        if isinstance(source, Adapter):
            return source
        from safetensors import safe_open
        path = Path(source)
        if not path.is_file():
            raise AdapterError(f"adapter file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types for foreign files
            raise AdapterError(f"{path} is not a readable adapter file ({str(exc).splitlines()[0]}); "
                               f"adapters are safetensors files written by `unireg adapt`") from None
        try:
            metadata = {k: json.loads(v) for k, v in raw.items()}
        except json.JSONDecodeError:
            metadata = {}
        if metadata.get("format") != FORMAT:
            raise AdapterError(f"{path} is a safetensors file but not a UniReg adapter (no '{FORMAT}' metadata)")
        if str(metadata.get("format_version")) != FORMAT_VERSION:
            raise AdapterError(f"{path} is adapter format version {metadata.get('format_version')}; "
                               f"this UniReg reads version {FORMAT_VERSION}")
        return cls(_weights_from_tensors(tensors, int(metadata["rank"]), path), metadata)

    # ------------------------------------------------------------------------- use on a model
    def check_compatible(self, model) -> None:
        """Refuse a model other than the adapter's base, naming both."""
        mine, theirs = self.metadata.get("base_fingerprint"), base_fingerprint(model)
        if mine != theirs:
            raise AdapterError(
                f"adapter for {self.prompt!r} was made for base model {self.metadata.get('base_model')!r} "
                f"(fingerprint {mine}) and cannot be used with {base_model_id(model)!r} (fingerprint {theirs}); "
                f"adapt again from this model")

    @contextlib.contextmanager
    def applied(self, model, check: bool = True):
        """Attach the adapter to ``model`` for the duration of the ``with`` block.

        Gradients flow into the adapter's weights (that is how :func:`unireg.adapt.adapt` trains
        it); the model's own weights and modules are never changed and the hooks are removed on
        exit, also when the block raises.
        """
        if check:
            self.check_compatible(model)
        if getattr(model, "_unireg_active_adapter", None) is not None:
            raise AdapterError("another adapter is already applied to this model; apply one at a time")
        device = next(model.parameters()).device
        self.weights.to(device)
        handles = []
        try:
            handles.append(model.condition.register_forward_hook(self._condition_hook))
            for controller, lora in zip(model.controllers, self.weights.controllers):
                handles.extend(_attach_controller(controller, lora))
            model._unireg_active_adapter = self
            yield model
        finally:
            for handle in handles:
                handle.remove()
            model._unireg_active_adapter = None

    def _condition_hook(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        size = self.weights.prompt_embedding.shape[0]
        prompt = self.weights.prompt_embedding.to(output.dtype).expand(output.shape[0], size)
        return torch.cat([prompt, output[:, size:]], dim=1)

    def summary(self) -> dict:
        return dict(self.metadata)

    def __repr__(self) -> str:
        return (f"Adapter(prompt={self.prompt!r}, rank={self.metadata.get('rank')}, "
                f"base={self.metadata.get('base_model')!r}, k={self.metadata.get('k')})")


def _attach_controller(controller, lora: ControllerLoRA) -> list:
    """Hooks adding the LoRA terms: on ``mlp[0]`` directly, and on the controller's output from
    the hidden vector captured at ``mlp`` (the controller applies ``out`` through F.linear).

    The output update is not scaled by the controller's 1/hidden: that scale tames Adam on a full
    hidden x params matrix, while a rank-r product moves only r terms per kernel entry.
    """
    hidden = {}

    def first_layer(module, inputs, output):
        return output + lora.hidden(inputs[0])

    def capture(module, inputs, output):
        hidden["value"] = output

    def kernels(module, inputs, output):
        return output + lora.out(hidden.pop("value"))

    return [controller.mlp[0].register_forward_hook(first_layer), controller.mlp.register_forward_hook(capture),
            controller.register_forward_hook(kernels)]


def _weights_from_tensors(tensors: dict, rank: int, path: Path) -> AdapterWeights:
    """Rebuild the modules from the tensors' shapes, then load them strictly."""
    try:
        levels = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("controllers.")})
        if rank > 0 and not levels:
            raise KeyError("controllers")
        shapes = [(tensors[f"controllers.{i}.hidden.A"].shape[1], tensors[f"controllers.{i}.hidden.B"].shape[0],
                   tensors[f"controllers.{i}.out.B"].shape[0]) for i in levels]
        weights = AdapterWeights(tensors["prompt_embedding"].shape[0], shapes, rank)
        weights.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except (KeyError, ValueError, IndexError, RuntimeError) as exc:
        raise AdapterError(f"{path} does not hold a complete rank-{rank} adapter "
                           f"({str(exc).splitlines()[0]})") from None
    return weights
