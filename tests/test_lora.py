import copy
import dataclasses
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import hf as hf_module
from export import config_json, export, hf_state_dict
from checkpoint import load_for_inference
from decoding import respond
from checkpoint import build_base, lora_checkpoint, lora_model_from_checkpoint, model_from_checkpoint, save_checkpoint
from lora import (LORA_TARGETS, LoRALinear, add_lora, base_fingerprint, lora_modules, lora_state_dict, merge_lora,
    parameter_counts)
from hf import build_model, from_pretrained
from model import GPT, config_for
import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(config_for("tiny", **{"vocab_size": 512, "context_length": 64, **overrides})).eval()


def batch(seed=0, vocab=512, shape=(4, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g), torch.randint(0, vocab, shape, generator=g)


def train_adapters(model, steps=8, lr=1e-2, vocab=512):
    """A few AdamW steps on the trainable parameters against a fixed batch; the losses."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    idx, targets = batch(vocab=vocab)
    losses = []
    for _ in range(steps):
        loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses, optimizer


def save_hf_folder(model, folder):
    """model as a Hugging Face GPT-2 folder (config.json, model.safetensors), as export.py writes it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_json(model.config, "float32"), f)
    save_file(hf_state_dict(model), os.path.join(folder, "model.safetensors"))


def test_step_zero_gives_the_base_logits_exactly():
    model = tiny()
    idx, _ = batch()
    with torch.no_grad():
        base = model(idx)
        add_lora(model, rank=4, alpha=32, dropout=0.1)
        assert torch.equal(model(idx), base)
        model.train()  # dropout on the adapters' input changes nothing while B is zero
        assert torch.equal(model(idx), base)


def test_training_changes_only_the_adapters():
    model = tiny()
    frozen = copy.deepcopy(model.state_dict())
    add_lora(model, rank=4, alpha=8, dropout=0.1)
    adapters = {name: p for name, p in model.named_parameters() if name.endswith(("lora_A", "lora_B"))}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(adapters)
    assert len(adapters) == 2 * 4 * 2  # A and B, four linears, two blocks
    start = copy.deepcopy(lora_state_dict(model))

    losses, optimizer = train_adapters(model)
    assert losses[-1] < losses[0] - 0.5
    state = model.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(state[name], tensor), name  # bit-identical
    for name in adapters:
        assert not torch.equal(state[name], start[name]), name
    assert {id(p) for p in optimizer.state} == {id(p) for p in adapters.values()}
    assert all(p.grad is None for name, p in model.named_parameters() if name not in adapters)
    trainable, total = parameter_counts(model)
    assert trainable == sum(p.numel() for p in adapters.values()) == 8192
    assert total == sum(t.numel() for t in frozen.values()) + trainable


def test_merged_model_equals_unmerged_and_updates_have_rank_at_most_r():
    model = tiny(seed=1)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_lora(model, rank=3, alpha=6)
    train_adapters(model)
    idx, _ = batch(seed=1)
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=0)
    # an ordinary GPT again: plain linears, the original keys, every parameter trainable
    assert not lora_modules(model) and isinstance(model.h[1].mlp.c_fc, nn.Linear)
    assert list(model.state_dict()) == list(tiny().state_dict())
    assert all(p.requires_grad for p in model.parameters())
    restored = model_from_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(model.config)})
    with torch.no_grad():
        assert torch.equal(restored.eval()(idx), model(idx))  # saved and loaded as any full checkpoint
    changed = 0
    for name, p in model.named_parameters():
        delta = p.detach() - base[name]
        if any(name.endswith(f"{path}.weight") for path in LORA_TARGETS.values()):
            assert 1 <= torch.linalg.matrix_rank(delta).item() <= 3, name
            changed += 1
        else:
            assert not delta.any(), name
    assert changed == 8


