"""Fast data-path kernels: MLM masking and batch padding, each with a plain reference to test against.

Imports torch only, so the kernels run in data-loader workers and on any device.
"""

from kernels.collate import MLMCollator, collate_padded, pad_sequences
from kernels.masking import mask_tokens, mask_tokens_reference

__all__ = ["MLMCollator", "collate_padded", "mask_tokens", "mask_tokens_reference", "pad_sequences"]
