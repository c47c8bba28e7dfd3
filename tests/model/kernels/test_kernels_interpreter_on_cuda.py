"""On a CUDA host, the Triton-interpreter kernel tests run too — in a child process with CUDA hidden.

TRITON_INTERPRET=1 must be set before kernels are defined and then holds for the whole process, so the
interpreter modules cannot share a process with CUDA tests that need compiled kernels. Here they run in a child
pytest with ``CUDA_VISIBLE_DEVICES=""`` (they skip themselves only while CUDA is visible); only the compiled
variants (test_kernels_cuda.py) are gated on a GPU. Without CUDA this test steps aside: the same modules already
run in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
MODULES = ("test_kernels_rope.py", "test_kernels_wavelet_loss.py")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="without CUDA the interpreter modules run in-process")
def test_interpreter_kernel_modules_pass_in_a_cuda_less_child():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(HERE / m) for m in MODULES)],
        cwd=HERE.parents[2], env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # they ran (not stepped aside as on a CUDA-visible process): -ra lists every skip reason
    assert " passed" in proc.stdout and "CUDA visible" not in proc.stdout, proc.stdout[-2000:]
