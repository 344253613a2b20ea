"""What every CUDA test module shares: the marks that skip it cleanly where there is no GPU.

These tests run on a GPU host (`make gpu-check`, or `pytest -m cuda tests/gpu`) and are
collected but skipped everywhere else. They import nothing of Django and need no conftest, so
the GPU check runs them with `--noconftest` on a bare Python that has torch and pytest.
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
