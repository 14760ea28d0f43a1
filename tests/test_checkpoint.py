"""Our checkpoint format (checkpoint.py); LoRA checkpoints are tested in test_lora.py."""
import json
import os

import pytest
import torch

from checkpoint import (load_checkpoint, load_model_file, model_file_holds, model_file_settings, model_from_checkpoint,
                        save_checkpoint)
from export import export
from checkpoint import load_for_inference
from hf import from_pretrained
from model import GPT, config_for
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


# ----------------------------------------------------------------------------- other model files as --model


class BookLayerNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.eps = 1e-5
        self.scale, self.shift = torch.nn.Parameter(torch.ones(dim)), torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookAttention(torch.nn.Module):
    def __init__(self, d, ctx, heads):
        super().__init__()
        self.heads = heads
        self.W_query, self.W_key, self.W_value = (torch.nn.Linear(d, d, bias=True) for _ in range(3))
        self.out_proj = torch.nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx), diagonal=1))  # in the state dict, as the book's

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = torch.softmax(scores / (d // self.heads) ** 0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class BookGELU(torch.nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * x ** 3)))


class BookBlock(torch.nn.Module):
    def __init__(self, d, ctx, heads):
        super().__init__()
        self.att = BookAttention(d, ctx, heads)
        self.ff = torch.nn.Module()
        self.ff.layers = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), BookGELU(), torch.nn.Linear(4 * d, d))
        self.norm1, self.norm2 = BookLayerNorm(d), BookLayerNorm(d)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff.layers(self.norm2(x))


class BookGPT(torch.nn.Module):
    """The book's GPTModel (ch04), written plainly: its names and layouts, the head apart from tok_emb."""

    def __init__(self, vocab=50257, ctx=64, d=64, layers=2, heads=4):
        super().__init__()
        self.tok_emb, self.pos_emb = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d)
        self.trf_blocks = torch.nn.Sequential(*[BookBlock(d, ctx, heads) for _ in range(layers)])
        self.final_norm, self.out_head = BookLayerNorm(d), torch.nn.Linear(d, vocab, bias=False)
        for p in self.parameters():  # not at their initial values: a mix-up of any two would show
            torch.nn.init.normal_(p, std=0.2 if p.dim() == 1 else 0.02)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def test_the_books_state_dict_loads_exactly(tmp_path):
    torch.manual_seed(0)
    book = BookGPT().eval()
    with torch.no_grad():
        book.out_head.weight.copy_(book.tok_emb.weight)  # tied, as GPT-2 and as loaded from it
    path = str(tmp_path / "gpt2-tiny-sft.pth")
    torch.save(book.state_dict(), path)  # as the chapter saves gpt2-medium355M-sft.pth
    model, style, _ = load_model_file(path)
    idx = torch.randint(0, 50257, (2, 40))
    assert style is None and model.config.context_length == 64 and model.config.n_heads == 4
    assert torch.allclose(model.eval()(idx), book(idx), atol=1e-5)
    assert model_file_settings(path) == {"prompt_style": None, "context_length": 64}
    assert load_model_file(path, context_length=32)[0].wpe.weight.shape == (32, 64)
    assert model.config.tied_head and "wte.head" not in model.state_dict()

    # fine-tuned as the book does, the head moves apart from the embedding: it stays its own
    with torch.no_grad():
        book.out_head.weight.add_(0.01 * torch.randn_like(book.out_head.weight))
    torch.save(book.state_dict(), path)
    model, _, _ = load_model_file(path)
    assert not model.config.tied_head and torch.allclose(model.eval()(idx), book(idx), atol=1e-5)
    export(path, str(tmp_path / "hf"))  # and so does a Hugging Face export of it (lm_head, not tied)
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False
    assert torch.allclose(from_pretrained(str(tmp_path / "hf")).eval()(idx), book(idx), atol=1e-5)


@pytest.mark.parametrize("bias, compiled", [(True, False), (False, True)])
def test_nanogpts_checkpoint_loads_exactly(tmp_path, bias, compiled):
    model = GPT(config_for("tiny", context_length=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and not bias:
                p.zero_()
    prefix = "_orig_mod.transformer." if compiled else "transformer."
    state = {prefix + k: (v.t() if k == "wte.weight" else v)
             for k, v in model.state_dict().items() if bias or not k.endswith(".bias")}
    state[("_orig_mod." if compiled else "") + "lm_head.weight"] = model.wte.weight.t()
    for i in range(2):  # the causal mask nanoGPT keeps without flash attention
        state[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": state, "model_args": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=bias,
                                                   vocab_size=50257, dropout=0.0),
                "iter_num": 10, "best_val_loss": 3.0, "config": {"dataset": "shakespeare"}}, path)
    loaded, style, _ = load_model_file(path)
    idx = torch.randint(0, 50257, (2, 30))
    assert style is None and torch.equal(loaded.eval()(idx), model(idx))
    assert load_for_inference(None, path)[2] == "alpaca"  # generate.py --model FILE


def test_model_files_of_other_kinds_are_refused(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="is neither a train.py checkpoint, the book's GPTModel state dict"):
        load_model_file(path)


def test_a_model_file_says_what_it_holds(tmp_path):
    book, nanogpt, ours = (str(tmp_path / name) for name in ("book.pth", "nanogpt.pt", "best.pt"))
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "pos_emb.weight": torch.zeros(2, 2)}, book)
    torch.save({"model": {}, "model_args": {}, "config": {}}, nanogpt)
    assert model_file_holds(book) == "the book's GPTModel weights" and model_file_holds(nanogpt) == "nanoGPT's weights"
    save_checkpoint({"model": {}, "config": {}, "step": 9,
                     "args": {"model": "out/sft/best.pt", "init": "pretrained", "dpo": True}}, ours)
    assert model_file_holds(ours) == "a train.py DPO checkpoint: step 9, trained from out/sft/best.pt"
    save_checkpoint({"model": {}, "config": {}, "lora": {}, "step": 3, "args": {"model": "gpt2", "init": "pretrained"}},
                    ours)
    assert model_file_holds(ours) == "a train.py LoRA checkpoint: step 3, trained from gpt2's pretrained weights"
    save_checkpoint({"model": {}, "config": {}}, ours)  # written by hand, not by train.py's save
    assert model_file_holds(ours) == "a train.py checkpoint"
