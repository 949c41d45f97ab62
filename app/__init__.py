"""UniReg's Gradio app: prompted registration and few-shot adaptation in the browser.

``python -m app`` (or ``unireg app``) serves it on 127.0.0.1; :func:`app.ui.build_app` builds
the ``gr.Blocks`` for embedding or tests. The handlers in :mod:`app.backend` are also the app's
API: ``gradio_client`` can call ``/register`` and ``/adapt``.
"""
