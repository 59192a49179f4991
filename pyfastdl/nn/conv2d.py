"""Drop-in 2-D convolution module: a subclass of torch.nn.Conv2d, so constructor arguments,
parameters (weight, bias), ``load_state_dict`` both ways, ``isinstance`` checks and reprs are torch's;
only the forward runs pyfastdl's kernels."""
import torch
import torch.nn.functional as F

from .. import functional as PF

__all__ = ["Conv2d"]


class Conv2d(torch.nn.Conv2d):
    """Drop-in for torch.nn.Conv2d: input (N, C_in, H, W) or (C_in, H, W), NCHW or channels_last.
    padding_mode 'zeros' runs in the kernel (asymmetric 'same' padding included); 'reflect',
    'replicate' and 'circular' pad with torch's F.pad first, as torch's own Conv2d does, then run the
    kernel with no padding."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return PF.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return PF.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias)
