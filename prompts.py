"""The text side of the model: the tokenizer (GPT-2's BPE through tiktoken), its end-of-text
token, the prompt styles, and the one renderer that turns a conversation (or an Alpaca entry,
a one-exchange conversation) into text and tokens for training, generation, evaluation, serving
and the exported chat templates.

Follows "Fine-tuning to follow instructions" (Raschka, LLMs from scratch, ch07): an entry is
formatted as a prompt in the Alpaca style (format_input, format_prompt) and tokenized with
GPT-2's encoding, the prompt and the response apart.
"""
import functools

import tiktoken
import torch

EOT_ID = 50256  # GPT-2 <|endoftext|>, also used as the pad token
EOT = "<|endoftext|>"

# ----------------------------------------------------------------------------
# Tokenizer

@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE encoding (loaded once; tiktoken downloads its two files the first time)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' and urllib3's errors, a bad cached file: tiktoken does not wrap them
        raise OSError(f"could not load GPT-2's tokenizer files ({type(e).__name__}); tiktoken downloads them once, "
                      "so check the network, or for offline use set TIKTOKEN_CACHE_DIR to a folder that holds "
                      "them") from None


def encode(text: str) -> list[int]:
    """Token ids of `text` as ordinary text.

    A literal "<|endoftext|>" typed by a user is encoded as the characters it is made
    of, never as the special token, so it round-trips and cannot end a sequence early.
    """
    return get_tokenizer().encode(text, disallowed_special=())


def decode(ids) -> str:
    """Text of a list (or tensor) of token ids."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return get_tokenizer().decode(list(ids))


def check_vocab(vocab_size: int, what: str) -> None:
    """ValueError unless a model of vocab_size tokens can take GPT-2's tokenizer's ids."""
    if vocab_size <= EOT_ID:
        raise ValueError(f"{what} has a vocabulary of {vocab_size} tokens; GPT-2's tokenizer needs {EOT_ID + 1}")


# ----------------------------------------------------------------------------
# Prompt styles
#
# A style is three templates: the instruction, the input (used only when the entry
# has a non-empty input) and the response header. A new style is one more entry.
# Conversations use two more, optional ones: "system", the first user turn after a
# system message, and "turn", a later user turn (it follows the <|endoftext|> that
# ends the assistant's turn before it). get_prompt_style fills in what a style lacks.

PROMPT_STYLES = {
    "alpaca": {
        "instruction": (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            "\n\n### Instruction:\n{instruction}"
        ),
        "input": "\n\n### Input:\n{input}",
        "response": "\n\n### Response:\n",
        # a system message takes the place of the preamble, which is Alpaca's system prompt
        "system": "{system}\n\n### Instruction:\n{instruction}",
        "turn": "\n\n### Instruction:\n{instruction}",
    },
    "phi3": {
        "instruction": "<|user|>\n{instruction}",
        "input": "\n{input}",
        "response": "\n<|assistant|>:\n",
        "system": "<|system|>\n{system}\n<|user|>\n{instruction}",
        "turn": "\n<|user|>\n{instruction}",
    },
    # no template: the text as it is, continued (checkpoints trained on raw text use this)
    "none": {
        "instruction": "{instruction}",
        "input": "\n{input}",
        "response": "",
        "system": "{system}\n{instruction}",
        "turn": "\n{instruction}",
    },
}


def get_prompt_style(style: str) -> dict:
    """The templates of a style; ValueError listing the known styles otherwise. A style without
    the conversation templates gets a system message and later turns in its instruction template."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known styles: {', '.join(PROMPT_STYLES)}")
    templates = PROMPT_STYLES[style]
    return {"system": "{system}\n\n" + templates["instruction"], "turn": "\n\n" + templates["instruction"],
            **templates}


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The instruction (and input, if any) part of a prompt, without the response header."""
    templates = get_prompt_style(style)
    text = templates["instruction"].format(instruction=entry["instruction"])
    if entry.get("input"):
        text += templates["input"].format(input=entry["input"])
    return text


def format_prompt(entry: dict, style: str = "alpaca") -> str:
    """Everything up to and including the response header: what generation feeds the model."""
    return format_input(entry, style) + get_prompt_style(style)["response"]


# ----------------------------------------------------------------------------
# Conversations: one renderer for training, generation, evaluation and export
#
# A conversation is a list of messages {"role": "system" | "user" | "assistant", "content"}:
# an optional system message, then user and assistant turns in alternation. An Alpaca
# entry is the conversation [user (its instruction, with its input), assistant (its output)].

ROLES = ("system", "user", "assistant")


def entry_messages(entry: dict) -> list[dict]:
    """The conversation of an entry: its "messages", or an Alpaca entry as one exchange (the
    user message carries the entry's input, which the style puts in its input block)."""
    if "messages" in entry:
        return entry["messages"]
    messages = [{"role": "user", "content": entry["instruction"], "input": entry.get("input", "")}]
    if "output" in entry:
        messages.append({"role": "assistant", "content": entry["output"]})
    return messages


def entry_output(entry: dict) -> str:
    """The reference response of an entry: its output, or a conversation's last assistant turn."""
    return entry_messages(entry)[-1]["content"] if "messages" in entry else entry["output"]


def render_turns(messages: list[dict], style: str = "alpaca") -> list[tuple[str, bool]]:
    """A conversation's text as (text, is_assistant) pieces: each user turn in the style's
    templates, followed by the response header, then each assistant turn's content. An
    <|endoftext|> ends every assistant turn (render_text and encode_conversation add it)."""
    templates = get_prompt_style(style)
    system, pieces = None, []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system = content
        elif role == "assistant":
            pieces.append((content, True))
        else:
            if pieces:
                text = templates["turn"].format(instruction=content)
            elif system is not None:
                text = templates["system"].format(system=system, instruction=content)
            else:
                text = templates["instruction"].format(instruction=content)
            if message.get("input"):
                text += templates["input"].format(input=message["input"])
            pieces.append((text + templates["response"], False))
    return pieces


def render_text(messages: list[dict], style: str = "alpaca") -> str:
    """A conversation as one text, each assistant turn followed by <|endoftext|>: the training
    text, and what the exported chat template gives for the same messages."""
    return "".join(text + EOT * is_assistant for text, is_assistant in render_turns(messages, style))


def encode_conversation(messages: list[dict], style: str = "alpaca") -> tuple[list[int], list[bool]]:
    """(ids, learned): the tokens of a conversation and, for each, whether it belongs to an
    assistant turn (its <|endoftext|> included): what --mask-instructions keeps in the loss.
    Each piece of render_turns is tokenized on its own, so an Alpaca entry gives exactly the
    chapter's prompt tokens followed by its response tokens. Every assistant turn but a last
    one gets its <|endoftext|> here; collate appends the last one. A conversation that ends
    with a user turn gives the prompt to generate the next assistant turn from."""
    pieces = render_turns(messages, style)
    ids, learned = [], []
    for k, (text, is_assistant) in enumerate(pieces):
        tokens = encode(text) + [EOT_ID] * (is_assistant and k < len(pieces) - 1)
        ids += tokens
        learned += [is_assistant] * len(tokens)
    return ids, learned


def prompt_ids(entry: dict, style: str = "alpaca") -> list[int]:
    """What generation feeds the model for an entry: everything before its last assistant turn
    (for an Alpaca entry, the tokens of format_prompt)."""
    messages = entry_messages(entry)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return encode_conversation(messages, style)[0]
