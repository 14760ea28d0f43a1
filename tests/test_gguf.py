"""export.py --gguf: the GGUF file read back with llama.cpp's gguf package (metadata, tensor
names, shapes, values, a tokenizer that tokenizes as tiktoken does); the Modelfile's template
rendered by Go's text/template (where Go is installed) as format_prompt and the chat template
render; and, where llama-cpp-python is installed, llama.cpp itself: it loads the file, tokenizes
as tiktoken does and decodes greedily the tokens generate.py decodes."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import export as export_script
from checkpoint import save_checkpoint
from prompts import encode, EOT_ID, format_prompt, get_tokenizer, render_text
from export import MODELFILE_HEADER, chat_template, export_gguf
from decoding import generate
from hf import from_pretrained
from model import GPT, config_for
from test_export import (ENTRIES, ROOT, SAMPLES, bpe_tokenizer, file_modes, holding_the_lock, render,
    save_tiny_checkpoint, umask)
from test_lora import hf_base, lora_run  # noqa: F401 (hf_base is a fixture)
import scripts

HAVE_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="llama.cpp's gguf package is not installed (pip install gguf)")
EOT = "<|endoftext|>"
# llama.cpp's names for the tensors of a GPT-2 block (its gpt2 architecture), and ours
BLOCK = [("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
         ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]


def expected_tensors(model):
    """What llama.cpp's gpt2 architecture reads, from the model's own tensors: name -> tensor
    in the file's row-major layout (Hugging Face's Conv1D weights transposed, as
    convert_hf_to_gguf.py writes them), no output head (tied to token_embd)."""
    state = model.state_dict()
    tensors = {"token_embd.weight": state["wte.weight"].t(), "position_embd.weight": state["wpe.weight"],
               "output_norm.weight": state["ln_f.weight"], "output_norm.bias": state["ln_f.bias"]}
    for i in range(model.config.n_layers):
        for theirs, ours in BLOCK:
            for kind in ("weight", "bias"):
                tensors[f"blk.{i}.{theirs}.{kind}"] = state[f"h.{i}.{ours}.{kind}"]
    return tensors


def read_gguf(path):
    """(metadata, tensors) of a GGUF file as llama.cpp's gguf package reads it: key -> value,
    name -> (type name, shape in ggml's order, values dequantized to a float32 tensor)."""
    import gguf
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, tuple(int(n) for n in t.shape), torch.from_numpy(values.copy()))
    return fields, tensors


@pytest.fixture(scope="module")
def phi3_checkpoint(tmp_path_factory):
    """(model, checkpoint path) of a tiny phi3 checkpoint with GPT-2's vocabulary."""
    path = str(tmp_path_factory.mktemp("gguf") / "ckpt.pt")
    return save_tiny_checkpoint(path, "phi3"), path


# ----------------------------------------------------------------------------- the file


