"""What the app does, without any UI: load models, register a pair, adapt to a new structure.

The Gradio handlers in :mod:`app.ui` are thin wrappers around these functions, which take
paths and plain values and raise the library's own errors (``InputError``, ``PromptError``,
``AdapterError`` ...); the UI turns those into a message in the page.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import re
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from unireg.adapter import Adapter
from unireg.hub import DEFAULT_MODEL
from unireg.io import InputError, load_image, load_labels

PIPELINES = ("network only", "fast", "full", "full + organ focus")
#: What the Register tab starts with: the Python API's default (``register(..., refine="auto")``). With
#: "network only" the example pair's pancreas Dice fell (0.620 -> 0.469 in the README's screenshot).
DEFAULT_PIPELINE = "full"
FULL_PIPELINE_STEPS = 50  # test-time optimisation steps for "full" on a UniReg without the refine stage


# ---------------------------------------------------------------------------------------- models
class ModelStore:
    """Models by name or folder, loaded once and shared by every session (read-only use)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, name: str):
        from unireg.api import UniReg
        name = (name or DEFAULT_MODEL).strip()
        with self._lock:
            if name not in self._models:
                model = UniReg.from_pretrained(name, device=self.device)
                if not getattr(model, "name_or_path", None):
                    model.name_or_path = name
                self._models[name] = model
            return self._models[name]


def shipped_model_names() -> list[str]:
    from unireg.hub import shipped_models
    return shipped_models() or [DEFAULT_MODEL]


