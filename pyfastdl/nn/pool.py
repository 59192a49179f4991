"""Drop-in 2-D pooling modules: subclasses of torch.nn.MaxPool2d / AvgPool2d, so constructor
arguments, attributes, ``extra_repr`` and ``isinstance`` checks are torch's; only the forward runs
pyfastdl's kernels (pyfastdl.functional.max_pool2d / avg_pool2d)."""
import torch

from .. import functional as PF

__all__ = ["MaxPool2d", "AvgPool2d"]


class MaxPool2d(torch.nn.MaxPool2d):
    """Drop-in for torch.nn.MaxPool2d: input (N, C, H, W) or (C, H, W), NCHW or channels_last."""

    def forward(self, input: torch.Tensor):
        return PF.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    """Drop-in for torch.nn.AvgPool2d: input (N, C, H, W) or (C, H, W), NCHW or channels_last."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override)
