"""Kernel tests run the Triton path: on a CPU machine through Triton's interpreter, which must be
switched on before the kernels are imported (Triton reads it when a kernel is decorated)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
