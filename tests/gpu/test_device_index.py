"""A model on cuda:N runs there only: no context, stream or event on GPU 0."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

# Run in a fresh process: the test process may already hold contexts.
SCRIPT = """
import threading, numpy as np, torch
from pipeline.backends import TorchBackend, resolve_device
from pipeline.models import load_model

device = resolve_device("cuda:%d")
backend = TorchBackend(load_model(), device, 8, (3, 224, 224))

def work():  # a thread of its own starts on GPU 0, like the engine's
    backend.setup()
    for size in (1, 8, 3):
        backend.predict([np.zeros((3, 224, 224), np.uint8)] * size)
    torch.cuda.synchronize(device)

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(device, torch._C._cuda_hasPrimaryContext(0), torch.cuda.memory_reserved(0))
"""


@pytest.mark.gpu
def test_a_model_on_the_last_gpu_opens_nothing_on_gpu_0() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    last = torch.cuda.device_count() - 1
    result = subprocess.run([sys.executable, "-c", SCRIPT % last], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"cuda:{last}", "False", "0"]
