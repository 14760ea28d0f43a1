"""Speed benchmarks, one line per figure (a script, not collected by pytest).

    python tests/bench.py                    # everything (about 20 minutes on 2 cores)
    python tests/bench.py --only generation  # or training, eval, judge, lora, int8, llama, beams, dpo, serve,
                                             # hostile, choices, dedup, families

On the gpt2 (124M) config with random weights (lora: gpt2-medium), on the CPU. Targets are
ratios within one run, since absolute times on a shared machine are noisy; see README.md.
"""
import argparse
import importlib.util
import os
import re
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(os.path.join(SHARED, "tiktoken")):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(SHARED, "tiktoken")

from data import prepare_data  # noqa: E402
from prompts import encode, format_prompt  # noqa: E402
from model import GPT, config_for  # noqa: E402
from quantize import Int8Linear, prepare_for_decoding, quantize_int8  # noqa: E402
from decoding import choice_logprobs, generate  # noqa: E402
from eval import response_batches  # noqa: E402


def gpt2_random(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(config_for("gpt2", **overrides)).eval()


def gpt2_for_decoding(quantize=None):
    """gpt2_random() prepared as generate.py, eval.py and serve.py prepare the model they load."""
    return prepare_for_decoding(gpt2_random(), quantize)


def default_data_path():
    shared = os.path.join(SHARED, "data", "instruction-data.json")
    return shared if os.path.exists(shared) else None  # None: data.py downloads it


def timed_generate(model, prompts, new_tokens, **decoding):
    """Aggregate new tokens per second, end-of-text ignored so every row makes new_tokens."""
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, stop_ids=(), **decoding)
    elapsed = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in out)
    return len(prompts) * new_tokens / elapsed


