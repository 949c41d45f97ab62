"""The Gradio page: a Register tab and a Few-shot tab, wired to :mod:`app.backend`.

Handlers never let an exception escape as a stack trace: a problem with an input becomes a
``gr.Error`` naming it (shown in the page), and the session keeps working. The registration and
adaptation handlers carry ``api_name`` s, so ``gradio_client`` can call them (``/register``,
``/adapt``, ``/register_with_adapter``).
"""
from __future__ import annotations

import functools
import logging

import gradio as gr

from unireg.organs import ORGAN_TO_ID, ORGANS

from . import examples
from .backend import (DEFAULT_MODEL, DEFAULT_PIPELINE, PIPELINES, ModelStore, RunFolders, adapt_model, check_upload,
                      group_pair_uploads, loss_curve_png, register_pair, shipped_model_names)
from .views import PLANES, VIEWS, Views

logger = logging.getLogger(__name__)

TYPES = {"inter-subject": "inter", "intra-subject": "intra"}
EXAMPLES = {
    "phantom pair A (inter-subject)": lambda: examples.example_pair(20),
    "phantom pair B (inter-subject)": lambda: examples.example_pair(21),
    "breathing pair (intra-subject)": lambda: examples.intra_example_pair(0),
}
NO_EXAMPLE = "(upload my own)"
EXAMPLE_PROMPTS = {"phantom pair A (inter-subject)": ("inter-subject", ["liver", "spleen"]),
                   "phantom pair B (inter-subject)": ("inter-subject", ["kidney_left", "kidney_right"]),
                   "breathing pair (intra-subject)": ("intra-subject", ["liver"])}
FEWSHOT_TRAIN_START, FEWSHOT_HELD_OUT = 0, 10
FILE_HEIGHT = 120     # example pair indices (disjoint subjects)
INTRO = """### UniReg: prompted deformable registration of 3-D CT
Pick an example pair or upload a fixed and a moving scan (NIfTI, MHA, NRRD or a zipped DICOM series folder,
optionally with label maps on their grids),
say what to align, and register. Results are shown on the fixed grid; downloads work in ITK, ANTs and 3D Slicer,
and include the other direction: the fixed labels carried onto the moving scan and the inverse field."""
FEWSHOT_INTRO = """### Few-shot: teach UniReg a new structure from a few labelled pairs
Only a small adapter is trained (a learned prompt embedding for the new structure); the model itself
is untouched. Upload pairs as `<pair>_fixed.nii.gz`, `<pair>_moving.nii.gz`, `<pair>_fixed_labels.nii.gz`,
`<pair>_moving_labels.nii.gz`, or use the shipped phantom examples. Measure the adapter on a held-out pair."""