@needs_gguf
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_the_file_reads_back_with_the_models_metadata_names_shapes_and_values(tmp_path, phi3_checkpoint, gguf_type):
    model, ckpt = phi3_checkpoint
    path = str(tmp_path / "model.gguf")
    if gguf_type == "f16":  # the command line (f16 is its default) once, the function for the others
        result = scripts.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", ckpt, "--gguf", path],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"exported {ckpt} to {path} (f16, ")
        assert result.stdout.endswith(f"for Ollama: ollama create NAME -f {tmp_path / 'Modelfile'}\n")
    else:
        export_gguf(ckpt, path, gguf_type)
    assert sorted(os.listdir(tmp_path)) == [".export.lock", "Modelfile", "model.gguf"]
    fields, tensors = read_gguf(path)

    assert {key: value for key, value in fields.items() if not key.startswith("tokenizer.")} == {
        "general.architecture": "gpt2", "general.name": "model",
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[gguf_type],
        "general.quantization_version": 2, "gpt2.context_length": 128, "gpt2.embedding_length": 64,
        "gpt2.feed_forward_length": 256, "gpt2.block_count": 2, "gpt2.attention.head_count": 4,
        "gpt2.attention.layer_norm_epsilon": pytest.approx(1e-5)}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert [fields[f"tokenizer.ggml.{name}_token_id"] for name in ("bos", "eos", "unknown")] == [EOT_ID] * 3
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == chat_template("phi3")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 50257 and tokens[EOT_ID] == EOT
    assert types[EOT_ID] == 3 and set(types[:EOT_ID]) == {1}  # control, normal
    assert len(fields["tokenizer.ggml.merges"]) == 50000

    expected = expected_tensors(model)
    assert sorted(tensors) == sorted(expected)
    for name, (kind, shape, values) in tensors.items():
        want = expected[name].float()
        assert shape == tuple(reversed(want.shape)), name  # ggml lists the row length first
        stays_f32 = gguf_type == "f32" or want.dim() == 1 or name == "position_embd.weight"
        assert kind == ("F32" if stays_f32 else gguf_type.upper()), name
        if kind == "F32":
            assert torch.equal(values, want), name
        elif kind == "F16":
            assert torch.equal(values, want.half().float()), name
        else:  # q8_0: blocks of 32 values, each an int8 times the block's absmax / 127 (an f16)
            blocks, got = want.reshape(-1, 32), values.reshape(-1, 32)
            scale = blocks.abs().amax(dim=1, keepdim=True) / 127
            assert ((got - blocks).abs() <= scale * 0.5 + scale * 127 * 2**-10).all(), name
            assert (got - blocks).abs().max() > 0  # really quantized


@needs_gguf
def test_the_files_tokenizer_tokenizes_as_tiktoken(tmp_path, phi3_checkpoint):
    """The tokens and merges in the file, written out as vocab.json and merges.txt, tokenize
    every sample exactly as tiktoken does."""
    path = str(tmp_path / "model.gguf")
    export_gguf(phi3_checkpoint[1], path, "q8_0")
    fields, _ = read_gguf(path)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in fields["tokenizer.ggml.merges"]))
    encode_text, _ = bpe_tokenizer(str(folder))
    for text in SAMPLES:
        assert encode_text(text) == get_tokenizer().encode(text, disallowed_special=()), text