def test_a_bfloat16_base_keeps_float32_adapters():
    model = tiny(seed=2).to(torch.bfloat16)
    idx, targets = batch(seed=2)
    with torch.no_grad():
        base = model(idx)
    add_lora(model, rank=4, alpha=8)
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if p.requires_grad)
    assert model.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(idx), base) and base.dtype == torch.bfloat16
    losses, _ = train_adapters(model, steps=6)
    assert losses[-1] < losses[0]
    assert model.h[0].mlp.c_proj.lora_B.abs().sum() > 0
    with torch.no_grad():
        unmerged = model(idx)
        merge_lora(model)
        assert model.h[0].attn.c_attn.weight.dtype == torch.bfloat16
        # the merged weight is rounded to bfloat16: close, not equal
        assert (model(idx).float() - unmerged.float()).abs().max() < 0.1


def test_autocast_runs_the_adapters_in_its_dtype():
    model = add_lora(tiny(seed=2), rank=4, alpha=8)
    idx, targets = batch(seed=2)
    with torch.no_grad():
        base = model(idx)
    for _, lora in lora_modules(model):
        nn.init.normal_(lora.lora_B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        model(idx, targets).backward()
    assert logits.dtype == torch.bfloat16 and (logits.float() - base).abs().max() > 0.1  # the adapters count
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_targets_choose_the_linears():
    model = add_lora(tiny(), rank=2, alpha=2, targets="mlp_out,qkv")
    assert [name for name, _ in lora_modules(model)] == ["h.0.attn.c_attn", "h.0.mlp.c_proj",
                                                         "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    assert isinstance(model.h[0].mlp.c_proj, LoRALinear) and isinstance(model.h[0].mlp.c_fc, nn.Linear)
    assert not model.h[0].mlp.c_fc.weight.requires_grad and not model.wte.weight.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "LoRA rank 0 must be an integer from 1 to 64, the smallest dimension of the adapted layers"),
    (dict(rank=-2), "LoRA rank -2 must be an integer from 1 to 64"),
    (dict(rank=65), "LoRA rank 65 must be an integer from 1 to 64"),
    (dict(rank=4, alpha=0), r"LoRA alpha 0 must be a positive number \(the update is scaled by alpha / rank\)"),
    (dict(rank=4, alpha=-1.0), "LoRA alpha -1.0 must be a positive number"),
    (dict(rank=4, dropout=1.0), r"LoRA dropout 1.0 must be in \[0, 1\)"),
    (dict(rank=4, targets="qkv,q_proj"),
     r"unknown LoRA target 'q_proj'; choose among qkv, attn_out, mlp_in, mlp_out \(comma-separated\)"),
    (dict(rank=4, targets=[]), "unknown LoRA target ''; choose among qkv"),
])
def test_bad_settings_are_refused_and_leave_the_model_alone(kwargs, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        add_lora(model, **{"alpha": 8, **kwargs})
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_adding_adapters_twice_is_refused():
    model = add_lora(tiny(), rank=2, alpha=2)
    with pytest.raises(ValueError, match="the model has LoRA adapters already"):
        add_lora(model, rank=2, alpha=2)


def test_fingerprint_follows_the_weights_not_the_adapters():
    model = tiny()
    fingerprint = base_fingerprint(model)
    assert base_fingerprint(tiny()) == fingerprint and base_fingerprint(tiny(seed=1)) != fingerprint
    add_lora(model, rank=2, alpha=2)
    train_adapters(model, steps=2)
    assert base_fingerprint(model) == fingerprint  # adapters are left out; the base is unchanged
    with torch.no_grad():
        model.h[1].ln_2.bias[0] += 1e-6
    assert base_fingerprint(model) != fingerprint


def lora_run(tmp_path, base_model, identity, name="ckpt.pt"):
    """A LoRA checkpoint as train.py writes it, after a few steps on base_model; (path, the
    model with merged adapters)."""
    model = add_lora(base_model, rank=4, alpha=16, targets=["qkv", "attn_out", "mlp_out"])
    train_adapters(model, steps=3, vocab=model.config.vocab_size)
    path = str(tmp_path / name)
    save_checkpoint({**lora_checkpoint(model, identity), "config": dataclasses.asdict(model.config),
                     "prompt_style": "phi3", "context_length": model.config.context_length}, path)
    return path, merge_lora(model)


@pytest.fixture
def hf_base(tmp_path):
    """A tiny GPT-2 with GPT-2's vocabulary saved as a Hugging Face folder, and build_base's
    (model, identity) of it, as train.py starts a LoRA run: (folder, model, identity)."""
    torch.manual_seed(5)
    folder = str(tmp_path / "base")
    save_hf_folder(GPT(config_for("tiny", context_length=64)), folder)
    return (folder, *build_base(folder, pretrained=True, seed=123, context_length=32))


def test_a_lora_checkpoint_loads_for_inference_merged(tmp_path, hf_base):
    folder, model, identity = hf_base
    assert identity == {"base": os.path.abspath(folder), "init": "pretrained", "seed": 123,
                        "fingerprint": base_fingerprint(from_pretrained(folder, context_length=32))}
    base_bytes = sum(t.nbytes for t in model.state_dict().values())
    path, merged = lora_run(tmp_path, model, identity)

    ckpt = torch.load(path, weights_only=True)
    adapter_bytes = sum(t.nbytes for t in ckpt["model"].values())
    assert set(ckpt["model"]) == {f"h.{i}.{p}.lora_{m}" for i in range(2) for m in "AB"
                                  for p in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    assert ckpt["lora"] == {"rank": 4, "alpha": 16, "dropout": 0.0, "targets": ["qkv", "attn_out", "mlp_out"],
                            "base": identity}
    assert os.path.getsize(path) < 2 * adapter_bytes < base_bytes / 100  # adapters only: kilobytes

    loaded, _, style, _ = load_for_inference(path)  # what generate.py and eval.py do
    assert style == "phi3" and not lora_modules(loaded) and loaded.config.context_length == 32
    idx, _ = batch(vocab=50257)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), merged(idx), atol=1e-5, rtol=0)

    # resuming: the unmerged model, its base frozen, its adapters the saved ones
    resumed = lora_model_from_checkpoint(ckpt, path)
    assert {name for name, p in resumed.named_parameters() if p.requires_grad} == set(ckpt["model"])
    assert all(torch.equal(t, ckpt["model"][name]) for name, t in lora_state_dict(resumed).items())


