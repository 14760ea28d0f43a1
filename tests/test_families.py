"""The Llama family (Llama 3.2, SmolLM2, Qwen2.5, Qwen3) against Hugging Face transformers: tiny
random models of each family built here from the family's config, saved with save_pretrained
(float32 and bfloat16, one file and shards) and loaded by hf.py; logits, greedy decoding, the KV
cache, batches, beam search, streaming, int8, LoRA and training on them; what is refused; and a
GPT-2 checkpoint saved before the families existed. No download: the hub is stood in for."""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import hf
from checkpoint import load_checkpoint, model_from_checkpoint
from decoding import generate, stream
from hf import config_json, from_pretrained, hf_folder, hf_state_dict, read_config
from lora import LoRALinear, add_lora, lora_modules, lora_settings, merge_lora
from model import GPT, KVCache, config_for
from quantize import Int8Linear, block_linears, fuse_projections, prepare_for_decoding, quantize_int8
from test_decoding import beam_search_without_cache
from test_lora import train_adapters

try:
    import transformers  # the reference; optional: the tests that need it skip without it
except ImportError:
    transformers = None

VOCAB = 256
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
# each family's switches: Qwen3's head size (32) apart from width / heads (16) and its QK-norm, Llama 3's
# RoPE scaling (original context 32, so that all three frequency bands occur) and an untied head, Qwen2.5's
# q/k/v biases, SmolLM2 as LlamaForCausalLM with as many key/value heads as heads
FAMILIES = {
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **SHAPE, head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SHAPE, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, rope_scaling=dict(
            rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True)),
    "smollm2": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**SHAPE, "num_key_value_heads": 4}, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def reference():
    """{family: a transformers model with random weights} (norm weights around 1, all else N(0, 0.2):
    logits that spread, so greedy decoding has something to follow)."""
    if transformers is None:
        pytest.skip("transformers is not installed (pip install transformers)")
    transformers.logging.set_verbosity_error()
    models = {}
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        model = make().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
        models[family] = model
    return models


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    """{(family, layout): folder}: each reference saved in float32 as one file and in bfloat16 as shards."""
    saved = {}
    for family, model in reference.items():
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder / "float32")
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder / "bf16-shards", max_shard_size="40KB")
        saved[family, "float32"], saved[family, "bf16-shards"] = str(folder / "float32"), str(folder / "bf16-shards")
    return saved


def ours(folders, family, layout="float32", **kwargs):
    return from_pretrained(folders[family, layout], **kwargs).eval()


