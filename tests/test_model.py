import http.server
import json
import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from common import download
from hf import build_model, from_pretrained, hf_folder
from hf import main as hf_main
from model import GPT, KVCache, PRESETS, config_for
import scripts

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf-tiny-gpt2")
REFERENCE = json.load(open(os.path.join(FIXTURE, "reference.json")))


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(config_for("tiny", **{"vocab_size": 512, "context_length": 64, **overrides})).eval()


@pytest.mark.parametrize("layout", ["bare", "prefixed"])
def test_hf_logits_match_transformers(layout):
    model = from_pretrained(os.path.join(FIXTURE, layout)).eval()
    with torch.no_grad():
        logits = model(torch.tensor(REFERENCE["input_ids"]))
    torch.testing.assert_close(logits, torch.tensor(REFERENCE["logits"]), atol=REFERENCE["tolerance"], rtol=0)


@pytest.mark.parametrize("layout", ["bare", "prefixed"])
def test_hf_greedy_with_kv_cache_matches_transformers(layout):
    model = from_pretrained(os.path.join(FIXTURE, layout)).eval()
    prompt = torch.tensor(REFERENCE["input_ids"][:1])
    cache = KVCache(model.config, 1, prompt.size(1) + 20, "cpu")
    tokens = []
    with torch.no_grad():
        logits = model.forward_cached(prompt, cache)
        for _ in range(20):
            tokens.append(logits.argmax(-1))
            logits = model.forward_cached(tokens[-1][:, None], cache)
    assert torch.cat(tokens).tolist() == REFERENCE["greedy_20"]


def test_shorter_context_keeps_first_position_rows():
    full = from_pretrained(os.path.join(FIXTURE, "bare"))
    short = from_pretrained(os.path.join(FIXTURE, "bare"), context_length=16)
    assert short.config.context_length == 16 and short.wpe.weight.shape == (16, 64)
    assert torch.equal(short.wpe.weight, full.wpe.weight[:16])
    ids = torch.tensor(REFERENCE["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(short(ids), full(ids))
    with pytest.raises(ValueError, match="context length 65 must be between 1 and the model's 64"):
        from_pretrained(os.path.join(FIXTURE, "bare"), context_length=65)


def test_output_head_is_the_token_embedding():
    model = tiny()
    table = model.wte(torch.arange(512))  # (vocab, emb_dim): the embedding of every token
    x = torch.randn(3, 64)
    torch.testing.assert_close(model.wte.logits(x), x @ table.t())  # the head scores by the same vectors
    assert [p.shape for p in model.parameters()].count((64, 512)) == 1  # one matrix, not two


def test_preset_parameter_counts():
    # the counts of the hub models (their model cards, transformers' num_parameters())
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
                "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "llama-3.2-1b": 1_235_814_400,
                "llama-3.2-3b": 3_212_749_824, "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120,
                "smollm2-1.7b": 1_711_376_384, "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304}
    for name, count in expected.items():
        with torch.device("meta"):
            assert GPT(config_for(name)).num_params() == count, name
    assert set(PRESETS) == set(expected) | {"tiny"}


def test_loss_equals_cross_entropy_over_counted_targets():
    model = tiny()
    idx = torch.randint(0, 512, (3, 10))
    targets = torch.randint(0, 512, (3, 10))
    targets[0, 6:] = -100
    targets[2, :4] = -100
    logits = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(idx, targets), expected)
    torch.testing.assert_close(model(idx, targets, reduction="sum"), expected * (targets != -100).sum())


def test_loss_skipping_ignored_positions_gives_same_gradients():
    model = tiny()
    idx = torch.randint(0, 512, (2, 12))
    targets = torch.randint(0, 512, (2, 12))
    targets[:, :7] = -100
    model(idx, targets).backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    for a, (name, p) in zip(fast, model.named_parameters()):
        torch.testing.assert_close(a, p.grad, msg=name)


def test_loss_with_no_counted_target_is_zero_not_nan():
    model = tiny()
    idx = torch.randint(0, 512, (2, 5))
    loss = model(idx, torch.full((2, 5), -100))
    assert loss.item() == 0.0
    loss.backward()  # still a valid graph: zero gradients, no NaN
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="sequence of 65 tokens exceeds the context length 64"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


def test_kv_cache_matches_plain_forward_token_by_token():
    model = tiny(seed=1)
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 20, "cpu")
        steps = [model.forward_cached(idx[:, :7], cache)]  # a prefill, then one token at a time
        steps += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model.forward_cached(idx[:, :1], cache)