def test_a_lora_checkpoint_exports_merged(tmp_path, hf_base):
    folder, model, identity = hf_base
    path, merged = lora_run(tmp_path, model, identity)
    exported = from_pretrained(export(path, str(tmp_path / "hf"))).eval()
    idx, _ = batch(vocab=50257)
    with torch.no_grad():
        torch.testing.assert_close(exported(idx), merged(idx), atol=1e-5, rtol=0)


def test_resuming_the_adapters_continues_exactly():
    model, identity = build_base("tiny", pretrained=False, seed=4, context_length=32)
    add_lora(model, rank=2, alpha=4)
    _, optimizer = train_adapters(model, steps=2, vocab=50257)
    ckpt = {**lora_checkpoint(model, identity), "config": dataclasses.asdict(model.config),
            "optimizer": copy.deepcopy(optimizer.state_dict())}
    resumed = lora_model_from_checkpoint(ckpt)
    resumed_optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    resumed_optimizer.load_state_dict(ckpt["optimizer"])
    for m, opt in ((model, optimizer), (resumed, resumed_optimizer)):  # one more step each
        m.train()
        m(*batch(seed=9, vocab=50257)).backward()
        opt.step()
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(resumed)[name], tensor), name


def test_a_random_base_is_rebuilt_from_its_seed_without_touching_the_random_state():
    torch.manual_seed(1)
    before = torch.get_rng_state()
    model, identity = build_base("tiny", pretrained=False, seed=7, context_length=32)
    assert torch.equal(torch.get_rng_state(), before)
    assert identity == {"base": "tiny", "init": "random", "seed": 7, "fingerprint": base_fingerprint(model)}
    torch.manual_seed(7)
    expected = build_model("tiny", pretrained=False, context_length=32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_a_changed_base_is_refused(tmp_path, hf_base):
    folder, model, identity = hf_base
    path, _ = lora_run(tmp_path, model, identity)
    changed = from_pretrained(folder)
    with torch.no_grad():
        changed.h[0].attn.c_attn.weight[0, 0] += 0.01
    save_hf_folder(changed, folder)
    with pytest.raises(ValueError, match=f"the pretrained weights of {folder} are not those the LoRA adapters of "
                                         f"{path} were trained on"):
        load_for_inference(path)
    # a random base: another seed is another base
    model, identity = build_base("tiny", pretrained=False, seed=3, context_length=32)
    path, _ = lora_run(tmp_path, model, {**identity, "seed": 4}, name="random.pt")
    with pytest.raises(ValueError, match="the random weights of tiny are not those"):
        model_from_checkpoint(torch.load(path, weights_only=True), path)


def test_a_moved_base_folder_is_refused_in_one_line_and_found_with_base(tmp_path, hf_base):
    folder, model, identity = hf_base
    path, merged = lora_run(tmp_path, model, identity)
    elsewhere = str(tmp_path / "elsewhere")
    os.rename(folder, elsewhere)

    def generate_cli(*args):
        return scripts.run([sys.executable, os.path.join(ROOT, "generate.py"), "--ckpt", path, "--prompt", "Hi",
                               "--max-new-tokens", "5", "--device", "cpu", *args], capture_output=True, text=True,
                              cwd=tmp_path)
    result = generate_cli()
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: the base model folder {folder} of the LoRA checkpoint {path} does not exist; "
                             "put the folder back there or pass its new place with --base FOLDER (the checkpoint "
                             "holds only the adapters)\n")

    # --base: the same base in its new place, checked by its fingerprint (generate.py, eval.py, export.py)
    result = generate_cli("--base", elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout == respond(merged, [{"instruction": "Hi", "input": ""}], "phi3", 5)[0] + "\n"
    loaded = load_for_inference(path, base=elsewhere)[0]
    exported = from_pretrained(export(path, str(tmp_path / "hf"), base=elsewhere)).eval()
    idx, _ = batch(vocab=50257)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), merged(idx), atol=1e-5, rtol=0)
        torch.testing.assert_close(exported(idx), merged(idx), atol=1e-5, rtol=0)
    # another model in the folder given is refused
    torch.manual_seed(6)
    save_hf_folder(GPT(config_for("tiny", context_length=64)), str(tmp_path / "other"))
    with pytest.raises(ValueError, match=f"the pretrained weights of {tmp_path / 'other'} are not those the LoRA "
                                         f"adapters of {path} were trained on"):
        load_for_inference(path, base=str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match=f"--base {tmp_path / 'nowhere'} is not a folder"):
        load_for_inference(path, base=str(tmp_path / "nowhere"))


