"""Test-session defaults: the suite runs on CPU and offline, whatever the machine has."""
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed's CPU accelerator + gloo, also for subprocesses
os.environ.setdefault("HF_HUB_OFFLINE", "1")     # the text model comes from the PyPI package, never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The CI machine has two shared cores: one intra-op thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