def test_kv_cache_with_left_padding_matches_each_row_alone():
    model = tiny(seed=2)
    rows = [torch.randint(0, 512, (n,)).tolist() for n in (9, 4, 6)]
    pad_lens = [9 - len(r) for r in rows]
    batch = torch.tensor([[0] * p + r for p, r in zip(pad_lens, rows)])
    extra = torch.randint(0, 512, (3, 3))
    with torch.no_grad():
        cache = KVCache(model.config, 3, 12, "cpu", pad_lens=pad_lens)
        batched = [model.forward_cached(batch, cache)] + [model.forward_cached(extra[:, t:t + 1], cache) for t in range(3)]
        batched = torch.stack(batched, 1)
        for b, r in enumerate(rows):
            alone = model(torch.tensor([r + extra[b].tolist()]))[0]
            torch.testing.assert_close(batched[b], alone[len(r) - 1:], atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    model = tiny(drop_rate=0.5)
    idx = torch.randint(0, 512, (1, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_build_model_random_and_errors(tmp_path):
    model = build_model("tiny", pretrained=False, context_length=128, drop_rate=0.1)
    assert model.config.context_length == 128 and model.config.drop_rate == 0.1
    assert build_model(os.path.join(FIXTURE, "bare"), pretrained=False).config.vocab_size == 1024
    with pytest.raises(ValueError, match="'tiny' has no pretrained weights"):
        build_model("tiny")
    with pytest.raises(ValueError, match="'gpt3' is neither a preset with pretrained weights"):
        build_model("gpt3")
    with pytest.raises(ValueError, match="context length 2048 must be between 1 and the model's 1024"):
        build_model("gpt2", pretrained=False, context_length=2048)


def test_a_missing_path_and_a_train_output_folder_are_told_apart(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^out/nope.pt does not exist; a model is a preset with pretrained "
                                                r"weights \(gpt2, .*, qwen2.5-1.5b\), a local folder or a model file$"):
        build_model("out/nope.pt")
    with pytest.raises(ValueError, match=r"^'nope' is neither a preset \(gpt2, .*tiny, .*\), a local folder nor a model file$"):
        build_model("nope", pretrained=False)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    for pretrained in (True, False):
        with pytest.raises(FileNotFoundError, match=f"^{tmp_path} is a train.py output folder, not a Hugging Face "
                                                    f"model folder \\(it has no config.json\\); give its checkpoint, "
                                                    f"{tmp_path / 'ckpt.pt'}$"):
            build_model(str(tmp_path), pretrained=pretrained)


def test_from_pretrained_reports_bad_folders(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        from_pretrained(str(folder))
    config = json.load(open(os.path.join(FIXTURE, "bare", "config.json")))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        from_pretrained(str(folder))
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="model.safetensors cannot be read"):
        from_pretrained(str(folder))
    (folder / "model.safetensors").write_bytes(open(os.path.join(FIXTURE, "bare", "model.safetensors"), "rb").read())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    with pytest.raises(ValueError, match=r"'h.0.attn.c_attn.bias' has shape \(192,\), expected \(384,\) from its config.json"):
        from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="config.json: the architecture MistralForCausalLM is not supported; "
                                         "supported are GPT2LMHeadModel, LlamaForCausalLM"):
        from_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({**config, "n_head": None}))
    with pytest.raises(ValueError, match="config.json is not a valid GPT2Model config"):
        from_pretrained(str(folder))
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        from_pretrained(str(folder))


def test_hub_names_use_the_cache_and_download_atomically(tmp_path, monkeypatch):
    # a cached download is reused: no network touched
    cached = tmp_path / "gpt2"
    cached.mkdir()
    for file in ("config.json", "model.safetensors"):
        (cached / file).write_bytes(open(os.path.join(FIXTURE, "bare", file), "rb").read())
    monkeypatch.setattr("hf.download", lambda url, dest, headers=None: pytest.fail("should not download"))
    assert hf_folder("gpt2", cache_dir=str(tmp_path)) == str(cached)
    # download() writes through a temporary name; a failure leaves nothing behind
    def offline(url, dest, headers=None):
        raise OSError(f"could not download {url} (offline); check the network")
    monkeypatch.setattr("hf.download", offline)
    with pytest.raises(OSError, match="check the network, or pass a local folder with config.json"):
        hf_folder("gpt2-medium", cache_dir=str(tmp_path))
    monkeypatch.undo()
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3000)
    dest = tmp_path / "dl" / "file.bin"
    download(src.as_uri(), str(dest))
    assert dest.read_bytes() == b"x" * 3000 and not os.path.exists(str(dest) + ".tmp")
    with pytest.raises(OSError, match="could not download .*absent.bin .*; check the network"):
        download((tmp_path / "absent.bin").as_uri(), str(tmp_path / "dl" / "absent.bin"))
    assert os.listdir(tmp_path / "dl") == ["file.bin"]


