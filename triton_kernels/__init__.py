"""pyfastdl's Triton kernels, one family a module (installed as ``pyfastdl.triton_kernels``).

Each module registers its ops in the ``pyfastdl_triton::`` namespace when it is imported, with the
same schemas as the C++ ops in ``csrc/ops.cpp`` (e.g. ``pyfastdl_triton::batch_norm_fwd``).
Nothing is imported here: ``import pyfastdl.triton_kernels`` stays cheap and needs neither Triton
nor a GPU; the backend resolver imports a family module (``.batch_norm``) when it is chosen.

The kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before ``triton`` is first imported), which is how they are tested on
a machine without a GPU.
"""
