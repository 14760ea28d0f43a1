"""Generate responses with a KV cache, many prompts at once.

    python generate.py --ckpt out/ckpt.pt --prompt "Name three primary colors."
    python generate.py --ckpt out/ckpt.pt --interactive [--system "Answer briefly."]   # a chat
    python generate.py --model gpt2 --prompt-style alpaca --prompt "..." --temperature 0.7 --top-k 50
    python generate.py --model qwen3-0.6b --interactive   # a chat model, in its own chat template

Each model speaks through its own tokenizer (GPT-2's, or a model folder's tokenizer.json) and
stops at its end tokens (GPT-2's <|endoftext|>; <|im_end|>, <|eot_id|>, ... for the Llama family).
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import itertools
import signal
import sys

from checkpoint import add_model_args, load_for_inference
from common import plural, resolve_device, run_main, stop_on_interrupt
from decoding import TextStream, add_decoding_args, decoding_settings, generate, hit_limit, stream
from prompts import GPT2, encode_conversation, prompt_ids


def emptiness(ids):
    """Why a response that is empty once stripped is so."""
    return "only whitespace" if ids else "the model ended it at once"


def headline(instruction, width=60):
    """The instruction on one line, cut to width characters: what marks its answer."""
    line = " ".join(instruction.split())
    return line if len(line) <= width else line[:width - 3] + "..."


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--prompt", action="append", default=[], help="an instruction; repeat for a batch (each answer "
                   "then follows a line '==> i/n: instruction <==')")
    p.add_argument("--input", default="", help="optional input that goes with each instruction (--interactive too)")
    p.add_argument("--interactive", action="store_true", help="a chat: keeps the conversation, streams each reply")
    p.add_argument("--system", help="--interactive: a system message that starts the conversation")
    args = p.parse_args()
    if not args.prompt and not args.interactive:
        p.error("give --prompt TEXT (repeatable) or --interactive")
    if args.system is not None and not args.interactive:
        p.error("--system goes with --interactive")
    go_on = "start generate.py --interactive again to go on" if args.interactive else "run the command again"
    with stop_on_interrupt(f"the answers printed above are complete, nothing else was kept; {go_on}"):
        answer_all(args)


def answer_all(args):
    """Print the answers to the --prompt instructions, then those of the interactive loop."""
    device = resolve_device(args.device)
    sampling = decoding_settings(args)
    model, _, style, tokenizer = load_for_inference(args.ckpt, args.model, args.prompt_style, device, args.quantize,
                                                    args.base)
    sampling["stop_ids"] = tokenizer.stop_ids

    def answer(instructions, seed):
        """Print the response to each instruction (marked when there are several), with a note on
        stderr when it is empty or was cut."""
        prompts = [prompt_ids({"instruction": text, "input": args.input}, style, tokenizer) for text in instructions]
        results = generate(model, prompts, args.max_new_tokens, **{**sampling, "seed": seed})
        for i, (instruction, prompt, ids) in enumerate(zip(instructions, prompts, results)):
            text = tokenizer.decode(ids).strip()
            if len(instructions) > 1:
                print(("\n" if i else "") + f"==> {i + 1}/{len(instructions)}: {headline(instruction)} <==")
            print(text, flush=True)
            if hit_limit(prompt, ids, args.max_new_tokens, model.config.context_length):
                print(f"(cut at {len(ids)} tokens: --max-new-tokens {args.max_new_tokens} or the end of the "
                      f"context of {model.config.context_length})", file=sys.stderr)
            elif not text:
                print(f"(empty response: {emptiness(ids)})", file=sys.stderr)

    if args.prompt:
        answer(args.prompt, args.seed)
    if args.interactive:
        chat(model, style, tokenizer, args, sampling)


# ----------------------------------------------------------------------------- the interactive chat


def fit_context(messages, style, context_length, reserve, tokenizer=GPT2):
    """(messages, prompt ids, exchanges dropped): the conversation and the prompt of its next
    assistant turn, its oldest exchanges dropped (a system message stays) until the prompt
    leaves `reserve` tokens of the context for the reply. The last user turn alone may leave
    less (its reply is cut short); a ValueError when it does not fit at all."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns, dropped = messages[len(system):], 0
    while True:
        ids = encode_conversation(system + turns, style, tokenizer)[0]
        if len(ids) + reserve <= context_length or len(turns) == 1:
            break
        turns, dropped = turns[2:], dropped + 1  # a user turn and the assistant's reply
    if len(ids) > context_length:
        raise ValueError(f"this message makes a prompt of {len(ids)} tokens, more than the context of "
                         f"{context_length}; write a shorter one")
    return system + turns, ids, dropped