def token_ids(shape, seed):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def prompts(seed=0, lengths=(7, 3, 11)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def greedy_without_cache(model, prompt, steps):
    """Greedy decoding by a full forward pass over the whole sequence at every step (any model
    returning logits or an object with .logits)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([tokens]))
            tokens.append(int(getattr(out, "logits", out)[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_decoding_equal_transformers(family, reference, folders):
    model = ours(folders, family)
    cfg = model.config
    assert cfg.family == ("llama" if family == "smollm2" else family) and model.wte.weight.dtype == torch.float32
    assert (cfg.qk_norm, cfg.qkv_bias) == (family == "qwen3", family == "qwen2")
    assert cfg.head_dim == (32 if family == "qwen3" else 16) and cfg.tied_head == (family != "llama")
    idx = token_ids((3, 40), seed=1)
    with torch.no_grad():
        expected = reference[family](idx).logits
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=0)
    for prompt in prompts():
        greedy = greedy_without_cache(reference[family], prompt, 16)
        assert generate(model, [prompt], 16, stop_ids=()) == [greedy]  # through the KV cache
        assert len(set(greedy)) > 3  # a continuation that goes somewhere, not one token repeated


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_shards_load_as_they_are_or_cast(family, reference, folders):
    assert len([f for f in os.listdir(folders[family, "bf16-shards"]) if f.endswith(".safetensors")]) > 2
    model = ours(folders, family, "bf16-shards")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    theirs = copy.deepcopy(reference[family]).to(torch.bfloat16)
    expected = theirs.state_dict()
    for name, tensor in hf_state_dict(model).items():  # the very bits of the files
        assert torch.equal(tensor, expected[name]), name
    widened = ours(folders, family, "bf16-shards", dtype=torch.float32)
    assert all(torch.equal(a.float(), b) for a, b in zip(model.parameters(), widened.parameters()))
    idx = token_ids((2, 24), seed=2)
    with torch.no_grad():
        logits, their_logits = model(idx), theirs(idx).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - their_logits.float()).abs().max() < 0.05 * their_logits.float().abs().max()
    # a float32 folder cast to bfloat16 on loading holds the same weights as the bfloat16 files
    narrowed = ours(folders, family, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), narrowed.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_a_full_forward(family, folders):
    model = ours(folders, family)
    idx = token_ids((2, 20), seed=3)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 20, "cpu")
        assert cache.kv.shape == (2, 2, 2, model.config.n_kv_heads, 20, model.config.head_dim)  # kv heads only
        steps = [model.forward_cached(idx[:, :7], cache)]  # a prefill, then one token at a time
        steps += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_ragged_prompts_decodes_as_each_alone(family, folders):
    model = ours(folders, family)
    rows = prompts(seed=4)
    batched = generate(model, rows, 12, stop_ids=())
    assert batched == [generate(model, [row], 12, stop_ids=())[0] for row in rows]
    # the logits too: a left-padded row's positions count from its first real token
    pad_lens = [11 - len(row) for row in rows]
    with torch.no_grad():
        cache = KVCache(model.config, 3, 11, "cpu", pad_lens=pad_lens)
        last = model.forward_cached(torch.tensor([[0] * pad + row for pad, row in zip(pad_lens, rows)]), cache)
        for b, row in enumerate(rows):
            torch.testing.assert_close(last[b], model(torch.tensor([row]))[0, -1], atol=1e-5, rtol=1e-5)
    # and the continuous batching of serve.py: rows of two caches merged into one
    with torch.no_grad():
        first, second = KVCache(model.config, 1, 20, "cpu"), KVCache(model.config, 1, 20, "cpu")
        model.forward_cached(torch.tensor([rows[0]]), first)
        model.forward_cached(torch.tensor([rows[2]]), second)
        merged = KVCache.merge([(first, 0), (second, 0)], room=[4, 4])
        nxt = torch.tensor([[5], [6]])
        joined = model.forward_cached(nxt, merged)
        for b, row in enumerate((rows[0], rows[2])):
            torch.testing.assert_close(joined[b], model(torch.tensor([row + [5 + b]]))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_and_streaming(family, folders):
    model = ours(folders, family)
    rows = prompts(seed=5)
    beams = generate(model, rows, 6, stop_ids=(), num_beams=3)
    assert beams == [beam_search_without_cache(model, row, 6, 3) for row in rows]
    assert beams == [generate(model, [row], 6, stop_ids=(), num_beams=3)[0] for row in rows]
    streamed = [[] for _ in rows]
    for new in stream(model, rows, 10, stop_ids=()):
        for row, token in new.items():
            streamed[row].append(token)
    assert streamed == generate(model, rows, 10, stop_ids=())
    eos = streamed[1][4]  # a row stops at its end token, the others go on
    stopped = generate(model, rows, 10, stop_ids=(eos,))
    assert stopped[1] == streamed[1][:streamed[1].index(eos)]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_embedding_trains_vocab_major_and_decodes_emb_major(family, folders):
    """The [emb_dim, vocab] matrix lies [vocab, emb_dim] in memory for training (its gradients come so,
    as in transformers); prepare_for_decoding lays it out [emb_dim, vocab], the same values, the same tokens."""
    model = ours(folders, family)
    matrices = [m for m in (model.wte.weight, model.wte.head) if m is not None]
    assert all(m.shape == (64, VOCAB) and m.t().is_contiguous() for m in matrices)
    idx = token_ids((2, 12), seed=11)
    model(idx, torch.roll(idx, -1, 1)).backward()
    assert all(m.grad.stride() == m.stride() for m in matrices)
    rows = prompts(seed=11)
    expected = generate(model, rows, 10, stop_ids=())
    prepared = prepare_for_decoding(copy.deepcopy(model))
    for before, after in zip(matrices, [m for m in (prepared.wte.weight, prepared.wte.head) if m is not None]):
        assert after.is_contiguous() and torch.equal(after, before)
    assert generate(prepared, rows, 10, stop_ids=()) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_fuses_q_k_v_and_gate_up_into_one_matmul_each_with_the_same_results(family, folders):
    model = ours(folders, family)
    attn, mlp = model.h[0].attn, model.h[0].mlp
    parts = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight]
    idx = token_ids((3, 12), seed=12)
    with torch.no_grad():
        reference = model(idx)
        fused = fuse_projections(copy.deepcopy(model))
        block = fused.h[0]
        assert block.attn.q_proj is block.attn.k_proj is block.attn.v_proj is None  # freed
        assert block.mlp.gate_proj is block.mlp.up_proj is None
        assert torch.equal(block.attn.qkv_proj.weight, torch.cat(parts[:3]))
        assert torch.equal(block.mlp.gate_up_proj.weight, torch.cat(parts[3:]))
        if attn.q_proj.bias is not None:  # Qwen2.5's q/k/v biases
            assert torch.equal(block.attn.qkv_proj.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias,
                                                                    attn.v_proj.bias]))
        assert torch.equal(fused(idx), reference)
        # int8: the same per-channel weights and the same per-row activations, so the same logits
        unfused = copy.deepcopy(model)
        for parent, name, linear in block_linears(unfused):
            setattr(parent, name, Int8Linear(linear.weight, linear.bias))
        assert torch.equal(quantize_int8(copy.deepcopy(model), head=False)(idx), unfused(idx))


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_weights_decode_close_to_float(family, folders):
    model = ours(folders, family)
    linears = block_linears(model)
    assert {name for _, name, _ in linears} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    idx = token_ids((3, 16), seed=6)
    # each int8 layer against its float one, on the very activations the model feeds it: about 1.5% off, and
    # 2.5% for down_proj, whose inputs (silu(gate) * up) are heavy-tailed (max / rms about 5 here), which
    # costs precision in the 7-bit range Int8Linear gives each row of activations
    inputs = []
    hooks = [linear.register_forward_hook(lambda module, args, out: inputs.append((module, args[0])))
             for _, _, linear in linears]
    with torch.no_grad():
        reference = model(idx)
        for hook in hooks:
            hook.remove()
        for linear, x in inputs:
            exact = linear(x)
            error = (Int8Linear(linear.weight, linear.bias)(x) - exact).norm(dim=-1) / exact.norm(dim=-1)
            assert error.mean() < 0.03 and error.max() < 0.08
    quantized = quantize_int8(copy.deepcopy(model))
    assert not any(isinstance(m, nn.Linear) for m in quantized.h.modules())
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 4 * 2 + 1  # fused; and the head
    with torch.no_grad():
        error = (quantized(idx) - reference).norm(dim=-1) / reference.norm(dim=-1)
    # these random models amplify errors (1% noise on every weight moves their logits by about 4%); a wrong
    # layer would move them by some 100%
    assert error.mean() < 0.1
    rows = prompts(seed=6)
    int8 = generate(quantized, rows, 12, stop_ids=())
    assert int8 == [generate(quantized, [row], 12, stop_ids=())[0] for row in rows]  # batch-invariant
    # the int8 head recomputes its best logits exactly: greedy decoding as with the float head
    assert int8 == generate(quantize_int8(copy.deepcopy(model), head=False), rows, 12, stop_ids=())
    assert generate(quantized, rows, 6, stop_ids=(), num_beams=2) == \
        [generate(quantized, [row], 6, stop_ids=(), num_beams=2)[0] for row in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_starts_at_the_base_trains_only_adapters_and_merges(family, folders):
    model = ours(folders, family)
    idx = token_ids((4, 16), seed=7)
    base = model(idx).detach()
    add_lora(model, rank=4, alpha=8)  # the default targets, GPT-2's names: every linear of a block
    assert [name for name, _ in lora_modules(model)][:7] == [f"h.0.{p}" for p in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert lora_settings(model)["targets"] == ["q", "k", "v", "o", "gate", "up", "down"]
    with torch.no_grad():
        assert torch.equal(model(idx), base)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    losses, _ = train_adapters(model, steps=8, lr=1e-2, vocab=VOCAB)
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        torch.testing.assert_close(model(idx), unmerged, atol=1e-4, rtol=1e-5)
    assert list(model.state_dict()) == list(ours(folders, family).state_dict())
    # the Llama family's own names, one projection each
    few = add_lora(ours(folders, family), rank=2, alpha=4, targets="q,v,down")
    assert [name for name, _ in lora_modules(few)][:3] == ["h.0.attn.q_proj", "h.0.attn.v_proj", "h.0.mlp.down_proj"]
    assert isinstance(few.h[1].attn.v_proj, LoRALinear) and isinstance(few.h[1].attn.k_proj, nn.Linear)


def test_a_lora_target_the_family_lacks_is_refused():
    gpt2 = GPT(config_for("tiny", vocab_size=VOCAB, context_length=32))
    with pytest.raises(ValueError, match=r"^the gpt2 family has no LoRA target 'gate'; choose among qkv, attn_out, "
                                         r"mlp_in, mlp_out \(comma-separated\)$"):
        add_lora(gpt2, rank=2, alpha=4, targets="qkv,gate")
    llama = GPT(config_for("smollm2-135m", n_layers=1, vocab_size=VOCAB, context_length=32))
    with pytest.raises(ValueError, match="^unknown LoRA target 'q_proj'; choose among qkv, attn_out, mlp_in, mlp_out, "
                                         "q, k, v, o, gate, up, down"):
        add_lora(llama, rank=2, alpha=4, targets="q_proj")
    assert not lora_modules(gpt2) and not lora_modules(llama)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_lowers_the_loss(family, folders):
    model = ours(folders, family)
    losses, _ = train_adapters(model, steps=10, lr=3e-3, vocab=VOCAB)  # every parameter: none is frozen
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_our_weights_saved_as_the_familys_architecture_load_in_transformers(family, folders, tmp_path):
    """The name maps and config.json the other way (what export.py writes): transformers loads
    them as the architecture they came from, with equal logits."""
    model = ours(folders, family)
    from safetensors.torch import save_file
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config_json(model.config, "float32"), f)
    save_file(hf_state_dict(model), str(tmp_path / "model.safetensors"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(theirs).__name__ == hf.architecture(model.config)
    idx = token_ids((2, 30), seed=10)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx), atol=1e-4, rtol=0)
    assert read_config(str(tmp_path)) == model.config  # and back


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["Qwen3MoeForCausalLM"]), "the architecture Qwen3MoeForCausalLM is not supported; supported "
                                                  "are GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "the architecture MistralForCausalLM"),
    (dict(num_experts=8), r"a mixture of experts \(num_experts\) is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
     "the rope type 'yarn' \\(only default and llama3 are\\) is not supported"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "the rope type 'dynamic'"),
    (dict(use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None),
     r"sliding-window attention \(use_sliding_window, layer_types\) is not supported"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding-window attention"),
    (dict(hidden_act="gelu"), r"the activation gelu \(the Llama family uses silu\) is not supported"),
    (dict(attention_bias=True), "biases on the attention or MLP layers"),
    (dict(partial_rotary_factor=0.5), r"rotary embeddings on part of each head \(partial_rotary_factor 0.5\)"),
    (dict(num_attention_heads=3), "3 attention heads cannot share 2 key/value heads evenly"),
    (dict(hidden_size=None), "is not a valid Qwen2ForCausalLM config"),
])
def test_what_the_model_cannot_run_is_refused_in_one_sentence(change, message, folders, tmp_path):
    source = folders["qwen2", "float32"]
    config = json.load(open(os.path.join(source, "config.json")))
    assert config["use_sliding_window"] is False  # as Qwen2.5's own, which loads (sliding_window set but off)
    os.symlink(os.path.join(source, "model.safetensors"), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 32768}))
    assert read_config(str(tmp_path)).family == "qwen2"
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message) as refused:
        from_pretrained(str(tmp_path))
    assert "\n" not in str(refused.value) and str(refused.value).startswith(str(tmp_path / "config.json"))


def test_bad_weight_files_are_refused(folders, tmp_path):
    source = folders["qwen3", "float32"]
    (tmp_path / "config.json").write_bytes(open(os.path.join(source, "config.json"), "rb").read())
    data = open(os.path.join(source, "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read \('[a-z_.0-9]+' does not fit the file "
                                         r"\(truncated\?\)\); delete it to download it again"):
        from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing; a Hugging Face model folder needs "
                                                "config.json and model.safetensors"):
        from_pretrained(str(tmp_path))
    sharded = folders["qwen3", "bf16-shards"]
    shards = sorted(name for name in os.listdir(sharded) if name.startswith("model-"))
    os.symlink(os.path.join(sharded, "model.safetensors.index.json"), tmp_path / "model.safetensors.index.json")
    for name in shards[:1] + shards[2:]:
        os.symlink(os.path.join(sharded, name), tmp_path / name)
    with pytest.raises(FileNotFoundError, match=f"{shards[1]} is missing \\(listed in model.safetensors.index.json\\)"):
        from_pretrained(str(tmp_path))
    os.symlink(os.path.join(sharded, shards[1]), tmp_path / shards[1])
    config = json.load(open(os.path.join(source, "config.json")))
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"'model.layers.[01].mlp.(gate|up|down)_proj.weight' has shape "
                                         r"\((64, 96|96, 64)\), expected \((64, 128|128, 64)\) from its config.json"):
        from_pretrained(str(tmp_path))


class FakeHub:
    """download() against local folders standing in for hub repositories: records the requests,
    answers 404 for files a repository lacks and 401 without the token of a gated one."""

    def __init__(self, repos, gated=(), token=None):
        self.repos, self.gated, self.token, self.requests = repos, gated, token, []

    def __call__(self, url, dest, headers=None):
        repo, file = url.removeprefix("https://huggingface.co/").split("/resolve/main/")
        self.requests.append((repo, file, (headers or {}).get("Authorization")))
        if repo in self.gated and (headers or {}).get("Authorization") != f"Bearer {self.token}":
            raise PermissionError(f"{url} was refused (HTTP 401: Unauthorized)")
        source = os.path.join(self.repos[repo], file)
        if not os.path.exists(source):
            raise FileNotFoundError(f"{url} does not exist (HTTP 404)")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(source, "rb") as f, open(dest, "wb") as out:
            out.write(f.read())


def test_a_preset_downloads_once_with_its_tokenizer_files(folders, tmp_path, monkeypatch):
    repo = tmp_path / "repo"  # a sharded model (the index first, then its shards) with two of the tokenizer files
    repo.mkdir()
    for name in os.listdir(folders["qwen3", "bf16-shards"]):
        os.symlink(os.path.join(folders["qwen3", "bf16-shards"], name), repo / name)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (repo / file).write_text(json.dumps({"file": file}))
    shards = sorted(name for name in os.listdir(repo) if name.startswith("model-"))
    hub = FakeHub({"Qwen/Qwen3-0.6B": str(repo), "meta-llama/Llama-3.2-1B": folders["llama", "float32"]},
                  gated={"meta-llama/Llama-3.2-1B"}, token="secret")
    monkeypatch.setattr(hf, "download", hub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cache = tmp_path / "cache"
    folder = hf_folder("qwen3-0.6b", cache_dir=str(cache))
    assert folder == str(cache / "qwen3-0.6b")
    assert [file for _, file, _ in hub.requests] == [
        "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
        "special_tokens_map.json", "model.safetensors.index.json", *shards]
    assert sorted(os.listdir(folder)) == sorted(os.listdir(repo))  # all but the two the repository lacks
    model = from_pretrained("qwen3-0.6b", cache_dir=str(cache))
    reference = ours(folders, "qwen3", "bf16-shards")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert len(hub.requests) == 7 + len(shards)  # the second time from the cache alone
    # a gated repository: without the token one sentence says what to do, with it the files come
    with pytest.raises(PermissionError, match=r"^the hub repository meta-llama/Llama-3.2-1B is gated: accept its "
                                              r"license on https://huggingface.co/meta-llama/Llama-3.2-1B and set "
                                              r"HF_TOKEN to a token of that account$"):
        hf_folder("llama-3.2-1b", cache_dir=str(cache))
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(PermissionError, match=r"set HF_TOKEN to a token of that account \(the token given was "
                                              r"refused\)$"):
        hf_folder("llama-3.2-1b", cache_dir=str(cache))
    monkeypatch.setenv("HF_TOKEN", "secret")
    with pytest.raises(FileNotFoundError, match="^the hub repository meta-llama/Llama-3.2-1B has no tokenizer.json$"):
        hf_folder("llama-3.2-1b", cache_dir=str(cache))  # the stand-in has no tokenizer: a required file
    assert hub.requests[-1] == ("meta-llama/Llama-3.2-1B", "tokenizer.json", "Bearer secret")
    assert not os.path.exists(cache / "llama-3.2-1b" / "model.safetensors")  # the weights come last


def test_a_gpt2_checkpoint_saved_before_the_families_still_loads():
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2-before-families")
    reference = json.load(open(os.path.join(folder, "reference.json")))
    ckpt = load_checkpoint(os.path.join(folder, "ckpt.pt"))
    assert set(ckpt["config"]) == {"vocab_size", "context_length", "emb_dim", "n_layers", "n_heads", "drop_rate",
                                   "qkv_bias", "tied_head"}  # the fields a config had then
    model = model_from_checkpoint(ckpt).eval()
    assert model.config.family == "gpt2" and model.config.hidden_dim == 4 * model.config.emb_dim
    assert list(model.state_dict()) == list(ckpt["model"])
    with torch.no_grad():
        assert torch.equal(model(torch.tensor(reference["input_ids"])), torch.tensor(reference["logits"]))
    again = dataclasses.asdict(model.config)
    assert GPT(type(model.config)(**again)).config == model.config


MEASURE_LOADING = """
import json, resource, sys, torch
import hf
hf.CHUNK = 1 << 22  # 4 MB at a time for the conversions: small beside the model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = hf.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"grown": grown, "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def test_loading_needs_no_second_copy_of_the_weights(tmp_path):
    """A float32 file loaded in bfloat16 (cast on the way, the embedding transposed), in a fresh
    process: its peak memory grows by the model and a little, not by a second copy of it."""
    from safetensors.torch import save_file
    cfg = config_for("qwen3-0.6b", n_layers=2, vocab_size=8192, context_length=256)
    torch.manual_seed(0)
    model = GPT(cfg)
    (tmp_path / "config.json").write_text(json.dumps(config_json(cfg, "float32")))
    save_file(hf_state_dict(model), str(tmp_path / "model.safetensors"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", MEASURE_LOADING, str(tmp_path)], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    assert measured["dtypes"] == ["torch.bfloat16"] and measured["bytes"] > 70e6
    assert measured["grown"] < 1.2 * measured["bytes"], measured
