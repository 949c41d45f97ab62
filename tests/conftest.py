"""Test-session defaults: the suite runs on CPU and offline, whatever the machine has."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed's CPU accelerator + gloo, also for subprocesses
os.environ.setdefault("HF_HUB_OFFLINE", "1")     # the text model comes from the PyPI package, never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
