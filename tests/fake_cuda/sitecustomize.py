"""Test shim: a host with ``AIGC_TEST_FAKE_GPUS`` CUDA devices, for launcher tests on CPU hosts.

Put this folder on ``PYTHONPATH``. When torch is imported, ``torch.cuda.device_count()`` and
``torch.cuda.is_available()`` answer as a host with that many GPUs would, honouring
``CUDA_VISIBLE_DEVICES``. Nothing else changes: a process that really runs on one would fail.
"""

import importlib.abc
import importlib.util
import os
import sys

FAKE_GPUS = int(os.environ.get("AIGC_TEST_FAKE_GPUS") or 0)


def _visible() -> int:
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is None:
        return FAKE_GPUS
    indices = [part.strip() for part in pinned.split(",") if part.strip()]
    return sum(1 for i in indices if i.isdigit() and int(i) < FAKE_GPUS)


class _PatchTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.cuda.device_count = _visible
            module.cuda.is_available = lambda: _visible() > 0

        spec.loader.exec_module = exec_module
        return spec


if FAKE_GPUS:
    sys.meta_path.insert(0, _PatchTorch())
