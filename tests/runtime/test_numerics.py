"""train.tf32 sets TF32 for matmuls and cuDNN convolutions together (PyTorch's defaults differ:
matmuls off, convolutions on, so an "fp32" run would compute the AViT's stem and decoder in
TF32)."""

import torch

from dsfm.runtime.engine import set_tf32


def test_set_tf32_sets_matmuls_and_convolutions_together():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        line = set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        assert "TF32 off" in line
        assert "TF32 tensor cores" in set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
