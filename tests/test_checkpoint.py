"""Our checkpoint format (checkpoint.py); LoRA checkpoints are tested in test_lora.py."""
import os

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from test_model import tiny


def test_checkpoint_round_trip_and_damage(tmp_path):
    model = tiny(seed=3)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "phi3"}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    ckpt = load_checkpoint(path)
    restored = model_from_checkpoint(ckpt)
    idx = torch.randint(0, 512, (1, 6))
    assert torch.equal(restored.eval()(idx), model(idx)) and ckpt["prompt_style"] == "phi3"
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pt does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt or not a train.py checkpoint"):
        load_checkpoint(path)
    torch.save({"model": model.state_dict(), "config": {**vars(model.config), "emb_dim": 32}}, path)
    with pytest.raises(ValueError, match="ckpt.pt is corrupt: its weights do not fit its config"):
        model_from_checkpoint(load_checkpoint(path), path)
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="no model weights or config"):
        load_checkpoint(path)