def bench_generation(repeats=3):
    """Batch 1 and 16 prompts batched, with the weights as generate.py prepares them; each figure
    is the median of `repeats` runs, taken in turns with transformers' generate when it is
    installed (it is no dependency)."""
    model = gpt2_for_decoding()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (45,), generator=g).tolist()
    runs = {"ours": lambda: timed_generate(model, [prompt], 64)}
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
        hf, ids = GPT2LMHeadModel(GPT2Config()).eval(), torch.tensor([prompt])

        def hf_generate():
            start = time.perf_counter()
            with torch.inference_mode():
                hf.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=50256)
            return 64 / (time.perf_counter() - start)
        runs["transformers"] = hf_generate
    except ImportError:
        pass
    timed_generate(model, [prompt], 8)  # warm-up
    rates = {name: sorted(run() for _ in range(repeats))[repeats // 2] for name, run in runs.items()}
    single = rates["ours"]
    print(f"generation, batch 1, 45-token prompt, 64 greedy tokens: {single:.1f} tokens/s")
    if "transformers" in rates:
        print(f"generation, batch 1, transformers GPT2LMHeadModel.generate with its cache: "
              f"{rates['transformers']:.1f} tokens/s; ours = {single / rates['transformers']:.2f}x (target >= 1)")
    # the same work 16 times over, then 16 prompts of different lengths (left padding)
    same = [torch.randint(0, 50257, (45,), generator=g).tolist() for _ in range(16)]
    mixed = [torch.randint(0, 50257, (35 + i,), generator=g).tolist() for i in range(0, 32, 2)]
    for prompts, what, target in ((same, "16 prompts of 45 tokens", " (target >= 6x)"),
                                  (mixed, "16 prompts of 35-65 tokens", "")):
        batched = sorted(timed_generate(model, prompts, 64) for _ in range(repeats))[repeats // 2]
        print(f"generation, {what} batched, 64 greedy tokens each: {batched:.1f} tokens/s "
              f"= {batched / single:.1f}x batch 1{target}")


def bench_eval(batch_size=16, one_at_a_time=12):
    """Responses to the 110 test prompts of the default data, 64 new tokens each."""
    splits = prepare_data(default_data_path())
    prompts = [encode(format_prompt(e, "alpaca")) for e in splits.test_entries]
    model = gpt2_for_decoding()
    timed_generate(model, prompts[:1], 8)  # warm-up
    # one at a time is slow (~5 minutes for all 110): its rate is measured on the first few
    single = sum(timed_generate(model, [p], 64) ** -1 for p in prompts[:one_at_a_time])
    single = one_at_a_time / single
    start = time.perf_counter()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as eval.py batches them
    for i in range(0, len(order), batch_size):
        generate(model, [prompts[j] for j in order[i:i + batch_size]], 64, stop_ids=())
    batched = len(prompts) * 64 / (time.perf_counter() - start)
    print(f"eval responses, {len(prompts)} test prompts x 64 tokens, one at a time "
          f"(first {one_at_a_time}): {single:.1f} tokens/s")
    print(f"eval responses, {len(prompts)} test prompts x 64 tokens, batches of {batch_size}: "
          f"{batched:.1f} tokens/s = {batched / single:.1f}x one at a time (target >= 5x)")


def bench_training(every=8):
    """One epoch of the default data (935 examples, batch 8) on gpt2 (124M, random weights):
    train.py's step with and without grouping and masking, against the chapter's plain loop
    (logits at every position, default AdamW) and that loop with train.py's fused AdamW.
    A full epoch takes minutes per variant here, so each is timed on every 8th batch of its
    epoch's order, the variants taking turns so that a change in the machine's load hits all
    of them alike, and scaled to the epoch by padded tokens."""
    import resource

    import torch.nn.functional as F

    from data import batch_indices
    from step import count_tokens, make_optimizer, train_step

    path = default_data_path()
    plain, masked = prepare_data(path), prepare_data(path, mask_instructions=True)
    lengths, prompt_lengths = masked.train.lengths, masked.train.prompt_lengths
    model = gpt2_random().train()
    chapter_optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    fused_optimizer = make_optimizer(model, 5e-5, 0.1)

    def plain_loop(optimizer):
        def step(inputs, targets):  # calc_loss_batch and train_model_simple of ch07
            optimizer.zero_grad()
            F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
        return step

    def train_py(inputs, targets):
        train_step(model, fused_optimizer, [(inputs, targets)], count_tokens([(inputs, targets)], "cpu")[0])

    variants = [  # name, step, data, grouped by length, target speed-up over the chapter's loop
        ("the chapter's plain loop", plain_loop(chapter_optimizer), plain, False, None),
        ("plain loop with fused AdamW", plain_loop(fused_optimizer), plain, False, None),
        ("train.py default", train_py, plain, False, 1.0),
        ("--group-by-length", train_py, plain, True, None),
        ("--mask-instructions", train_py, masked, False, None),
        ("--group-by-length --mask-instructions", train_py, masked, True, 1.5),
    ]
    orders = {grouped: batch_indices(lengths, 8, shuffle=True, seed=123, drop_last=True, group_by_length=grouped)
              for grouped in (False, True)}
    padded = lambda batch: len(batch) * max(lengths[i] for i in batch)  # noqa: E731  (inputs of collate)
    positions = range(0, len(orders[False]), every)
    seconds, tokens, responses = ([0.0] * len(variants) for _ in range(3))
    print(f"training: 1 epoch of {len(plain.train)} examples, batch 8, gpt2 random weights, "
          f"{len(orders[False])} steps, timed on {len(positions)}")
    for position in [1, *positions]:  # the first round warms up
        for v, (_, step, splits, grouped, _) in enumerate(variants):
            batch = orders[grouped][position]
            inputs, targets = splits.collate_fn([splits.train[i] for i in batch])
            start = time.perf_counter()
            step(inputs, targets)
            elapsed = time.perf_counter() - start
            # Leave no gradients behind: the next variant would add to them, not allocate them.
            model.zero_grad(set_to_none=True)
            if position != 1:
                seconds[v] += elapsed
                tokens[v] += padded(batch)
                responses[v] += sum(lengths[i] - prompt_lengths[i] + 1 for i in batch)  # + end-of-text
    epochs = [seconds[v] * sum(map(padded, orders[grouped])) / tokens[v]
              for v, (_, _, _, grouped, _) in enumerate(variants)]
    for v, (name, _, _, _, target) in enumerate(variants):
        print(f"training, {name}: {tokens[v] / seconds[v]:,.0f} padded tokens/s, "
              f"{responses[v] / seconds[v]:,.0f} response tokens/s, epoch {epochs[v] / 60:.1f} min = "
              f"{epochs[0] / epochs[v]:.2f}x the chapter's loop" + (f" (target >= {target}x)" if target else "")
              + (f", {epochs[1] / epochs[v]:.2f}x with fused AdamW" if v > 1 else ""))
    print(f"training, peak resident memory of the bench (gpt2, its gradients, two AdamW states): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def bench_judge(n=40, delay=0.05, repeats=3):
    """judge.py scoring n responses against a local server that answers each request after
    `delay` seconds, one request at a time and four at a time (medians, taken in turns)."""
    import json
    import tempfile

    from judge import judge_file
    from judge_server import judge_server

    records = [{"instruction": f"Name a color ({i}).", "input": "", "output": "Blue.", "model_response": str(i)}
               for i in range(n)]
    seconds = {1: [], 4: []}
    with tempfile.TemporaryDirectory() as tmp, judge_server(delay=delay) as server:
        path = os.path.join(tmp, "test-responses.json")
        for _ in range(repeats):
            for workers in seconds:
                with open(path, "w") as f:
                    json.dump(records, f)
                start = time.perf_counter()
                judge_file(path, "bench", server.url, workers=workers)
                seconds[workers].append(time.perf_counter() - start)
    one, four = (sorted(s)[repeats // 2] for s in seconds.values())
    print(f"judge, {n} responses, server answering after {delay * 1000:.0f} ms: --workers 1 {one:.2f} s, "
          f"--workers 4 {four:.2f} s = {four / one:.2f}x (target <= 0.4x)")


def bench_serve(clients=8, new_tokens=64, repeats=2):
    """serve.py: `clients` chat requests of `new_tokens` each, streamed, one after another and
    all at once (continuous batching), taking turns `repeats` times; total tokens/s and the
    median time to the first token of each turn."""
    import http.client
    import json
    import statistics
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serve import Engine, make_server

    engine = Engine(gpt2_for_decoding(), max_batch=clients).start()
    server = make_server(engine, "alpaca", "gpt2-random", port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    instructions = [entry["instruction"] for entry in prepare_data(default_data_path()).test_entries[:clients]]

    def ask(instruction):
        """(seconds to the first token, tokens) of one streamed request."""
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": instruction}], "max_tokens": new_tokens, "stream": True,
            "stream_options": {"include_usage": True}}))
        response, first, tokens = conn.getresponse(), None, None
        for line in response:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
                tokens = event.get("usage", {}).get("completion_tokens", tokens)
        conn.close()
        return first, tokens

    def one_after_another():
        return [ask(instruction) for instruction in instructions]

    def all_at_once():
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(ask, instructions))

    try:
        ask(instructions[0])  # warm-up
        for _ in range(repeats):
            rates, ttfts = [], []
            for run in (one_after_another, all_at_once):
                start = time.perf_counter()
                results = run()
                rates.append(sum(tokens for _, tokens in results) / (time.perf_counter() - start))
                ttfts.append(statistics.median(first for first, _ in results))
            print(f"serve.py, {clients} clients x {new_tokens} tokens: one after another {rates[0]:.1f} tokens/s, "
                  f"first token after {ttfts[0] * 1000:.0f} ms (median); all at once {rates[1]:.1f} tokens/s = "
                  f"{rates[1] / rates[0]:.2f}x (target >= 3x), first token after {ttfts[1] * 1000:.0f} ms (median), "
                  f"{max(first for first, _ in results) * 1000:.0f} ms (slowest)", flush=True)
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()


def bench_hostile(repeats=3):
    """serve.py beside a hostile client (tests/test_serve_hostile.py's rounds on its tiny model):
    the time to the last token of 8 streaming clients beside every bad request, over alone."""
    from test_serve import lively_tiny
    from test_serve_hostile import hostile_rounds, slowdown

    model = lively_tiny(context_length=256)
    ratios = []
    for _ in range(repeats):
        expected, phases, sent, hostile_time, _ = hostile_rounds(model)
        ratio, line = slowdown(phases, sent, hostile_time)
        same = all([text for text, _ in results] == expected for results in phases)
        ratios.append(ratio)
        print(f"serve.py beside a hostile client, {line}; replies {'the same' if same else 'NOT the same'} as alone",
              flush=True)
    print(f"serve.py beside a hostile client: median {sorted(ratios)[repeats // 2]:.2f}x the time to the last token "
          "alone (target <= 1.5x)")


def tensor_bytes(obj):
    """Bytes of the tensors in a (nested) checkpoint dict: its size on disk, without writing it."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    return sum(map(tensor_bytes, obj.values())) if isinstance(obj, dict) else 0


def lora_variant(variant):
    """One side of bench_lora, in a process of its own: an optimizer step on the next batch for
    every line read, its seconds printed; at the end of the input, its figures as JSON."""
    import json
    import resource

    from data import batch_indices
    from lora import add_lora, base_fingerprint, lora_state_dict
    from step import count_tokens, make_optimizer, train_step

    splits = prepare_data(default_data_path())
    order = batch_indices(splits.train.lengths, 8, shuffle=True, seed=123, drop_last=True)
    torch.manual_seed(0)
    model = GPT(config_for("gpt2-medium")).train()
    result = {}
    if variant == "lora":
        result["base_bytes"] = tensor_bytes(model.state_dict())
        start = time.perf_counter()
        base_fingerprint(model)
        result["fingerprint_s"] = time.perf_counter() - start
        add_lora(model, rank=16, alpha=256)
    optimizer = make_optimizer(model, 5e-5, 0.1)
    for batch, _ in zip(order, sys.stdin):
        inputs, targets = splits.collate_fn([splits.train[i] for i in batch])
        start = time.perf_counter()
        train_step(model, optimizer, [(inputs, targets)], count_tokens([(inputs, targets)], "cpu")[0])
        print(time.perf_counter() - start, inputs.numel(), flush=True)
    weights = lora_state_dict(model) if variant == "lora" else model.state_dict()
    result.update(peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  ckpt_bytes=tensor_bytes({"model": weights, "optimizer": optimizer.state_dict()["state"]}))
    print(json.dumps(result), flush=True)


def bench_lora(steps=4):
    """gpt2-medium (355M) shape, random weights, batches of 8 of the default data (padded to
    their longest entry): train.py's optimizer step (forward, backward, fused AdamW) with LoRA
    rank 16 on all four linears of every block, against full fine-tuning. Each variant lives in
    a process of its own, so that its peak resident memory is its own; the two take turns, a
    step each on the same batch, so that a change in the machine's load hits both alike. Step
    time: the median of `steps` steps after a warm-up step. On a busy machine, run it with
    OMP_NUM_THREADS=1: LoRA's many small matmuls each wait for a thread the other programs hold,
    which there makes its step as slow as full fine-tuning's."""
    import json
    import statistics
    import subprocess

    procs = {variant: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--lora-variant", variant],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for variant in ("full", "lora")}

    def read(variant):
        line = procs[variant].stdout.readline()
        if not line:
            sys.exit(f"bench_lora: the {variant} process failed (see above)")
        return line

    times, tokens = {variant: [] for variant in procs}, 0
    for step in range(steps + 1):
        for variant, proc in procs.items():
            proc.stdin.write("\n")
            proc.stdin.flush()
            seconds, numel = read(variant).split()
            if step:  # the first step warms up
                times[variant].append(float(seconds))
                tokens += int(numel) if variant == "full" else 0
    runs = {}
    for variant, proc in procs.items():
        proc.stdin.close()
        runs[variant] = json.loads(read(variant))
        proc.wait()
    full, lora = runs["full"], runs["lora"]
    full["step_s"], lora["step_s"] = (statistics.median(times[variant]) for variant in ("full", "lora"))
    print(f"lora: gpt2-medium random weights, batch 8, {steps} timed steps of {tokens // steps} padded tokens "
          f"on average; trainable parameters {lora['trainable'] / 1e6:.1f}M vs {full['trainable'] / 1e6:.1f}M")
    print(f"lora, time per optimizer step: rank 16 {lora['step_s']:.1f} s, full fine-tuning {full['step_s']:.1f} s "
          f"= {lora['step_s'] / full['step_s']:.2f}x (target <= 0.75x)")
    print(f"lora, peak resident memory: rank 16 {lora['peak_gib']:.2f} GiB, full fine-tuning {full['peak_gib']:.2f} "
          f"GiB = {lora['peak_gib'] / full['peak_gib']:.2f}x (target <= 0.5x)")
    print(f"lora, checkpoint (weights and AdamW state): rank 16 {lora['ckpt_bytes'] / 2**20:.1f} MiB (adapters), "
          f"full fine-tuning {full['ckpt_bytes'] / 2**30:.2f} GiB")
    print(f"lora, fingerprint of the gpt2-medium base (sha256 of {lora['base_bytes'] / 2**30:.2f} GiB): "
          f"{lora['fingerprint_s']:.1f} s")


def median_in_turns(runs, repeats):
    """{name: median of `repeats` calls of runs[name]()}, the runs taking turns (a change in the
    machine's load hits all of them alike)."""
    results = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return {name: sorted(values)[repeats // 2] for name, values in results.items()}


def decoding_rates(decoders, new_tokens, repeats):
    """({name: median tokens/s}, {name: the ids of its last run}) of decoders {name: a function
    returning new_tokens token ids}: a warm-up run each, then `repeats` runs taking turns."""
    tokens = {}

    def rate(name):
        start = time.perf_counter()
        tokens[name] = decoders[name]()
        elapsed = time.perf_counter() - start
        assert len(tokens[name]) == new_tokens, name
        return new_tokens / elapsed
    for name in decoders:
        rate(name)  # warm-up
    return median_in_turns({name: (lambda n=name: rate(n)) for name in decoders}, repeats), tokens


def bench_int8(repeats=5):
    """The linear kernels of decoding (quantize.linear_kernel's candidates), summed over the 48
    block linears of one step; greedy decoding at batch 1 and 16 with float32 weights as trained
    and as prepared, and with int8 weights without and with the int8 head; the memory."""
    import torch.nn.functional as F
    model = gpt2_random()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    in_out = [m.weight for m in gpt2_for_decoding().modules() if isinstance(m, torch.nn.Linear)]  # its layout
    packed = [Int8Linear(m.weight, m.bias) for m in linears]
    scales = [m.weight.detach().abs().amax(dim=1) / 127 for m in linears]
    int8 = [(torch.round(m.weight.detach() / s[:, None]).to(torch.int8), s) for m, s in zip(linears, scales)]
    kernels = {  # x: {in_features: input}
        "float32 F.linear [out, in]": lambda x: [F.linear(x[m.in_features], m.weight, m.bias) for m in linears],
        "float32 F.linear, weights laid out [in, out]": lambda x: [F.linear(x[m.in_features], w, m.bias)
                                                                   for w, m in zip(in_out, linears)],
        "Int8Linear (fbgemm)": lambda x: [q(x[m.in_features]) for q, m in zip(packed, linears)],
        "torch._weight_int8pack_mm": lambda x: [torch._weight_int8pack_mm(x[m.in_features], q, s) + m.bias
                                                for (q, s), m in zip(int8, linears)],
        "dequantize, then F.linear": lambda x: [F.linear(x[m.in_features], q.float() * s[:, None], m.bias)
                                                for (q, s), m in zip(int8, linears)],
    }
    for batch in (1, 16):
        x = {n: torch.randn(batch, n) for n in (768, 3072)}

        def milliseconds(kernel):
            start = time.perf_counter()
            with torch.inference_mode():
                kernel(x)
            return (time.perf_counter() - start) * 1e3
        times = median_in_turns({name: lambda k=k: milliseconds(k) for name, k in kernels.items()}, repeats)
        print(f"linear kernels, the 48 block linears of one gpt2 decoding step at batch {batch}: "
              + ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items()))
    float_mib = sum(m.weight.numel() * 4 for m in linears) / 2**20
    int8_mib = sum(q.nbytes() for q in packed) / 2**20
    print(f"int8 memory of the block linears' weights: {float_mib:.0f} MiB float32, {int8_mib:.0f} MiB int8 = "
          f"{int8_mib / float_mib:.2f}x (target <= 0.3x)")
    in_out = packed = int8 = None  # freed (the kernels above, which hold them, are done)

    models = {"float32 as trained": model, "float32": gpt2_for_decoding(),
              "int8, float head": quantize_int8(gpt2_random(), head=False), "int8": gpt2_for_decoding("int8")}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (45,), generator=g).tolist() for _ in range(16)]
    for m in models.values():
        timed_generate(m, prompts[:1], 8)  # warm-up
    for batch in (1, 16):
        rates = median_in_turns({name: lambda m=m: timed_generate(m, prompts[:batch], 64)
                                 for name, m in models.items()}, repeats if batch == 1 else 3)
        print(f"greedy decoding, {batch} prompt{'s' * (batch > 1)} of 45 tokens, 64 tokens each: " + ", ".join(
            f"{name} {rate:.1f} tokens/s" + (f" = {rate / rates['float32']:.2f}x" if name != "float32" else "")
            for name, rate in rates.items()) + (" (target: int8 >= 1.5x)" if batch == 1 else ""))


def bench_llama(repeats=5, new_tokens=64):
    """Batch-1 greedy decoding against llama.cpp, through llama-cpp-python when it is installed:
    the same random gpt2 weights as GGUF files from export.py (f32, q8_0) against generate() with
    the weights generate.py loads (float32, --quantize int8); a 45-token prompt, its prefill
    included, the four taking turns; medians of `repeats` runs."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        print("llama.cpp comparison skipped: it needs llama-cpp-python (pip install llama-cpp-python==0.3.36, "
              "which builds llama.cpp from source) and gguf")
        return
    from export import write_gguf
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (45,), generator=g).tolist()
    rates, same = against_llama_cpp(lambda path, gguf_type: write_gguf(gpt2_random(), "alpaca", path, gguf_type, "gpt2-random"),
                                    lambda: {"float32": gpt2_for_decoding(), "int8": gpt2_for_decoding("int8")},
                                    prompt, new_tokens, repeats)
    print(f"llama.cpp comparison, batch 1, 45-token prompt, {new_tokens} greedy tokens: "
          f"{llama_cpp_text(rates, same, new_tokens)} (targets >= 1)")


def against_llama_cpp(write_gguf_file, make_ours, prompt, new_tokens, repeats):
    """({name: median tokens/s}, how many tokens float32's and llama.cpp f32's have the same): greedy
    decoding at batch 1 of llama.cpp on the GGUF files write_gguf_file(path, gguf_type) writes (f32,
    q8_0) against make_ours()'s {"float32": model, "int8": model} of the same weights, made after
    the files (preparing a model for decoding changes it in place); the four take turns."""
    from test_gguf import llama_greedy, load_llama
    with tempfile.TemporaryDirectory() as tmp:
        decoders = {}
        for gguf_type in ("f32", "q8_0"):
            path = os.path.join(tmp, f"{gguf_type}.gguf")
            write_gguf_file(path, gguf_type)
            llm = load_llama(path, n_ctx=len(prompt) + new_tokens)
            decoders[f"llama.cpp {gguf_type}"] = lambda llm=llm: llama_greedy(llm, prompt, new_tokens, eos_id=None)
        for name, m in make_ours().items():
            decoders[name] = lambda m=m: generate(m, [prompt], new_tokens, stop_ids=())[0]
        rates, tokens = decoding_rates(decoders, new_tokens, repeats)
    return rates, sum(a == b for a, b in zip(tokens["float32"], tokens["llama.cpp f32"]))


def llama_cpp_text(rates, same, new_tokens):
    """against_llama_cpp's figures in a line."""
    return (f"float32 {rates['float32']:.1f} vs llama.cpp f32 {rates['llama.cpp f32']:.1f} tokens/s = "
            f"{rates['float32'] / rates['llama.cpp f32']:.2f}x ({same} of {new_tokens} tokens the same); --quantize "
            f"int8 {rates['int8']:.1f} vs llama.cpp q8_0 {rates['llama.cpp q8_0']:.1f} tokens/s = "
            f"{rates['int8'] / rates['llama.cpp q8_0']:.2f}x")


def bench_beams(repeats=3):
    """Beam search with 5 beams against greedy decoding, 16 prompts of 45 tokens batched."""
    model = gpt2_for_decoding()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50257, (45,), generator=g).tolist() for _ in range(16)]
    timed_generate(model, prompts[:1], 8, num_beams=5)  # warm-up
    rates = median_in_turns({"greedy": lambda: timed_generate(model, prompts, 64),
                             "5 beams": lambda: timed_generate(model, prompts, 64, num_beams=5)}, repeats)
    print(f"beam search, 16 prompts of 45 tokens batched, 64 tokens each: 5 beams {rates['5 beams']:.1f} tokens/s "
          f"= {rates['5 beams'] / rates['greedy']:.2f}x greedy ({rates['greedy']:.1f} tokens/s)")


def bench_dpo(steps=8, reference_pairs=160):
    """A DPO optimizer step on 8 pairs against an SFT step on the same 16 sequences (the same
    inputs and targets: the responses and their end-of-text), gpt2 random weights, on `steps`
    batches spread over an epoch of the book's preference data, the two taking turns (medians);
    and the one-time reference pass, timed on every few training pairs and scaled by padded
    tokens to the training and validation pairs."""
    from data import PreferenceDataset, preference_splits
    from dpo import DPO, reference_logprobs
    from data import batch_indices
    from step import count_tokens, make_optimizer, sft_loss, sft_units, train_step

    path = os.path.join(SHARED, "data", "instruction-data-with-preference.json")
    splits = preference_splits(prepare_data(path, mask_instructions=True), 1024)
    model = gpt2_random().train()
    optimizer, dpo = make_optimizer(model, 5e-6, 0.01), DPO(0.1, "sum")
    order = batch_indices(splits.train.lengths, 8, shuffle=True, seed=123, drop_last=True)
    batches = [splits.collate_fn([splits.train[i] for i in order[k]])
               for k in range(0, len(order), len(order) // steps)][:steps + 1]
    seconds = {"dpo": [], "sft": []}
    for i, batch in enumerate(batches):  # the first round warms up
        for name, loss, units, b in (("dpo", dpo.loss, dpo.units, batch), ("sft", sft_loss, sft_units, batch[:2])):
            start = time.perf_counter()
            train_step(model, optimizer, [b], count_tokens([b], "cpu", units=units)[0], batch_loss=loss)
            if i:
                seconds[name].append(time.perf_counter() - start)
    dpo_s, sft_s = (sorted(seconds[name])[len(seconds[name]) // 2] for name in ("dpo", "sft"))
    print(f"dpo, optimizer step on 8 pairs vs SFT on the same 16 sequences, gpt2 random weights (median of {steps}): "
          f"{dpo_s:.2f} vs {sft_s:.2f} s = {dpo_s / sft_s:.2f}x (target <= 1.1x)")

    every = len(splits.train) // reference_pairs
    sample = PreferenceDataset(splits.train.entries[::every])
    start = time.perf_counter()
    reference_logprobs(model, sample, splits.collate_fn, 8, "cpu")
    tokens = lambda d: sum(d.chosen.lengths) + sum(d.rejected.lengths)  # noqa: E731 (unpadded)
    reference_s = (time.perf_counter() - start) * (tokens(splits.train) + tokens(splits.val)) / tokens(sample)
    print(f"dpo, the one-time reference pass over {len(splits.train)} train and {len(splits.val)} validation pairs "
          f"(timed on {len(sample)}): {reference_s:.0f} s = {reference_s / dpo_s:.0f} DPO steps "
          f"({len(order)} in an epoch)")


def bench_choices(batch_size=16, repeats=3):
    """eval.py --choices on the 110 test prompts of the default data with AG News's 4 labels,
    against greedy generation of a label: a one-token label and its end-of-text (2 new
    tokens), and the longest label, Sci/Tech (3 tokens), and its end-of-text (4)."""
    splits = prepare_data(default_data_path())
    prompts = [encode(format_prompt(e, "alpaca")) for e in splits.test_entries]
    labels = [encode(label) for label in ("World", "Sports", "Business", "Sci/Tech")]
    model = gpt2_for_decoding()
    batches = response_batches(prompts, batch_size)  # as eval.py batches them

    def timed(work):
        start = time.perf_counter()
        for rows in batches:
            work([prompts[i] for i in rows])
        return time.perf_counter() - start

    choice_logprobs(model, prompts[:2], labels)  # warm-up
    seconds = median_in_turns({"choices": lambda: timed(lambda batch: choice_logprobs(model, batch, labels)),
                               "greedy 2": lambda: timed(lambda batch: generate(model, batch, 2, stop_ids=())),
                               "greedy 4": lambda: timed(lambda batch: generate(model, batch, 4, stop_ids=()))},
                              repeats)
    print(f"choices, {len(prompts)} test prompts x 4 labels, batches of {batch_size}: {seconds['choices']:.2f} s "
          f"= {seconds['choices'] / seconds['greedy 2']:.2f}x greedy generation of a 1-token label and end-of-text "
          f"({seconds['greedy 2']:.2f} s; target <= 1.5x), {seconds['choices'] / seconds['greedy 4']:.2f}x that of "
          f"a 3-token label and end-of-text ({seconds['greedy 4']:.2f} s)")


def synthetic_alpaca(n, seed=0):
    """n entries of Alpaca's lengths (instructions of about 60 characters, 40% with an input, outputs
    of about 250), of words of GPT-2's vocabulary drawn by a Zipf law over their rank, each text
    with 12 words of a topic of its own; 1% are an earlier entry with one word more in its output."""
    import numpy as np
    from prompts import get_tokenizer

    rng = np.random.default_rng(seed)
    tokenizer = get_tokenizer()
    words = [tokenizer.decode([t]) for t in range(tokenizer.n_vocab - 1)]
    words = np.array([w.strip() for w in words if w.startswith(" ") and w[1:].isalpha()])
    zipf = 1 / np.arange(1, len(words) + 1)

    def texts(lo, hi):
        lengths = rng.integers(lo, hi, n)
        common = rng.choice(len(words), lengths.sum(), p=zipf / zipf.sum())
        topics = rng.integers(500, len(words), (n, 12))
        topical = topics[np.repeat(np.arange(n), lengths), rng.integers(12, size=lengths.sum())]
        drawn = words[np.where(rng.random(lengths.sum()) < 0.3, topical, common)]
        return [" ".join(w).capitalize() + "." for w in np.split(drawn, np.cumsum(lengths)[:-1])]

    entries = [{"instruction": i, "input": x if rng.random() < 0.4 else "", "output": o}
               for i, x, o in zip(texts(4, 16), texts(3, 22), texts(8, 75))]
    for k in rng.choice(np.arange(1, n), n // 100, replace=False):
        original = entries[rng.integers(k)]
        entries[k] = {**original, "output": original["output"] + " " + words[rng.integers(100)]}
    return entries


def bench_dedup(n=52002):
    """datatools.py dedup (instruction, input and output pairs, duplicate entries, leaks between the
    splits) on n synthetic entries of Alpaca's lengths, as a user runs it: its time and peak memory."""
    import json
    import resource
    import subprocess

    entries = synthetic_alpaca(n)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "synthetic.json")
        with open(path, "w") as f:
            json.dump(entries, f)
        # datatools.py run as a user runs it, then its own VmHWM (ru_maxrss carries the parent's peak over fork)
        code = ("import os, re, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
                "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
                "    print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), "
                "file=sys.stderr)")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "datatools.py"), "dedup", path,
                               "--show", "0"], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kib = int(done.stderr.split()[-1])
    found = re.search(r"in every field \(instruction, input, output\): (\d+)", done.stdout).group(1)
    leaks = re.search(r"test-set leaks \(entries with a near-duplicate in train\): (.*)", done.stdout).group(1)
    chars = sum(len(e[k]) for e in entries for k in e) / n
    print(f"dedup, {n:,} synthetic entries of {chars:.0f} characters on average: {seconds:.1f} s "
          f"({usage.ru_utime + usage.ru_stime:.1f} s of CPU), peak memory {peak_kib / 1024:.0f} MiB "
          f"(target < 60 s on 2 cores); {found} near-duplicate entries ({n // 100} planted), leaks: {leaks}")


FAMILY_BATCH = (4, 256)  # sequences x tokens of a training step in bench_families


def qwen3_random(context_length=512):
    """A Qwen3-0.6B-shaped model with random weights (ours), float32."""
    torch.manual_seed(0)
    return GPT(config_for("qwen3-0.6b", context_length=context_length)).eval()


def transformers_twin(model):
    """transformers' model of the same architecture with the same weights (hf.py's names and layouts)."""
    import transformers
    from hf import config_json, hf_state_dict
    transformers.logging.set_verbosity_error()
    config = config_json(model.config, "float32")
    twin = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    missing, unexpected = twin.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return twin.eval()


def family_variant(variant):
    """One side of bench_families' training step, in a process of its own so that its peak
    resident memory is its own: a Qwen3-0.6B-shaped model with random weights, an optimizer
    step (forward, backward, fused AdamW) on the same random batch for every line read, its
    seconds printed; at the end of the input, its peak memory as JSON. variant: ours,
    ours-bfloat16 (train.py --dtype bfloat16: autocast), ours-lora (rank 16 on q, k, v, o, gate,
    up, down), transformers, peft (transformers with PEFT's LoRA of the same rank and targets)."""
    import json
    import resource

    from lora import add_lora
    from step import autocast_for, make_optimizer

    model = qwen3_random(FAMILY_BATCH[1])
    batch = torch.randint(0, model.config.vocab_size, (FAMILY_BATCH[0], FAMILY_BATCH[1] + 1),
                          generator=torch.Generator().manual_seed(1))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    autocast = autocast_for(torch.device("cpu"), "bfloat16" if variant == "ours-bfloat16" else "float32")
    if variant in ("transformers", "peft"):
        model = transformers_twin(model)
        if variant == "peft":
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

        def loss():
            logits = model(input_ids=inputs).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    else:
        if variant == "ours-lora":
            add_lora(model, rank=16, alpha=32, targets="q,k,v,o,gate,up,down")

        def loss():
            with autocast():
                return model(inputs, targets)
    model.train()
    optimizer = make_optimizer(model, 1e-5, 0.1)
    for _ in sys.stdin:
        start = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(time.perf_counter() - start, flush=True)
    print(json.dumps({"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}), flush=True)


def family_steps(variants, steps):
    """{variant: (median step seconds, peak GiB)}, each variant's process in turn (one at a time:
    two full fine-tunings of 0.6B parameters at once would not fit in 24 GiB)."""
    import json
    import statistics
    import subprocess
    results = {}
    for variant in variants:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--family-variant", variant],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate("\n" * (steps + 1))  # the first step warms up
        lines = out.splitlines()
        if proc.returncode or len(lines) != steps + 2:
            sys.exit(f"bench_families: the {variant} process failed (see above)")
        results[variant] = (statistics.median(map(float, lines[1:-1])), json.loads(lines[-1])["peak_gib"])
    return results


def family_decoding(new_tokens, repeats):
    """bench_families' greedy decoding at batch 1: ours (float32, int8) against transformers."""
    model = qwen3_random()
    twin = transformers_twin(model)
    prompt = torch.randint(0, model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = {"float32": prepare_for_decoding(model), "int8": prepare_for_decoding(qwen3_random(), "int8")}

    def hf_greedy():
        with torch.no_grad():
            out = twin.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    decoders = {name: (lambda m=m: generate(m, [prompt], new_tokens, stop_ids=())[0]) for name, m in ours.items()}
    rates, tokens = decoding_rates({**decoders, "transformers": hf_greedy}, new_tokens, repeats)
    same = sum(a == b for a, b in zip(tokens["float32"], tokens["transformers"]))
    print(f"families, qwen3-0.6b greedy decoding at batch 1 ({new_tokens} tokens): float32 {rates['float32']:.1f} vs "
          f"transformers {rates['transformers']:.1f} tokens/s = {rates['float32'] / rates['transformers']:.2f}x "
          f"(target >= 1.2; {same} of {new_tokens} tokens the same); --quantize int8 {rates['int8']:.1f} tokens/s "
          f"= {rates['int8'] / rates['transformers']:.2f}x")


def bench_families(steps=2, new_tokens=32, repeats=3):
    """A Qwen3-0.6B-shaped model with random weights built from its config (no download): an
    optimizer step on a batch of 4 x 256 tokens, ours against transformers (full) and against
    PEFT (LoRA rank 16 on all seven linears), and ours in bfloat16 (autocast) against float32;
    greedy decoding at batch 1 (a 45-token prompt, its prefill included), float32 and int8,
    against transformers' generate on the same weights; loading the model from a bfloat16
    Hugging Face folder: time and peak memory against the weights' size."""
    if importlib.util.find_spec("transformers") is None:
        print("families: skipped, it needs transformers (pip install transformers)")
        return
    variants = ["ours", "transformers", "ours-bfloat16", "ours-lora"]
    variants += ["peft"] if importlib.util.find_spec("peft") else []
    step = family_steps(variants, steps)
    shape = f"{FAMILY_BATCH[0]} x {FAMILY_BATCH[1]} tokens, median of {steps} steps after a warm-up"
    print(f"families, qwen3-0.6b training step ({shape}): ours {step['ours'][0]:.1f} s vs transformers "
          f"{step['transformers'][0]:.1f} s = {step['ours'][0] / step['transformers'][0]:.2f}x the time (target <= 1); "
          f"peak memory {step['ours'][1]:.1f} vs {step['transformers'][1]:.1f} GiB")
    lora = f"LoRA rank 16: ours {step['ours-lora'][0]:.1f} s, peak {step['ours-lora'][1]:.1f} GiB"
    if "peft" in step:
        lora += (f" vs PEFT {step['peft'][0]:.1f} s = {step['ours-lora'][0] / step['peft'][0]:.2f}x the time "
                 f"(target <= 1), peak {step['peft'][1]:.1f} GiB")
    print(f"families, {lora}" + ("" if "peft" in step else " (PEFT not installed: pip install peft)"))
    print(f"families, --dtype bfloat16 step {step['ours-bfloat16'][0]:.1f} s vs float32 {step['ours'][0]:.1f} s "
          f"= {step['ours'][0] / step['ours-bfloat16'][0]:.2f}x the speed on this CPU")

    family_decoding(new_tokens, repeats)
    family_llama_cpp(new_tokens, repeats)
    family_loading()


def family_loading():
    """bench_families' loading of a bfloat16 Qwen3-0.6B folder, in a process of its own: seconds, and
    the peak resident memory over what the process held before."""
    import json
    import subprocess

    from hf import config_json, hf_state_dict
    from safetensors.torch import save_file

    model = qwen3_random()
    with tempfile.TemporaryDirectory() as folder:
        weights = {k: v.to(torch.bfloat16) for k, v in hf_state_dict(model).items()}
        size = sum(t.nbytes for t in weights.values())
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        del weights, model
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config_json(qwen3_random(8).config, "bfloat16"), f)
        # VmHWM, not ru_maxrss: Linux's ru_maxrss carries the parent's peak over fork and exec
        code = ("import json, re, sys, time; sys.path.insert(0, sys.argv[2]); import torch, hf\n"
                "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
                "before = hwm()\n"
                "start = time.perf_counter(); model = hf.from_pretrained(sys.argv[1]); "
                "seconds = time.perf_counter() - start\n"
                "dtypes = sorted({str(p.dtype) for p in model.parameters()})\n"
                "print(json.dumps([seconds, (hwm() - before) * 1024, "
                "dtypes]))")
        seconds, peak, dtypes = json.loads(subprocess.run([sys.executable, "-c", code, folder, ROOT], check=True,
                                                          capture_output=True, text=True).stdout)
    print(f"families, loading a bfloat16 qwen3-0.6b folder ({size / 2**30:.2f} GiB of weights): {seconds:.1f} s, "
          f"loaded as {', '.join(dtypes)}; peak memory over torch's own "
          f"{peak / 2**30:.2f} GiB = {peak / size:.2f}x the weights (target <= 1.2)")


def family_llama_cpp(new_tokens=32, repeats=3):
    """bench_families against llama.cpp, where llama-cpp-python is installed: the Qwen3-0.6B-shaped
    random weights as GGUF files from export.py (f32, q8_0, with Qwen2's real vocabulary from
    ../shared/vocab as the tokenizer) against generate() on the same weights (float32, --quantize
    int8), batch 1, a 45-token prompt, its prefill included, the four taking turns."""
    import json

    from export import write_family_gguf
    from prompts import load_tokenizer
    from test_tokenizers import gguf_tokenizer_json
    import pytest

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        print("families, llama.cpp comparison skipped: it needs llama-cpp-python and gguf")
        return
    model = qwen3_random()
    prompt = torch.randint(0, model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spec = gguf_tokenizer_json("qwen2", family="qwen3")
        except pytest.skip.Exception as e:
            print(f"families, llama.cpp comparison skipped: {e}")
            return
        with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
            f.write(spec)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"model_type": "qwen3", "eos_token_id": 151645}, f)
        tokenizer = load_tokenizer(tmp)
    rates, same = against_llama_cpp(
        lambda path, gguf_type: write_family_gguf(model, "alpaca", tokenizer, path, gguf_type, "qwen3-random"),
        lambda: {"float32": prepare_for_decoding(model), "int8": prepare_for_decoding(qwen3_random(), "int8")},
        prompt, new_tokens, repeats)
    print(f"families, qwen3-0.6b against llama.cpp, batch 1, {new_tokens} greedy tokens: "
          f"{llama_cpp_text(rates, same, new_tokens)} (goal for int8 >= 1)")


BENCHES = {"generation": bench_generation, "eval": bench_eval, "training": bench_training, "judge": bench_judge,
           "lora": bench_lora, "int8": bench_int8, "llama": bench_llama, "beams": bench_beams, "dpo": bench_dpo,
           "serve": bench_serve, "hostile": bench_hostile, "choices": bench_choices, "dedup": bench_dedup, "families": bench_families}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(BENCHES), action="append", help="run only these (repeatable)")
    p.add_argument("--lora-variant", choices=["full", "lora"], help=argparse.SUPPRESS)  # bench_lora's processes
    p.add_argument("--family-variant", help=argparse.SUPPRESS)  # bench_families' processes
    args = p.parse_args()
    if args.lora_variant:
        return lora_variant(args.lora_variant)
    if args.family_variant:
        return family_variant(args.family_variant)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    for name in args.only or BENCHES:
        BENCHES[name]()


if __name__ == "__main__":
    main()