def test_a_preset_base_missing_from_the_cache_points_to_base(tmp_path, monkeypatch):
    model, identity = build_base("tiny", pretrained=False, seed=3, context_length=32)
    path, _ = lora_run(tmp_path, model, {**identity, "base": "gpt2", "init": "pretrained"})
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))

    def offline(url, dest, headers=None):
        raise OSError(f"could not download {url} (no network); check the network")
    monkeypatch.setattr(hf_module, "download", offline)
    with pytest.raises(OSError) as raised:
        load_for_inference(path)
    assert str(raised.value) == (
        f"the LoRA checkpoint {path} needs the weights of gpt2, which are not in the download cache "
        f"{tmp_path / 'cache'} and could not be downloaded; connect to the network, or pass a folder holding those "
        "weights with --base FOLDER")


def test_adapters_that_do_not_fit_their_settings_are_reported(tmp_path, hf_base):
    folder, model, identity = hf_base
    path, _ = lora_run(tmp_path, model, identity)
    ckpt = torch.load(path, weights_only=True)
    ckpt["lora"]["rank"] = 5
    with pytest.raises(ValueError, match=f"{path} is corrupt: its adapters do not fit its LoRA settings"):
        model_from_checkpoint(ckpt, path)
    ckpt["lora"]["rank"] = 4
    del ckpt["model"]["h.1.mlp.c_proj.lora_B"]
    with pytest.raises(ValueError, match=r"its adapters do not fit its LoRA settings \(e.g. 'h.1.mlp.c_proj.lora_B'\)"):
        model_from_checkpoint(ckpt, path)
    del ckpt["lora"]["base"]["seed"]
    with pytest.raises(ValueError, match="is corrupt: its LoRA settings lack 'seed'"):
        model_from_checkpoint(ckpt, path)