# ------------------------------------------------------------------------------------- run folders
class RunFolders:
    """Per-run output folders under one temporary root: old runs pruned, the root removed at exit."""

    def __init__(self, max_age_s: float = 3600.0):
        self.root = Path(tempfile.mkdtemp(prefix="unireg-app-"))
        self.max_age_s = max_age_s
        atexit.register(self.cleanup)

    def new(self, kind: str) -> Path:
        self.prune()
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root))

    def prune(self) -> None:
        now = time.time()
        for folder in self.root.glob("*"):
            if folder.is_dir() and now - folder.stat().st_mtime > self.max_age_s:
                shutil.rmtree(folder, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ uploads
def check_upload(path, what: str, max_mb: float | None, required: bool = True) -> str | None:
    """An uploaded file's path, or a clear error naming the input."""
    if path is None or path == "":
        if required:
            raise InputError(f"{what}: no file given; upload a NIfTI file (.nii or .nii.gz), a .zip of a DICOM series "
                             f"or pick an example")
        return None
    path = Path(getattr(path, "name", path))
    if not path.is_file():
        raise InputError(f"{what}: uploaded file is missing ({path.name}); upload it again")
    if max_mb is not None and path.stat().st_size > max_mb * 1e6:
        raise InputError(f"{what}: {path.name} is {path.stat().st_size / 1e6:.1f} MB, over the {max_mb:g} MB limit")
    return str(path)


def load_scan(path: str, what: str, max_mb: float | None) -> nib.Nifti1Image:
    """An uploaded scan: an image file, or a ``.zip`` of one DICOM series folder (browsers upload files,
    not folders). The archive is unpacked into a temporary folder that is gone once the series is read;
    members that would land outside it, and archives that unpack to more than the upload limit, are refused."""
    if not str(path).lower().endswith(".zip"):
        return load_image(path, what)
    with tempfile.TemporaryDirectory(prefix="unireg-dicom-") as tmp:
        return load_image(_unpack_series(Path(path), Path(tmp), what, max_mb), what)


def _unpack_series(archive: Path, into: Path, what: str, max_mb: float | None) -> Path:
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            unpacked = sum(m.file_size for m in members)
            if max_mb is not None and unpacked > max_mb * 1e6:
                raise InputError(f"{what}: {archive.name} unpacks to {unpacked / 1e6:.0f} MB, over the {max_mb:g} MB limit")
            root = into.resolve()
            for member in members:
                target = (into / member.filename).resolve()
                if root not in target.parents:
                    raise InputError(f"{what}: {archive.name} holds a path outside its folder ({member.filename!r})")
            zipped.extractall(into, members)
    except zipfile.BadZipFile:
        raise InputError(f"{what}: {archive.name} is not a readable zip archive") from None
    folders = sorted({(into / m.filename).parent for m in members if not Path(m.filename).name.startswith(".")})
    if len(folders) != 1:
        raise InputError(f"{what}: {archive.name} holds {'no files' if not folders else 'files in several folders'}; "
                         f"zip the one folder of a DICOM series")
    return folders[0]


_ROLE = re.compile(r"(fixed_labels|moving_labels|fixed_seg|moving_seg|fixed|moving)\.nii(\.gz)?$", re.IGNORECASE)


def group_pair_uploads(paths: list, max_mb: float | None = None) -> list[dict]:
    """Uploaded files named ``<pair>_fixed.nii.gz``, ``<pair>_moving.nii.gz``,
    ``<pair>_fixed_labels.nii.gz``, ``<pair>_moving_labels.nii.gz`` -> pair dicts."""
    pairs: dict[str, dict] = {}
    for raw in paths or []:
        path = check_upload(raw, "training pair file", max_mb)
        name = Path(path).name
        match = _ROLE.search(name)
        if not match:
            raise InputError(f"{name}: training pair files must be NIfTI named <pair>_fixed.nii.gz, <pair>_moving.nii.gz, "
                             f"<pair>_fixed_labels.nii.gz and <pair>_moving_labels.nii.gz")
        role = match.group(1).lower().replace("_seg", "_labels")
        pairs.setdefault(name[:match.start()].rstrip("_-. ") or "pair", {})[role] = path
    for key, pair in pairs.items():
        missing = [r for r in ("fixed", "moving", "fixed_labels", "moving_labels") if r not in pair]
        if missing:
            raise InputError(f"training pair {key!r} lacks {', '.join(missing)}")
    if not pairs:
        raise InputError("no training pairs: upload files or use the shipped examples")
    return [pairs[k] for k in sorted(pairs)]


# -------------------------------------------------------------------------------------- register
@dataclass
class Registration:
    result: object
    files: dict = field(default_factory=dict)
    fixed_labels: nib.Nifti1Image | None = None
    moving_labels: nib.Nifti1Image | None = None

    def metrics(self) -> dict:
        return self.result.summary()


def pipeline_options(register, pipeline: str) -> dict:
    """Keyword arguments selecting a pipeline, for the ``register`` this UniReg has."""
    if pipeline not in PIPELINES:
        raise InputError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    params = inspect.signature(register).parameters
    if pipeline == "network only":
        options = {"refine": False} if "refine" in params else {"optimize_steps": 0}
        if "align" in params:
            options["align"] = "none"
        return options
    if pipeline == "full + organ focus":
        if "focus" not in params:
            raise InputError("this model's register has no organ focus; choose full")
        return {"focus": True}
    if "refine" not in params:
        return {"optimize_steps": FULL_PIPELINE_STEPS}
    return {"refine": "fast"} if pipeline == "fast" else {}


def register_pair(model, fixed, moving, fixed_labels=None, moving_labels=None, prompt: str = "",
                  pipeline: str = DEFAULT_PIPELINE, adapter: Adapter | None = None, out_dir: Path | None = None,
                  max_mb: float | None = None, progress=None) -> Registration:
    """Check the uploads, register, and write the downloads into ``out_dir``.

    ``progress(level, step, loss)`` follows the refinement stage when the pipeline reports it.
    """
    fixed = check_upload(fixed, "fixed scan", max_mb)
    moving = check_upload(moving, "moving scan", max_mb)
    fixed_labels = check_upload(fixed_labels, "fixed labels", max_mb, required=False)
    moving_labels = check_upload(moving_labels, "moving labels", max_mb, required=False)
    fixed_img, moving_img = load_scan(fixed, "fixed scan", max_mb), load_scan(moving, "moving scan", max_mb)
    fixed_lab = load_labels(fixed_labels, fixed_img, "fixed labels") if fixed_labels else None
    moving_lab = load_labels(moving_labels, moving_img, "moving labels") if moving_labels else None
    kwargs = pipeline_options(model.register, pipeline)
    params = inspect.signature(model.register).parameters
    if progress is not None and "progress" in params:
        kwargs["progress"] = progress
    if adapter is not None and "adapter" in params:
        kwargs["adapter"] = adapter
        adapter = None
    with adapter.applied(model) if adapter is not None else contextlib.nullcontext():
        result = model.register(fixed_img, moving_img, prompt=prompt or None, moving_labels=moving_lab,
                                fixed_labels=fixed_lab, **kwargs)
    files = {}
    if out_dir is not None:
        # The downloads include the inverse (the fixed labels on the moving scan, the inverse field) unless the
        # field folds somewhere (then it has none; the registration's own outputs are written as always).
        files = {k: Path(v) for k, v in result.save(out_dir, inverse=result.invertible).items()}
    return Registration(result, files, fixed_lab, moving_lab)


# ------------------------------------------------------------------------------------------ adapt
def adapt_model(model, pairs: list[dict], prompt: str, structure: str | None, steps: int, rank: int | None = None,
                lr: float = 3e-3, held_out: list[dict] | None = None, callback=None) -> Adapter:
    """``unireg.adapt.adapt`` for the app (``rank=None``: its default, the prompt embedding alone)."""
    from unireg.adapt import DEFAULT_RANK, adapt
    return adapt(model, pairs, prompt, steps=int(steps), rank=DEFAULT_RANK if rank is None else int(rank),
                 lr=float(lr), held_out=held_out, structure=structure or None, progress=False, callback=callback)


def loss_curve_png(adapter: Adapter, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = adapter.metadata.get("loss_curve", [])
    window = adapter.metadata.get("loss_curve_window", 1)
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.plot([window * (i + 1) for i in range(len(curve))], curve, marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {window})" if window > 1 else "loss")
    ax.set_title(f"adapting to {adapter.metadata.get('parsed_prompt', adapter.prompt)}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
