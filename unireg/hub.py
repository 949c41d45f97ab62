"""Finding and writing model folders (Hugging Face layout).

A model folder holds ``config.json``, ``model.safetensors`` and ``prompt_cache.safetensors``
(text embeddings per phrase, so known prompts need no text model). Names resolve in order:
a model shipped inside this package, a local folder, a Hugging Face hub id.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROMPT_CACHE_NAME = "prompt_cache.safetensors"

SHIPPED_DIR = Path(__file__).parent / "checkpoints"
#: The shipped model that the command line, the app and the demo use unless told otherwise.
DEFAULT_MODEL = "unireg-tiny-phantom"


def shipped_models() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / CONFIG_NAME).is_file())


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    if str(name_or_path) in shipped_models():
        return SHIPPED_DIR / str(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ModelLoadError(f"{path} is not a UniReg model folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise ModelLoadError(f"no UniReg model {str(name_or_path)!r}: not a shipped model "
                                f"({', '.join(shipped_models()) or 'none installed'}), a model folder or a hub id")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision,
                                      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, PROMPT_CACHE_NAME, "*.md"]))
    except Exception as exc:
        raise ModelLoadError(f"cannot fetch {name_or_path!r} from the Hugging Face hub ({exc})") from None


def read_config_dict(folder: Path) -> dict:
    """``config.json`` of a model folder as a dict; a clear error when it is not JSON."""
    path = folder / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path, required: bool = True) -> dict:
    """Tensors of a safetensors file (never a pickle); a clear error for a corrupt file."""
    from safetensors.torch import load_file
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path} not found")
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated / foreign files
        raise ModelLoadError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                             f"UniReg weights are safetensors, never pickles") from None