@needs_gguf
def test_a_padded_vocabulary_gets_unused_tokens(tmp_path):
    torch.manual_seed(0)
    model = GPT(config_for("tiny", context_length=32, vocab_size=50304)).eval()  # padded to a multiple of 64
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config), "prompt_style": "none"}, ckpt)
    export_gguf(ckpt, str(tmp_path / "model.gguf"), "f32")
    fields, tensors = read_gguf(str(tmp_path / "model.gguf"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 50304 and tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    assert set(types[50257:]) == {5}  # unused
    assert torch.equal(tensors["token_embd.weight"][2], model.wte.weight.t())


@needs_gguf
def test_a_lora_checkpoint_is_exported_merged(tmp_path, hf_base):
    folder, model, identity = hf_base
    path, merged = lora_run(tmp_path, model, identity)
    export_gguf(path, str(tmp_path / "out" / "model.gguf"), "f32")
    _, tensors = read_gguf(str(tmp_path / "out" / "model.gguf"))
    for name, want in expected_tensors(merged).items():
        torch.testing.assert_close(tensors[name][2], want, atol=1e-6, rtol=0, msg=name)
    # the adapters really changed the weights the file holds
    base = from_pretrained(folder, context_length=32)
    assert not torch.allclose(tensors["blk.0.attn_qkv.weight"][2], base.h[0].attn.c_attn.weight, atol=1e-4)


# ----------------------------------------------------------------------------- refusals, files


def test_a_missing_gguf_package_is_one_line(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    code = ("import runpy, sys; sys.modules['gguf'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "export.py"), "--ckpt", ckpt,
                             "--gguf", str(tmp_path / "model.gguf")], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "error: --gguf needs llama.cpp's gguf package: pip install gguf\n"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_neither_out_nor_gguf_is_a_usage_error(tmp_path):
    result = scripts.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", "x.pt"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.endswith("error: give --out FOLDER (Hugging Face), --gguf FILE (llama.cpp, Ollama) or both\n")
    result = scripts.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", "x.pt", "--out",
                             str(tmp_path / "hf"), "--gguf-type", "q8_0"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.endswith("error: --gguf-type goes with --gguf FILE\n")
    assert os.listdir(tmp_path) == []


@needs_gguf
def test_a_small_vocabulary_is_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = GPT(config_for("tiny", context_length=32, vocab_size=1000))
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "config": vars(model.config)}, ckpt)
    with pytest.raises(ValueError, match=f"^{ckpt} has a vocabulary of 1000 tokens; GPT-2's tokenizer needs 50257$"):
        export_gguf(ckpt, str(tmp_path / "out" / "model.gguf"))
    assert os.listdir(tmp_path / "out") == [".export.lock"]


@needs_gguf
def test_earlier_exports_are_replaced_only_with_force_and_nothing_else_ever(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    path, modelfile = tmp_path / "out" / "model.gguf", tmp_path / "out" / "Modelfile"
    assert export_gguf(ckpt, str(path), "q8_0") == str(modelfile)
    old = path.read_bytes(), modelfile.read_text()
    with pytest.raises(ValueError, match=f"^{path} holds an earlier export; pass --force to replace it$"):
        export_gguf(ckpt, str(path), "q8_0")

    # a failure half way leaves the earlier export as it was, and no temporary file
    def fail(model, style, tmp, gguf_type, name):
        with open(tmp, "wb") as f:
            f.write(b"GGUF half")
        raise OSError("disk full")
    monkeypatch.setattr(export_script, "write_gguf", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(ckpt, str(path), "q8_0", force=True)
    monkeypatch.undo()
    assert (path.read_bytes(), modelfile.read_text()) == old
    assert sorted(os.listdir(path.parent)) == [".export.lock", "Modelfile", "model.gguf"]
    save_tiny_checkpoint(ckpt, "phi3", seed=2)
    export_gguf(ckpt, str(path), "q8_0", force=True)
    assert path.read_bytes() != old[0] and "<|user|>" in modelfile.read_text()

    # a file that is no GGUF file, or a Modelfile export.py did not write: never replaced
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(ValueError, match=f"^{notes} exists and is not a GGUF file; --force replaces only an "
                                         "earlier export: give another --gguf$"):
        export_gguf(ckpt, str(notes), force=True)
    (tmp_path / "Modelfile").write_text("FROM llama3\n")
    with pytest.raises(ValueError, match="Modelfile exists and is not a Modelfile export.py wrote"):
        export_gguf(ckpt, str(tmp_path / "new.gguf"), force=True)
    assert notes.read_text() == "my notes" and (tmp_path / "Modelfile").read_text() == "FROM llama3\n"
    assert not (tmp_path / "new.gguf").exists()
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(ValueError, match="folder.gguf is a folder; --gguf takes a file name"):
        export_gguf(ckpt, str(tmp_path / "folder.gguf"))
    for name in ("out", "model.bin", ".gguf"):  # refused, not completed: the file is the one the user named
        with pytest.raises(ValueError, match=f"^--gguf {tmp_path / name}: give a file name ending in .gguf, as "
                                             "llama.cpp and Ollama name them$"):
            export_gguf(ckpt, str(tmp_path / name))


@needs_gguf
def test_a_second_type_in_one_folder_gets_its_own_modelfile(tmp_path):
    """The folder's Modelfile is the first GGUF file's: a second GGUF file exported beside it gets
    NAME.Modelfile, never the first one's; each is replaced (with --force) only by its own export."""
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    first, second = tmp_path / "out" / "model-f16.gguf", tmp_path / "out" / "model-q8_0.gguf"
    assert export_gguf(ckpt, str(first), "f16") == str(tmp_path / "out" / "Modelfile")
    shared = (tmp_path / "out" / "Modelfile").read_text()
    result = scripts.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", ckpt, "--gguf", str(second),
                             "--gguf-type", "q8_0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    own = tmp_path / "out" / "model-q8_0.Modelfile"
    assert result.stdout.endswith(f"and {own}; for Ollama: ollama create NAME -f {own}\n")
    assert (tmp_path / "out" / "Modelfile").read_text() == shared and "FROM ./model-f16.gguf\n" in shared
    assert "FROM ./model-q8_0.gguf\n" in own.read_text()
    assert own.read_text().split("\n")[0].endswith(": ollama create NAME -f model-q8_0.Modelfile")
    assert shared.split("\n")[0].endswith(": ollama create NAME -f Modelfile")
    assert export_gguf(ckpt, str(first), "f16", force=True) == str(tmp_path / "out" / "Modelfile")
    with pytest.raises(ValueError, match=f"^{second} holds an earlier export; pass --force to replace it$"):
        export_gguf(ckpt, str(second), "q8_0")
    assert sorted(os.listdir(tmp_path / "out")) == [".export.lock", "Modelfile", "model-f16.gguf",
                                                     "model-q8_0.Modelfile", "model-q8_0.gguf"]


@needs_gguf
def test_the_gguf_file_and_modelfile_have_the_umasks_permissions_and_a_lock(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, "alpaca")
    with umask(0o027):
        export_gguf(ckpt, str(tmp_path / "out" / "model.gguf"), "q8_0")
    assert file_modes(tmp_path / "out") == {".export.lock": oct(0o640), "Modelfile": oct(0o640),
                                            "model.gguf": oct(0o640)}
    holder = holding_the_lock(tmp_path / "out" / ".export.lock")
    try:
        with pytest.raises(ValueError, match=f"^{tmp_path / 'out' / 'other.gguf'} is in use by export.py "
                                             f"\\(process {holder.pid}\\)"):
            export_gguf(ckpt, str(tmp_path / "out" / "other.gguf"), "q8_0")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "out" / "other.gguf").exists()


# ----------------------------------------------------------------------------- the Modelfile


def modelfile_template(text):
    """The TEMPLATE of a Modelfile (between its triple quotes, which Ollama reads as they are)."""
    return text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


@needs_gguf
@pytest.mark.parametrize("style, stops", [("alpaca", ["### Instruction:", "### Response:"]),
                                          ("phi3", ["<|user|>", "<|assistant|>:"]), ("none", [])])
def test_the_modelfile(tmp_path, style, stops):
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, style)
    modelfile = export_gguf(ckpt, str(tmp_path / "my model.gguf"), "q8_0")
    with open(modelfile, encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith(MODELFILE_HEADER) and lines[1] == "FROM ./my model.gguf"
    assert [line for line in lines if line.startswith("PARAMETER")] == [
        *(f'PARAMETER stop "{stop}"' for stop in [EOT, *stops]), "PARAMETER num_ctx 128"]


GO_RENDER = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

type Message struct{ Role, Content string }

// consecutive messages of one role joined by a blank line, as Ollama's template.collate does
// before its template sees them (tool messages, which we never send, stay apart there)
func collate(messages []Message) []Message {
	var out []Message
	for _, m := range messages {
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\\n\\n" + m.Content
		} else {
			out = append(out, m)
		}
	}
	return out
}

// render each conversation on stdin with the template in os.Args[1], as Ollama passes .Messages
func main() {
	t := template.Must(template.New("").Parse(os.Args[1]))
	var conversations [][]Message
	if err := json.NewDecoder(os.Stdin).Decode(&conversations); err != nil { panic(err) }
	var out []string
	for _, messages := range conversations {
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": collate(messages)}); err != nil { panic(err) }
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@needs_gguf
@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (its text/template renders Ollama's)")
@pytest.mark.parametrize("style", ["alpaca", "phi3", "none"])
def test_the_modelfile_template_renders_as_training_did(tmp_path, style):
    """Go's text/template, which Ollama uses, after Ollama's own joining of consecutive messages
    of one role: one turn gives format_prompt's text and the chat template's, byte for byte; an
    answer ends with <|endoftext|>; a conversation (a system message, later turns) renders as
    training renders it (data.render_text). An instruction and its input sent as two user
    messages reach the template as one instruction, "instruction\\n\\ninput": under Ollama
    there is no input block (the chat template, llama.cpp's and transformers', has one)."""
    ckpt = str(tmp_path / "ckpt.pt")
    save_tiny_checkpoint(ckpt, style)
    with open(export_gguf(ckpt, str(tmp_path / "model.gguf"), "q8_0"), encoding="utf-8") as f:
        template = modelfile_template(f.read())
    cases = []  # (messages, expected text)
    for entry in ENTRIES:
        user = [{"Role": "user", "Content": entry["instruction"]}]
        jinja = render(chat_template(style), [{k.lower(): v for k, v in m.items()} for m in user], True)
        assert jinja == format_prompt({**entry, "input": ""}, style)
        cases.append((user, jinja))
        if entry["input"]:  # Ollama: one instruction of both, where the chat template has an input block
            both = [*user, {"Role": "user", "Content": entry["input"]}]
            lowered = [{k.lower(): v for k, v in m.items()} for m in both]
            assert render(chat_template(style), lowered, True) == format_prompt(entry, style)
            merged = format_prompt({"instruction": entry["instruction"] + "\n\n" + entry["input"]}, style)
            cases.append((both, merged))
            cases.append(([*both, {"Role": "assistant", "Content": "Red."}], merged + "Red." + EOT))
        answer = [*user, {"Role": "assistant", "Content": "Red."}]
        cases.append((answer, jinja + "Red." + EOT))
        conversation = [{"Role": "system", "Content": "Be brief."}, *answer, {"Role": "user", "Content": "And green?"}]
        lowered = [{k.lower(): v for k, v in m.items()} for m in conversation]
        assert render(chat_template(style), lowered, True) == render_text(lowered, style)
        cases.append((conversation, render(chat_template(style), lowered, True)))
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    (tmp_path / "render.go").write_text(GO_RENDER)
    result = subprocess.run(["go", "run", str(tmp_path / "render.go"), template], capture_output=True, text=True,
                            input=json.dumps([messages for messages, _ in cases]), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [text for _, text in cases]


# ----------------------------------------------------------------------------- llama.cpp itself

PROMPTS = [format_prompt(entry, "alpaca") for entry in ENTRIES] + [
    format_prompt({"instruction": text}, "alpaca") for text in
    ("Rewrite the sentence using a simile: The car is very fast.", "What is the capital of France?",
     "Convert 45 kilometers to meters.", "Give three tips for staying healthy.", "Name a color.")]


def llama_greedy(llm, prompt, max_new_tokens, eos_id=EOT_ID):
    """llama.cpp's greedy decoding of the token ids prompt, stopping at eos_id (None: never): the
    argmax of the logits llama.cpp made for the last position."""
    import llama_cpp
    llm.reset()
    llm.eval(prompt)
    new = []
    while len(new) < max_new_tokens:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(logits.argmax())
        if token == eos_id:
            break
        new.append(token)
        llm.eval([token])
    return new


def load_llama(path, n_ctx=128):
    """llama.cpp's model of the GGUF file at path, through llama-cpp-python (2 threads), without
    llama.cpp's extra CPU buffer types: their AMX kernels for q8_0 die of SIGILL on machines that
    list AMX but whose kernel (or sandbox) does not enable it, such as the one these tests first
    ran on. tests/bench.py uses it too."""
    import llama_cpp.llama_cpp as low_level
    from llama_cpp import Llama
    default_params = low_level.llama_model_default_params

    def without_extra_buffer_types():
        params = default_params()
        params.use_extra_bufts = False
        return params
    low_level.llama_model_default_params = without_extra_buffer_types
    try:
        return Llama(model_path=path, n_ctx=n_ctx, n_threads=2, verbose=False)
    finally:
        low_level.llama_model_default_params = default_params


@needs_gguf
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (it builds llama.cpp from source: minutes)")
def test_llama_cpp_tokenizes_as_tiktoken_and_decodes_as_generate(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = save_tiny_checkpoint(ckpt, "alpaca")
    export_gguf(ckpt, str(tmp_path / "f32" / "model.gguf"), "f32")
    export_gguf(ckpt, str(tmp_path / "q8_0" / "model.gguf"), "q8_0")
    llm = load_llama(str(tmp_path / "f32" / "model.gguf"))
    for text in SAMPLES + PROMPTS:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == encode(text), text
    expected = [generate(model, [encode(p)], 24, stop_ids=(EOT_ID,))[0] for p in PROMPTS]
    assert all(expected)  # real continuations to compare
    assert [llama_greedy(llm, encode(p), 24) for p in PROMPTS] == expected

    q8 = load_llama(str(tmp_path / "q8_0" / "model.gguf"))
    first = [llama_greedy(q8, encode(p), 1) for p in PROMPTS]
    agree = sum(f == e[:1] for f, e in zip(first, expected))
    assert agree >= 0.75 * len(PROMPTS), f"q8_0 agrees with generate.py on {agree} of {len(PROMPTS)} first tokens"