def user_errors(fn):
    """Turn any failure into a message in the page; the app stays usable."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as exc:          # InputError, PromptError, AdapterError, ModelLoadError ...
            raise gr.Error(str(exc)) from None
        except Exception as exc:           # a bug: keep the trace in the server log
            logger.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"unexpected {type(exc).__name__}: {exc}") from None
    return wrapper


def compose_prompt(type_label: str, organs: list[str] | None, custom_smooth: bool, smooth: float) -> str:
    parts = [TYPES.get(type_label, "inter")]
    if organs:
        parts.append(", ".join(organs))
    if custom_smooth:
        parts.append(f"smooth={float(smooth):.2f}")
    return " | ".join(parts)


def build_app(model: str = DEFAULT_MODEL, max_upload_mb: float = 512.0, device: str = "cpu") -> gr.Blocks:
    store, runs = ModelStore(device), RunFolders()
    model_choices = list(dict.fromkeys([model, *shipped_model_names()]))

    def model_picker():
        return gr.Dropdown(model_choices, value=model, allow_custom_value=True, label="Model",
                           info="a shipped model, or the path of a local save_pretrained folder")

    def render_all(views: Views | None, view: str, overlay: bool, *indices):
        if views is None:
            return [None] * 3
        return [views.render(view, plane, int(i) if i is not None else None, overlay) for plane, i in zip(PLANES, indices)]

    # ------------------------------------------------------------------------------ handlers
    @user_errors
    def load_example(choice):
        if choice == NO_EXAMPLE or choice not in EXAMPLES:
            return [gr.update()] * 6
        pair = EXAMPLES[choice]()
        type_label, organs = EXAMPLE_PROMPTS[choice]
        return pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"], type_label, organs

    @user_errors
    def run_register(fixed, moving, fixed_labels, moving_labels, prompt, pipeline, model_name, view, overlay,
                     progress=gr.Progress()):
        progress(0.05, desc="loading model")
        net = store.get(model_name)
        progress(0.2, desc=f"registering ({pipeline})")
        refining = lambda level, step, loss: progress(0.5, desc=f"refining: level {level + 1}, step {step}, "  # noqa: E731
                                                                  f"loss {loss:.3f}")
        reg = register_pair(net, fixed, moving, fixed_labels, moving_labels, prompt, pipeline,
                            out_dir=runs.new("register"), max_mb=max_upload_mb, progress=refining)
        progress(0.8, desc="rendering views")
        views = Views.from_result(reg.result, reg.fixed_labels, reg.moving_labels)
        sliders = [gr.Slider(0, views.slice_count(p) - 1, value=views.slice_count(p) // 2, step=1,
                             label=f"{p} slice") for p in PLANES]
        images = render_all(views, view, overlay, *[None] * 3)
        files = reg.files
        return (metrics_markdown(reg.metrics()), reg.metrics(), views, *images, *sliders,
                str(files["warped"]), str(files["displacement"]),
                str(files["warped_labels"]) if "warped_labels" in files else None, str(files["metrics"]),
                *(str(files[k]) if k in files else None for k in ("inverse_warped_labels", "inverse_displacement")))

    @user_errors
    def run_adapt(source, k, uploads, structure, type_label, prompt, steps, model_name, progress=gr.Progress()):
        progress(0.0, desc="preparing pairs")
        if source == "shipped examples":
            pairs = examples.example_pairs(int(k), start=FEWSHOT_TRAIN_START)
        else:
            pairs = group_pair_uploads(uploads, max_upload_mb)
        prompt = (prompt or "").strip() or f"{TYPES.get(type_label, 'inter')} | {structure}"
        net = store.get(model_name)
        callback = lambda step, total, loss: progress(step / total, desc=f"step {step}/{total}, loss {loss:.3f}")  # noqa: E731
        adapter = adapt_model(net, pairs, prompt, structure, int(steps), callback=callback)
        folder = runs.new("adapt")
        path = adapter.save(folder / f"adapter_{structure or 'task'}.safetensors")
        curve = loss_curve_png(adapter, folder / "loss_curve.png")
        meta = adapter.metadata
        text = (f"**Adapter ready** for `{meta['parsed_prompt']}` (structure: {', '.join(meta['structure'])}) — "
                f"k = {meta['k']} pairs, {meta['steps']} steps in {meta['seconds']:.0f} s")
        if meta.get("validation"):
            val = meta["validation"]
            text += (f" (step count chosen by {val['folds']}-fold cross-validation: kept-out Dice "
                     f"{val['dice_by_step'][0]:.3f} zero-shot, {val['dice_by_step'][val['chosen_step']]:.3f} "
                     f"after {val['chosen_step']} steps)")
        if meta["loss_last"] is None:
            text += ". No step count beat the zero-shot prompt in cross-validation, so this adapter changes nothing."
        else:
            text += (f", loss {meta['loss_first']:.3f} → {meta['loss_last']:.3f}, "
                     f"training-pair Dice ≈ {meta['train_dice_last']:.3f}.")
        return text, str(curve), str(path), adapter

    @user_errors
    def run_held_out(source, fixed, moving, fixed_labels, moving_labels, adapter_file, adapter_state, prompt,
                     structure, type_label, model_name, progress=gr.Progress()):
        from unireg.adapter import Adapter
        if adapter_file:
            adapter = Adapter.load(check_upload(adapter_file, "adapter file", max_upload_mb))
        elif adapter_state is not None:
            adapter = adapter_state
        else:
            raise gr.Error("no adapter yet: run Adapt first, or upload an adapter file")
        if source == "shipped example":
            pair = examples.example_pair(FEWSHOT_HELD_OUT)
            fixed, moving, fixed_labels, moving_labels = (pair[k] for k in ("fixed", "moving", "fixed_labels",
                                                                             "moving_labels"))
        prompt = (prompt or "").strip() or adapter.metadata.get("parsed_prompt") or \
            f"{TYPES.get(type_label, 'inter')} | {structure}"
        net = store.get(model_name)
        progress(0.1, desc="zero-shot registration")
        zero = register_pair(net, fixed, moving, fixed_labels, moving_labels, prompt, "network only",
                             max_mb=max_upload_mb)
        progress(0.5, desc="registration with the adapter")
        adapted = register_pair(net, fixed, moving, fixed_labels, moving_labels, prompt, "network only",
                                adapter=adapter, out_dir=runs.new("held-out"), max_mb=max_upload_mb)
        views = Views.from_result(adapted.result, adapted.fixed_labels, adapted.moving_labels)
        ids = [ORGAN_TO_ID[o] for o in adapter.metadata.get("structure", []) if o in ORGAN_TO_ID]
        images = [views.render("warped", plane, views.centre_of(ids, plane), True, only=ids) for plane in PLANES]
        return comparison_markdown(zero.metrics(), adapted.metrics(), prompt), *images

    # ------------------------------------------------------------------------------------ page
    with gr.Blocks(title="UniReg", delete_cache=(1800, 3600)) as demo:
        with gr.Tab("Register", id="register"):
            gr.Markdown(INTRO)
            with gr.Row():
                with gr.Column(scale=1):
                    example = gr.Dropdown([NO_EXAMPLE, *EXAMPLES], value=NO_EXAMPLE, label="Example pair",
                                          elem_id="example-pair")
                    with gr.Row():
                        fixed = gr.File(label="Fixed scan (NIfTI, MHA, NRRD, DICOM .zip)", height=FILE_HEIGHT, elem_id="fixed-file")
                        moving = gr.File(label="Moving scan (NIfTI, MHA, NRRD, DICOM .zip)", height=FILE_HEIGHT, elem_id="moving-file")
                    with gr.Row():
                        fixed_labels = gr.File(label="Fixed labels (optional)", height=FILE_HEIGHT, elem_id="fixed-labels-file")
                        moving_labels = gr.File(label="Moving labels (optional)", height=FILE_HEIGHT, elem_id="moving-labels-file")
                    model_box = model_picker()
                with gr.Column(scale=1):
                    reg_type = gr.Radio(list(TYPES), value="inter-subject", label="Registration type")
                    organs = gr.Dropdown(ORGANS, multiselect=True, filterable=True, label="Focus on (type to search)",
                                         elem_id="organ-picker")
                    with gr.Row():
                        custom_smooth = gr.Checkbox(False, label="set smoothness")
                        smooth = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="smoothness (0 = flexible, 1 = stiff)",
                                           info="lower for sliding organs, higher for whole-body motion")
                    prompt = gr.Textbox("inter", label="Prompt (composed above, or type your own)",
                                        placeholder='e.g. "intra-subject | liver, spleen | smooth=0.3"',
                                        elem_id="prompt-box")
                    pipeline = gr.Radio(list(PIPELINES), value=DEFAULT_PIPELINE, label="Pipeline",
                                        info="full (the default, as in the Python API): pre-alignment, network and "
                                             "instance optimisation, which also matches uploaded label maps; network "
                                             "only: one forward pass; "
                                             "fast: the pipeline in about 0.8x the time; organ focus: the full "
                                             "pipeline favouring the named organs where a label map shows them")
                    run = gr.Button("Register", variant="primary", elem_id="register-button")
            metrics_md = gr.Markdown(elem_id="metrics")
            with gr.Row():
                view = gr.Radio(list(VIEWS), value="warped", label="View")
                overlay = gr.Checkbox(True, label="label overlay")
            views_state = gr.State(None)
            images, sliders = [], []
            with gr.Row():
                for plane in PLANES:
                    with gr.Column():
                        images.append(gr.Image(label=plane, type="numpy", interactive=False,
                                               elem_id=f"view-{plane}"))
                        sliders.append(gr.Slider(0, 1, value=0, step=1, label=f"{plane} slice"))
            with gr.Row():
                warped_file = gr.File(label="Warped scan", height=FILE_HEIGHT, elem_id="warped-download")
                field_file = gr.File(label="ITK displacement field", height=FILE_HEIGHT, elem_id="field-download")
                labels_file = gr.File(label="Warped labels", height=FILE_HEIGHT, elem_id="labels-download")
                metrics_file = gr.File(label="metrics.json", height=FILE_HEIGHT, elem_id="metrics-download")
            with gr.Row():   # the other direction: fixed-space contours onto the moving scan
                inverse_labels_file = gr.File(label="Fixed labels on the moving scan", height=FILE_HEIGHT,
                                              elem_id="inverse-labels-download")
                inverse_field_file = gr.File(label="Inverse ITK field (moving grid)", height=FILE_HEIGHT,
                                             elem_id="inverse-field-download")
            with gr.Accordion("Metrics (JSON)", open=False):
                metrics_json = gr.JSON()

        with gr.Tab("Few-shot", id="fewshot"):
            gr.Markdown(FEWSHOT_INTRO)
            with gr.Row():
                with gr.Column():
                    source = gr.Radio(["shipped examples", "my uploads"], value="shipped examples",
                                      label="Training pairs")
                    k = gr.Slider(1, 5, value=3, step=1, label="k (shipped example pairs)", elem_id="k-slider")
                    uploads = gr.File(file_count="multiple", label="Labelled pairs (NIfTI)", elem_id="pair-uploads",
                                      height=FILE_HEIGHT)
                    structure = gr.Dropdown(ORGANS, value="duodenum", filterable=True, label="Structure to learn",
                                            info="its label id in your label maps follows TotalSegmentator",
                                            elem_id="structure-picker")
                    fs_type = gr.Radio(list(TYPES), value="inter-subject", label="Registration type")
                    fs_prompt = gr.Textbox("", label="Prompt (optional; default: type | structure)",
                                           placeholder="e.g. align the duodenum between two patients",
                                           elem_id="fewshot-prompt")
                    steps = gr.Slider(5, 300, value=40, step=5, label="adaptation steps", elem_id="steps-slider")
                    fs_model = model_picker()
                    adapt_button = gr.Button("Adapt", variant="primary", elem_id="adapt-button")
                with gr.Column():
                    adapt_md = gr.Markdown(elem_id="adapt-summary")
                    curve = gr.Image(label="loss", type="filepath", interactive=False, elem_id="loss-curve")
                    adapter_file = gr.File(label="Adapter (safetensors)", height=FILE_HEIGHT, elem_id="adapter-download")
                    adapter_state = gr.State(None)
            gr.Markdown("#### Register a held-out pair with the adapter")
            with gr.Row():
                with gr.Column():
                    held_source = gr.Radio(["shipped example", "my upload"], value="shipped example",
                                           label="Held-out pair")
                    with gr.Accordion("my held-out pair", open=False):
                        with gr.Row():
                            h_fixed = gr.File(label="Fixed scan", height=FILE_HEIGHT)
                            h_moving = gr.File(label="Moving scan", height=FILE_HEIGHT)
                        with gr.Row():
                            h_fixed_lab = gr.File(label="Fixed labels", height=FILE_HEIGHT)
                            h_moving_lab = gr.File(label="Moving labels", height=FILE_HEIGHT)
                    with gr.Accordion("use an adapter file instead", open=False):
                        adapter_upload = gr.File(label="Adapter (.safetensors)", height=FILE_HEIGHT,
                                                 file_types=[".safetensors"])
                    held_button = gr.Button("Register held-out pair", variant="primary", elem_id="held-out-button")
                with gr.Column():
                    held_md = gr.Markdown(elem_id="held-out-metrics")
            with gr.Row():
                held_images = [gr.Image(label=f"warped with the adapter + structure (fixed outline), {p}", type="numpy", interactive=False,
                                        elem_id=f"held-out-{p}") for p in PLANES]

        # ---------------------------------------------------------------------------- wiring
        example.change(load_example, example, [fixed, moving, fixed_labels, moving_labels, reg_type, organs],
                       api_visibility="private")
        for trigger in (reg_type, organs, custom_smooth, smooth):
            trigger.change(compose_prompt, [reg_type, organs, custom_smooth, smooth], prompt, api_visibility="private")
        run.click(run_register, [fixed, moving, fixed_labels, moving_labels, prompt, pipeline, model_box, view, overlay],
                  [metrics_md, metrics_json, views_state, *images, *sliders, warped_file, field_file, labels_file,
                   metrics_file, inverse_labels_file, inverse_field_file], api_name="register", concurrency_limit=1)
        for trigger in (view, overlay):
            trigger.change(render_all, [views_state, view, overlay, *sliders], images, api_visibility="private",
                           show_progress="hidden")
        for plane, slider, image in zip(PLANES, sliders, images):
            slider.release(lambda v, name, o, i, plane=plane: v.render(name, plane, int(i), o) if v else None,
                           [views_state, view, overlay, slider], image, api_visibility="private",
                           show_progress="hidden")
        adapt_button.click(run_adapt, [source, k, uploads, structure, fs_type, fs_prompt, steps, fs_model],
                           [adapt_md, curve, adapter_file, adapter_state], api_name="adapt", concurrency_limit=1)
        held_button.click(run_held_out, [held_source, h_fixed, h_moving, h_fixed_lab, h_moving_lab, adapter_upload,
                                         adapter_state, fs_prompt, structure, fs_type, fs_model],
                          [held_md, *held_images], api_name="register_with_adapter", concurrency_limit=1)
    demo.max_upload_mb = max_upload_mb
    demo.unireg_runs = runs
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """``demo.launch`` with the upload cap and the example cache allowed as a file source."""
    allowed = [str(examples.cache_dir()), str(demo.unireg_runs.root), *kwargs.pop("allowed_paths", [])]
    kwargs.setdefault("max_file_size", f"{demo.max_upload_mb:g}mb")
    kwargs.setdefault("show_error", True)
    return demo.queue(default_concurrency_limit=1).launch(allowed_paths=allowed, **kwargs)


# ------------------------------------------------------------------------------------- text
def metrics_markdown(summary: dict) -> str:
    jac = summary.get("jacobian", {})
    lines = [f"**Registered** `{summary.get('prompt')}` in **{summary.get('seconds', 0):.2f} s** — "
             f"max displacement {summary.get('max_displacement_mm', 0):.1f} mm, "
             f"non-positive Jacobian {jac.get('nonpositive_jacobian_pct', 0):.3f} %, "
             f"SD log J {jac.get('sd_log_jacobian', 0):.3f}"]
    before, after = summary.get("dice_before"), summary.get("dice_after")
    if before and after:
        lines += ["", "| structure | Dice before | Dice after |", "|---|---|---|"]
        lines += [f"| {name} | {before[name]:.3f} | {after.get(name, float('nan')):.3f} |" for name in before]
        lines.append(f"| **mean** | **{summary['mean_dice_before']:.3f}** | **{summary['mean_dice_after']:.3f}** |")
        if summary.get("dice_note"):       # the optimiser saw both label maps: say so beside the table
            lines += ["", f"*Note: {summary['dice_note']}.*"]
    return "\n".join(lines)


def comparison_markdown(zero: dict, adapted: dict, prompt: str) -> str:
    before, z, a = zero.get("dice_before", {}), zero.get("dice_after", {}), adapted.get("dice_after", {})
    if not a:
        return f"Registered `{prompt}` with the adapter (no label maps given, so no Dice)."
    lines = [f"**Held-out pair**, prompt `{prompt}`", "",
             "| structure | no registration | zero-shot | with adapter |", "|---|---|---|---|"]
    lines += [f"| {n} | {before.get(n, float('nan')):.3f} | {z.get(n, float('nan')):.3f} | {a[n]:.3f} |" for n in a]
    return "\n".join(lines)
