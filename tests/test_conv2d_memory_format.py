"""conv2d's output memory format is torch's: channels_last when the input's or the weight's strides
suggest channels_last (a model converted with ``.to(memory_format=torch.channels_last)`` gets
channels_last weights while its first input is NCHW), for every backend, float64 included; values
and every gradient as torch's in each combination."""
import pytest
import torch
import torch.nn.functional as F

from pyfastdl import backends
from pyfastdl import functional as PF
from helpers import DEVICE, MARKS, rel_err

BACKENDS = [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton")]
CL = torch.channels_last
# (N, C_in, H, W, C_out, k, stride, groups): one input channel (ambiguous strides), 1 x 1 spatial, a
# plain 3 x 3, the LeNet-like direct-NCHW path, a 1 x 1 stride-2 downsample, depthwise
SHAPES = [(2, 1, 8, 8, 4, 3, 1, 1), (3, 6, 1, 1, 5, 1, 1, 1), (2, 5, 9, 7, 6, 3, 1, 1),
          (2, 3, 12, 20, 4, 5, 1, 1), (2, 8, 9, 9, 12, 1, 2, 1), (2, 4, 7, 7, 4, 3, 1, 4)]


def _formats(t):
    return t.is_contiguous(), t.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_cl,w_cl", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_format_and_values_as_torch(backend, x_cl, w_cl, shape):
    N, C, H, W, O, k, s, g = shape
    device = DEVICE[backend]
    dtypes = [torch.float32] if backend == "triton" else [torch.float32, torch.float64]
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(N, C, H, W, generator=gen, dtype=dtype).to(device)
        w = torch.randn(O, C // g, k, k, generator=gen, dtype=dtype).to(device)
        x = x.contiguous(memory_format=CL) if x_cl else x
        w = w.contiguous(memory_format=CL) if w_cl else w
        ours = [t.detach().clone().requires_grad_() for t in (x, w)]
        theirs = [t.detach().clone().requires_grad_() for t in (x, w)]
        with backends.use(backend):
            y = PF.conv2d(*ours, stride=s, padding=k // 2, groups=g)
        assert backends.last_dispatch().backend == backend
        yt = F.conv2d(*theirs, stride=s, padding=k // 2, groups=g)
        assert _formats(y) == _formats(yt), (dtype, y.stride(), yt.stride())
        gy = torch.randn(yt.shape, generator=gen, dtype=dtype).to(device)
        y.backward(gy)
        yt.backward(gy)
        bound = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in ((y, yt), (ours[0].grad, theirs[0].grad), (ours[1].grad, theirs[1].grad)):
            assert rel_err(a, b) <= bound
