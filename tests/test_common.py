"""The shared plumbing (common.py); downloads are tested with the hub cache in test_model.py."""
import os

import pytest
import torch

from checkpoint import save_checkpoint
from common import atomic_write


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"step": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as tmp:
            open(tmp, "wb").write(b"half a checkpo")
            raise KeyboardInterrupt
    assert torch.load(path) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]