def stream_reply(model, prompt, max_new_tokens, sampling, tokenizer=GPT2):
    """Print the reply to `prompt` as it is made (a token at a time, a character split across
    tokens once it is whole; beam search, which has no order of tokens until it ends, prints it
    whole). Ctrl-C stops the reply and keeps what was made. Returns (reply ids, whether Ctrl-C
    stopped it)."""
    stopped, ids, text, shown = [], [], "", ""
    pieces = TextStream(tokenizer)

    def show(new):
        nonlocal text, shown
        text += new
        visible = text.lstrip()
        print(visible[len(shown):], end="", flush=True)
        shown = visible

    previous = signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(True))
    try:
        if sampling["num_beams"] > 1:
            steps = ({0: token} for token in generate(model, [prompt], max_new_tokens, **sampling)[0])
        else:
            steps = stream(model, [prompt], max_new_tokens, sampling["temperature"], sampling["top_k"],
                           sampling["top_p"], sampling["stop_ids"], seed=sampling["seed"])
        for new in steps:
            ids.append(new[0])
            show(pieces.add(new[0]))
            if stopped:
                break
        show(pieces.finish())
    finally:
        signal.signal(signal.SIGINT, previous)
    print(flush=True)
    return ids, bool(stopped)


def chat(model, style, tokenizer, args, sampling):
    """The interactive chat: each line is a user turn, the reply streams as it is made, and the
    conversation is kept (its oldest exchanges dropped, with a note, when the context fills).
    /reset starts over; Ctrl-C stops a reply and the chat goes on; a reply that is empty once
    stripped is said so and left out, with its message; an empty line or Ctrl-D quits."""
    ctx = model.config.context_length
    reserve = min(args.max_new_tokens, ctx // 2)  # room kept for a reply
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    with_input = "; each message gets --input as its input" if args.input else ""
    print(f"chat in prompt style {style}{with_input}; /reset starts over, Ctrl-C stops a reply, "
          "an empty line or Ctrl-D quits", file=sys.stderr)
    for turn in itertools.count():
        try:
            line = input("> ").strip()
        except EOFError:  # Ctrl-D: end the "> " line, so that the shell's prompt starts a line of its own
            print()
            break
        if not line:
            break
        if line == "/reset":
            messages = list(start)
            print("(a new conversation)", file=sys.stderr)
            continue
        user = {"role": "user", "content": line, **({"input": args.input} if args.input else {})}
        try:
            messages, prompt, dropped = fit_context(messages + [user], style, ctx, reserve, tokenizer)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"({plural(dropped, 'earlier exchange')} dropped from the conversation to fit the context of "
                  f"{ctx} tokens)", file=sys.stderr)
        # the n-th message samples with seed + n: asked again, it gets another sample
        ids, stopped = stream_reply(model, prompt, args.max_new_tokens, {**sampling, "seed": args.seed + turn},
                                    tokenizer)
        if stopped:
            print("(reply stopped)", file=sys.stderr)
        elif hit_limit(prompt, ids, args.max_new_tokens, ctx):
            print(f"(cut at {len(ids)} tokens: --max-new-tokens {args.max_new_tokens} or the end of the "
                  f"context of {ctx})", file=sys.stderr)
        reply = tokenizer.decode(ids).strip()
        if not reply:  # kept, an empty turn would stand in the prompt of every later reply
            why = "stopped before any text" if stopped else emptiness(ids)
            print(f"(empty reply: {why}; this exchange is left out of the conversation)", file=sys.stderr)
            messages = messages[:-1]
            continue
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    run_main(main)
