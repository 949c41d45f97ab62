"""Seconds and peak memory per stage for a clinical-size pair (512x512x400 int16 by default).

    python bench/full_size.py [--size 512 512 400] [--threads 2] [--out DIR] [--data DIR] [--full] [--inverse]
                              [--device cpu|cuda] [--no-save] [--apply]

A CT-like pair (two phantom subjects rendered coarse and upsampled to ``--size`` at
0.8 x 0.8 x 1.0 mm, int16 HU, uint8 labels, ``.nii.gz``) is generated once into ``--data`` in a
child process, so its memory and time count nowhere. This process then loads the shipped
model, runs ``register`` with the network alone (``refine=False, align="none"`` where
``register`` has them; ``--full``: its defaults) and ``result.save`` (``--inverse``: with the inverse
field and the fixed scan and labels on the moving grid), and prints a table. ``--device cuda`` puts
the model on the GPU (each stage waits for the GPU before it is timed; the GPU's own peak memory is
printed too); ``--no-save`` leaves ``result.save`` out. ``--apply`` then applies the saved folder as a user
coming back to it would (``unireg apply``: ``load_registration``, the moving scan and its labels onto the fixed
grid), in a fresh child process whose seconds and peak memory are its own.

Stages are timed by wrapping the io / network / visualisation functions wherever the package
imported them (outermost call wins, so the slices the overview warps count as "overview").
Peak memory is the process's resident set size (RSS) sampled every 5 ms by a thread (psutil),
per stage (a busy machine can starve the sampler, so spikes may be missed); "max RSS rose to"
is exact: the kernel's process maximum (``getrusage`` ru_maxrss) where a stage raised it. The
last line gives that maximum for the whole run, importing torch and loading the model included.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import multiprocessing
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PROMPT = "inter | liver, spleen, kidney_left, kidney_right"
SPACING = (0.8, 0.8, 1.0)  # mm, (i, j, k) of the generated scans


# ------------------------------------------------------------------------------------ the pair
def generate_pair(size: tuple[int, int, int], folder: Path) -> dict[str, Path]:
    """Two phantom subjects, rendered at ~4 mm and upsampled to ``size`` (i, j, k)."""
    import nibabel as nib
    from scipy import ndimage

    from data_tools.phantom import make_subject

    paths = {k: folder / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    coarse = tuple(max(8, round(n * s / 4.0)) for n, s in zip(size[::-1], SPACING[::-1]))  # (z, y, x)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -np.array(SPACING) * (np.array(size) - 1) / 2
    for role, seed in (("fixed", 0), ("moving", 1)):
        subject = make_subject(seed, shape=coarse, spacing_mm=[n * s / c for n, s, c in
                                                                zip(size[::-1], SPACING[::-1], coarse)])
        zoom = [n / c for n, c in zip(size[::-1], coarse)]
        ct = ndimage.zoom(subject.image.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
        labels = ndimage.zoom(subject.labels, zoom, order=0, grid_mode=True, mode="nearest")
        nib.save(nib.Nifti1Image(np.rint(ct.T).astype(np.int16), affine), paths[role])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T), affine), paths[f"{role}_labels"])
        del ct, labels
    return paths


# ------------------------------------------------------------------------------ measurement
class StageMeter:
    """Wall seconds and sampled peak RSS per named stage; nested stages count for the outer one."""

    def __init__(self, interval_s: float = 0.005):
        import psutil
        self._process = psutil.Process()
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self._active: str | None = None
        self.outside: str | None = None   # where samples go while no wrapped function runs
        self.rose: dict[str, int] = {}      # stage -> process maximum RSS reached during it (exact)
        self._max_seen = _max_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self._process.memory_info().rss

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            stage = self._active or self.outside
            if stage is not None:
                self.peak[stage] = max(self.peak.get(stage, 0), self.rss())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, fn, name):
        """``fn`` timed as stage ``name`` (a string, or a function of the call's arguments)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._active is not None:
                return fn(*args, **kwargs)
            stage = name(*args, **kwargs) if callable(name) else name
            self._note_rise(self.outside)
            self._active = stage
            self.peak[stage] = max(self.peak.get(stage, 0), self.rss())
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                _wait_for_gpu()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
                self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu
                self.peak[stage] = max(self.peak.get(stage, 0), self.rss())
                self._note_rise(stage)
                self._active = None
        return timed

    def _note_rise(self, stage: str | None) -> None:
        """The kernel's process maximum is exact where sampling may miss a spike: note where it rises."""
        now = _max_rss()
        if now > self._max_seen and stage is not None:
            self.rose[stage] = now
        self._max_seen = max(self._max_seen, now)


def _wait_for_gpu() -> None:
    """Kernels run asynchronously: a stage ends when the GPU has finished its work."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _replace_everywhere(original, replacement) -> None:
    """Swap ``original`` for ``replacement`` in every loaded unireg module that imported it."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("unireg"):
            for attr, value in list(vars(module).items()):
                if value is original:
                    setattr(module, attr, replacement)


def instrument(meter: StageMeter, model) -> None:
    import nibabel as nib

    from unireg import inverse, io, visualize
    for fn, stage in ((io.load_image, "load"), (io.load_labels, "load"), (io.field_on_grid, "map field back"),
                      (io.save_nifti, "write warped.nii.gz"),
                      (io.write_itk_displacement, "write displacement_itk.nii.gz"),
                      (visualize.overview_png, "overview.png"), (inverse.inverse_field, "inverse field")):
        _replace_everywhere(fn, meter.wrap(fn, stage))
    warp_params = list(inspect.signature(io.warp_volume).parameters)

    def warp_stage(*args, **kwargs):
        position = warp_params.index("labels")
        labels = kwargs.get("labels", args[position] if len(args) > position else False)
        return "warp labels" if labels else "warp image"
    _replace_everywhere(io.warp_volume, meter.wrap(io.warp_volume, warp_stage))
    io.WorkingGrid.resample = meter.wrap(io.WorkingGrid.resample, "resample to working grid")
    nib.save = meter.wrap(nib.save, "write warped_labels.nii.gz")
    model.forward = meter.wrap(model.forward, "network")


def measure(paths: dict[str, Path], out: Path, full_pipeline: bool = False, with_inverse: bool = False,
            device: str = "cpu", save: bool = True) -> None:
    import torch

    from unireg import UniReg

    meter = StageMeter()
    start = time.perf_counter()
    model = UniReg.from_pretrained("unireg-tiny-phantom", device=device)
    load_model_s = time.perf_counter() - start
    baseline = meter.rss()
    instrument(meter, model)
    params = inspect.signature(model.register).parameters
    network_alone = {"refine": False, "align": "none"}
    kwargs = {} if full_pipeline else {k: v for k, v in network_alone.items() if k in params}
    meter.outside = "(other) register"
    start, cpu = time.perf_counter(), time.process_time()
    result = model.register(str(paths["fixed"]), str(paths["moving"]), PROMPT,
                            moving_labels=str(paths["moving_labels"]), fixed_labels=str(paths["fixed_labels"]),
                            **kwargs)
    register_s, register_cpu = time.perf_counter() - start, time.process_time() - cpu
    register_stages, register_stages_cpu = dict(meter.seconds), dict(meter.cpu)
    meter._note_rise("(other) register")
    meter.outside = "(other) save"
    start, cpu = time.perf_counter(), time.process_time()
    if save:
        result.save(out, inverse=with_inverse)
    save_s, save_cpu = time.perf_counter() - start, time.process_time() - cpu
    meter._note_rise("(other) save")
    meter.stop()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux

    gb = lambda b: b / 1e9  # noqa: E731
    gpu = (f", {torch.cuda.get_device_name()}: peak GPU memory {gb(torch.cuda.max_memory_allocated()):.2f} GB"
           if device == "cuda" else "")
    print(f"fixed {result.fixed.shape} {result.fixed.get_data_dtype()}, register({kwargs or 'defaults'}), "
          f"torch threads {torch.get_num_threads()}{gpu}; RSS after loading the model {gb(baseline):.2f} GB "
          f"({load_model_s:.1f} s)")
    print(f"{'stage':<32}{'seconds':>9}{'CPU s':>8}{'peak RSS GB':>13}{'max RSS rose to':>17}")
    parts = (("register", register_s, register_cpu, list(register_stages), {}, {}),
             ("save", save_s, save_cpu, list(meter.seconds), register_stages, register_stages_cpu))
    for part, total, total_cpu, names, before, before_cpu in parts:
        names = [n for n in names if meter.seconds[n] - before.get(n, 0.0) > 0]
        wall = {n: meter.seconds[n] - before.get(n, 0.0) for n in names}
        cpu = {n: meter.cpu[n] - before_cpu.get(n, 0.0) for n in names}
        for stage in names:
            rose = f"{gb(meter.rose[stage]):>17.2f}" if stage in meter.rose else ""
            print(f"  {stage:<30}{wall[stage]:>9.2f}{cpu[stage]:>8.2f}{gb(meter.peak[stage]):>13.2f}{rose}")
        print(f"  {'(other)':<30}{total - sum(wall.values()):>9.2f}{total_cpu - sum(cpu.values()):>8.2f}"
              f"{gb(meter.peak.get(f'(other) {part}', 0)):>13.2f}"
              + (f"{gb(meter.rose[f'(other) {part}']):>17.2f}" if f"(other) {part}" in meter.rose else ""))
        print(f"{part + ' total':<32}{total:>9.2f}{total_cpu:>8.2f}")
    stages = result.metrics.get("stages", [])
    if stages:
        print("register's own stages (metrics.json): " + ", ".join(
            f"{st['stage']} {st.get('seconds', float('nan')):.2f} s" for st in stages))
    print(f"{'register + save':<32}{register_s + save_s:>9.2f}{register_cpu + save_cpu:>8.2f}"
          f"{peak_kb * 1024 / 1e9:>13.2f}  (process peak, getrusage)")
    if save:
        sizes = {p.name: p.stat().st_size / 1e6 for p in sorted(out.iterdir())}
        print("files (MB): " + ", ".join(f"{name} {mb:.1f}" for name, mb in sizes.items()))


def apply_saved(out: Path, paths: dict[str, Path]) -> dict:
    """``unireg apply``'s work on the saved folder (run in a fresh process): seconds per step, peak RSS."""
    from unireg.apply import apply_to_image
    from unireg.saved import load_registration
    seconds = {}
    start = time.perf_counter()
    saved = load_registration(out)
    seconds["load_registration"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("moving", "moving_labels"):
            start = time.perf_counter()
            apply_to_image(saved, paths[name], Path(tmp) / f"{name}_on_fixed.nii.gz")
            seconds[f"apply {name}"] = time.perf_counter() - start
    return {"seconds": seconds, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def print_apply(report: dict) -> None:
    print("unireg apply on the saved folder (fresh process): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in report["seconds"].items())
          + f"; total {sum(report['seconds'].values()):.2f} s, process peak {report['peak_kb'] * 1024 / 1e9:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 400), metavar=("I", "J", "K"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--data", type=Path, default=None, help="folder for the generated pair (reused)")
    parser.add_argument("--full", action="store_true", help="the default pipeline instead of the network alone")
    parser.add_argument("--inverse", action="store_true", help="save the inverse outputs too (register --inverse)")
    parser.add_argument("--out", type=Path, default=None, help="folder for result.save (default: a temporary one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    parser.add_argument("--no-save", action="store_true", help="register only: leave result.save out")
    parser.add_argument("--apply", action="store_true", help="then apply the saved folder to the moving scan and "
                                                             "its labels in a fresh process (unireg apply)")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch   # here only for the check: the pair is generated before this process loads anything large
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device on this machine")
    size = tuple(args.size)
    data = args.data or Path(tempfile.gettempdir()) / f"unireg_full_size_{'x'.join(map(str, size))}"
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # generation's memory stays in the child
        paths = pool.apply(generate_pair, (size, data))
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.apply and args.no_save:
        parser.error("--apply applies the saved folder: leave out --no-save")
    # The process that applies the saved folder is started now, while this one is small: a child's peak memory
    # (getrusage's ru_maxrss) starts from its parent's size at the fork.
    applier = multiprocessing.get_context("spawn").Pool(1) if args.apply else None
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "out"
        measure(paths, out, args.full, args.inverse, args.device, not args.no_save)
        if applier is not None:
            with applier:
                print_apply(applier.apply(apply_saved, (out, paths)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
