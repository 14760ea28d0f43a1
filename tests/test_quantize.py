"""Weights prepared for decoding (quantize.py): float weights laid out [in, out], int8 weights,
the int8 output head with its exact best logits, the swapped-in model, and --quantize int8."""
import copy

import pytest
import torch
import torch.nn as nn

import quantize
from prompts import encode
from export import export
from checkpoint import load_for_inference
from decoding import generate, respond
from model import EXACT_TOP
from quantize import Int8Linear, prepare_for_decoding, quantize_int8
from test_decoding import PROMPTS
from test_generate import run_script, save_tiny_checkpoint, tiny_gpt2_vocab


def float_linear_bytes(model):
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def test_int8_linear_is_close_to_float_and_rows_are_independent():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    int8 = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(6, 256)
    x[2] *= 100  # an outlier row: with one activation range for the batch it would blur the others
    x[4] = 0.0
    with torch.no_grad():
        error = (int8(x) - linear(x)).norm(dim=1) / linear(x).norm(dim=1)
    assert error.max() < 0.03  # 8-bit weights and 7-bit activations: about 1% here
    assert torch.equal(int8(x), torch.cat([int8(row[None]) for row in x]))  # bit for bit
    assert torch.equal(int8(x.view(2, 3, 256)), int8(x).view(2, 3, 96))
    assert torch.equal(int8(x[4:5]), linear.bias.detach()[None])


def test_quantized_model_logits_memory_and_greedy_generation():
    model = tiny_gpt2_vocab(seed=1)
    float_bytes = float_linear_bytes(model)
    idx = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(idx)
    for head in (False, True):
        quantized = quantize_int8(copy.deepcopy(model), head=head)
        with torch.no_grad():
            logits = quantized(idx)
        # the tolerance: 2% of the largest logit (the tiny random model's logits span about +-1)
        assert (logits - reference).abs().max() < 0.02 * reference.abs().max()
        assert not (logits == reference).all()
    quantized = quantize_int8(copy.deepcopy(model), head=False)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert not any(".c_attn." in name or ".c_fc." in name for name in quantized.state_dict())  # no float copies
    int8_bytes = sum(m.nbytes() for m in quantized.modules() if isinstance(m, Int8Linear))
    assert int8_bytes <= 0.3 * float_bytes
    # greedy generation end to end; rows come out as alone because Int8Linear treats rows independently
    prompts = [encode(t) for t in PROMPTS]
    batched = generate(quantized, prompts, 12, stop_ids=())
    assert batched == [generate(quantized, [p], 12, stop_ids=())[0] for p in prompts]
    assert sum(a == b for a, b in zip(batched, generate(model, prompts, 12, stop_ids=()))) >= 2
    # and beam search
    assert generate(quantized, prompts, 6, stop_ids=(), num_beams=2) == \
        [generate(quantized, [p], 6, stop_ids=(), num_beams=2)[0] for p in prompts]


def test_dequantize_kernel_for_other_devices(monkeypatch):
    """The kernel CUDA and MPS get, tried on the CPU: the same int8 weights, float activations."""
    model = tiny_gpt2_vocab(seed=1)
    fbgemm = quantize_int8(copy.deepcopy(model))
    monkeypatch.setattr(quantize, "linear_kernel", lambda device, weights: "dequantize")
    dequantized = quantize_int8(copy.deepcopy(model))
    layer = dequantized.h[0].mlp.c_fc
    assert layer.kernel == "dequantize" and layer.qweight.dtype == torch.int8
    assert layer.nbytes() <= 0.3 * model.h[0].mlp.c_fc.weight.numel() * 4
    idx = torch.tensor([encode(PROMPTS[1])])
    with torch.no_grad():
        assert (dequantized(idx) - fbgemm(idx)).abs().max() < 0.02
        weight = layer.qweight.float() * layer.scale[:, None]  # what it computes, by hand
        x = torch.randn(3, 64)
        assert torch.allclose(layer(x), x @ weight.t() + layer.bias, atol=1e-5)


def test_the_int8_heads_best_logits_are_the_float_heads_so_greedy_decoding_is_too():
    model = tiny_gpt2_vocab(seed=1)
    idx = torch.randint(0, 50257, (3, 16), generator=torch.Generator().manual_seed(0))
    int8_blocks = quantize_int8(copy.deepcopy(model), head=False)
    int8_head = quantize_int8(copy.deepcopy(model))
    with torch.no_grad():
        exact, logits = int8_blocks(idx), int8_head(idx)
        approximate = int8_head.wte.int8_head(int8_head._hidden(idx))
    best = approximate.topk(EXACT_TOP, dim=-1).indices
    torch.testing.assert_close(logits.gather(-1, best), exact.gather(-1, best), atol=1e-5, rtol=1e-5)
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, best, False)
    assert torch.equal(logits[others], approximate[others])  # the rest stay the int8 head's
    assert not torch.equal(approximate.argmax(-1), exact.argmax(-1))  # int8 alone would pick other tokens
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    prompts = [encode(t) for t in PROMPTS]
    greedy = generate(int8_head, prompts, 12, stop_ids=())
    assert greedy == generate(int8_blocks, prompts, 12, stop_ids=())
    assert greedy == [generate(int8_head, [p], 12, stop_ids=())[0] for p in prompts]  # batch-invariant


def test_prepared_float_weights_are_laid_out_in_out_and_generate_the_same():
    model = tiny_gpt2_vocab(seed=1)
    prepared = prepare_for_decoding(copy.deepcopy(model))
    for (name, weight), trained in zip(prepared.named_parameters(), model.parameters()):
        assert torch.equal(weight, trained)
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):  # the block linears
            assert weight.t().is_contiguous() and weight.untyped_storage().nbytes() == 4 * weight.numel()
        else:
            assert weight.is_contiguous()
    prompts = [encode(t) for t in PROMPTS]
    assert generate(prepared, prompts, 12) == generate(model, prompts, 12)
    assert generate(prepared, prompts, 6, num_beams=2) == generate(model, prompts, 6, num_beams=2)
    idx = torch.tensor([encode(PROMPTS[1])])
    with torch.no_grad():
        torch.testing.assert_close(prepared(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_training_a_quantized_model_is_refused():
    model = quantize_int8(tiny_gpt2_vocab())
    model.train()
    with pytest.raises(RuntimeError, match="int8-quantized weights are for inference only"):
        model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))


def test_quantize_flag_for_a_checkpoint_and_a_hugging_face_folder(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt)
    entries = [{"instruction": "Name a color.", "input": ""}, {"instruction": "Say hi.", "input": ""}]
    expected = respond(quantize_int8(copy.deepcopy(model)), entries, "alpaca", 10)
    result = run_script("--ckpt", ckpt, "--prompt", "Name a color.", "--prompt", "Say hi.",
                        "--max-new-tokens", "10", "--device", "cpu", "--quantize", "int8")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"==> 1/2: Name a color. <==\n{expected[0]}\n\n==> 2/2: Say hi. <==\n{expected[1]}\n"
    folder = export(ckpt, str(tmp_path / "hf"))
    loaded = load_for_inference(None, folder, device="cpu", quantize="int8")[0]
    assert isinstance(loaded.h[0].attn.c_attn, Int8Linear)
    assert respond(loaded, entries, "alpaca", 10) == expected