def test_download_sends_its_headers_to_the_server_alone_and_names_refusals(tmp_path):
    """A real HTTP server on 127.0.0.1: a token goes to the address asked, not on to where it redirects
    (as the hub's files redirect to signed storage addresses); 404 and 401 are told apart from the rest."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path == "/repo/file":
                self.send_response(302)
                self.send_header("Location", "/storage/blob?signed=1")
                self.end_headers()
                return
            code, body = {"/storage/blob?signed=1": (200, b"weights"), "/gated": (401, b""), "/broken": (500, b"")}.get(
                self.path, (404, b""))
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        download(f"{base}/repo/file", str(tmp_path / "file"), {"Authorization": "Bearer secret"})
        assert (tmp_path / "file").read_bytes() == b"weights"
        assert seen == [("/repo/file", "Bearer secret"), ("/storage/blob?signed=1", None)]
        with pytest.raises(FileNotFoundError, match=f"^{base}/absent does not exist \\(HTTP 404\\)$"):
            download(f"{base}/absent", str(tmp_path / "absent"))
        with pytest.raises(PermissionError, match=f"^{base}/gated was refused \\(HTTP 401: Unauthorized\\)$"):
            download(f"{base}/gated", str(tmp_path / "gated"))
        with pytest.raises(OSError, match="could not download .*/broken \\(HTTP 500: Internal Server Error\\); "
                                          "check the network"):
            download(f"{base}/broken", str(tmp_path / "broken"))
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_command_line_lists_presets_and_loads_a_name_or_folder(tmp_path, monkeypatch, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = scripts.run([sys.executable, "hf.py"], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines() == [
        "gpt2          gpt2  12 layers, 12 heads        width  768, context   1024:   124.4M parameters "
        "(openai-community/gpt2)",
        "gpt2-medium   gpt2  24 layers, 16 heads        width 1024, context   1024:   354.8M parameters "
        "(openai-community/gpt2-medium)",
        "gpt2-large    gpt2  36 layers, 20 heads        width 1280, context   1024:   774.0M parameters "
        "(openai-community/gpt2-large)",
        "gpt2-xl       gpt2  48 layers, 25 heads        width 1600, context   1024: 1,557.6M parameters "
        "(openai-community/gpt2-xl)",
        "tiny          gpt2   2 layers, 4 heads         width   64, context   1024:     3.4M parameters "
        "(random weights only)",
        "qwen3-0.6b    qwen3 28 layers, 16 heads (8 kv) width 1024, context  40960:   596.0M parameters "
        "(Qwen/Qwen3-0.6B)",
        "qwen3-1.7b    qwen3 28 layers, 16 heads (8 kv) width 2048, context  40960: 1,720.6M parameters "
        "(Qwen/Qwen3-1.7B)",
        "llama-3.2-1b  llama 16 layers, 32 heads (8 kv) width 2048, context 131072: 1,235.8M parameters "
        "(meta-llama/Llama-3.2-1B)",
        "llama-3.2-3b  llama 28 layers, 24 heads (8 kv) width 3072, context 131072: 3,212.7M parameters "
        "(meta-llama/Llama-3.2-3B)",
        "smollm2-135m  llama 30 layers, 9 heads (3 kv)  width  576, context   8192:   134.5M parameters "
        "(HuggingFaceTB/SmolLM2-135M)",
        "smollm2-360m  llama 32 layers, 15 heads (5 kv) width  960, context   8192:   361.8M parameters "
        "(HuggingFaceTB/SmolLM2-360M)",
        "smollm2-1.7b  llama 24 layers, 32 heads        width 2048, context   8192: 1,711.4M parameters "
        "(HuggingFaceTB/SmolLM2-1.7B)",
        "qwen2.5-0.5b  qwen2 24 layers, 14 heads (2 kv) width  896, context  32768:   494.0M parameters "
        "(Qwen/Qwen2.5-0.5B)",
        "qwen2.5-1.5b  qwen2 28 layers, 12 heads (2 kv) width 1536, context 131072: 1,543.7M parameters "
        "(Qwen/Qwen2.5-1.5B)"]
    with pytest.raises(SystemExit) as stopped:
        hf_main(["--help"])
    assert stopped.value.code == 0 and "usage: " in capsys.readouterr().out
    # a preset name: its weights from the cache folder (fetched there once; here put there by the test)
    cached = tmp_path / "gpt2"
    cached.mkdir()
    for file in ("config.json", "model.safetensors"):
        (cached / file).write_bytes(open(os.path.join(FIXTURE, "bare", file), "rb").read())
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    hf_main(["gpt2"])
    assert capsys.readouterr().out == ("gpt2: GPT2LMHeadModel, 0.2M parameters, 2 layers, 4 heads, width 64, context "
                                       f"64, vocabulary 1024, float32; loaded from {cached}\n")
    folder = os.path.join(FIXTURE, "prefixed")
    hf_main([folder])
    assert capsys.readouterr().out.endswith(f"vocabulary 1024, float32; loaded from {folder}\n")
