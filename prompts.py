"""The text side of the model: the tokenizers (GPT-2's BPE through tiktoken, and a Hugging Face
model folder's tokenizer.json through the `tokenizers` library), the prompt styles, a chat model's
own chat template, and the one renderer that turns a conversation (or an Alpaca entry, a
one-exchange conversation) into text and tokens for training, generation, evaluation, serving and
the exported chat templates.

Follows "Fine-tuning to follow instructions" (Raschka, LLMs from scratch, ch07): an entry is
formatted as a prompt in the Alpaca style (format_input, format_prompt) and tokenized with
GPT-2's encoding, the prompt and the response apart. The style "chat-template" renders a
conversation as transformers' apply_chat_template does with the model's own template, token for
token, except that the text of a message is always text: a special token typed into a message is
encoded as the characters it is made of, never as the token.
"""
import contextlib
import datetime
import functools
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox
import tiktoken
import tokenizers
import torch

EOT_ID = 50256  # GPT-2 <|endoftext|>, also used as the pad token
EOT = "<|endoftext|>"

# ----------------------------------------------------------------------------
# Tokenizers
#
# A tokenizer object (GPT2Tokenizer or HFTokenizer) has: name; encode(text), where text is
# always ordinary text (a typed "<|im_end|>" is the characters it is made of); decode(ids);
# eot and eot_id, its end-of-text token (it ends each assistant turn in the prompt styles);
# stop_ids, the tokens generation stops at; pad_id; bos_ids, what it puts before a text (Llama
# 3's <|begin_of_text|>); vocab_size; chat_template (None without one); special_tokens, the
# named tokens a chat template sees (bos_token, eos_token, ...); and state(), the small
# serialisable dict a checkpoint keeps so that tokenizer_from_state rebuilds it anywhere.

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


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken: the chapter's ids (encode and decode above), no chat template."""
    name, eot, eot_id, pad_id, stop_ids, bos_ids = "GPT-2", EOT, EOT_ID, EOT_ID, (EOT_ID,), ()
    vocab_size, chat_template, special_tokens = EOT_ID + 1, None, {}
    encode, decode = staticmethod(encode), staticmethod(decode)

    def state(self) -> dict:
        return {"kind": "gpt2"}


GPT2 = GPT2Tokenizer()  # the tokenizer wherever none is given

END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")  # Qwen, SmolLM2; Llama 3
END_OF_TURN = ("<|im_end|>", "<|eot_id|>")  # ChatML (Qwen, SmolLM2); Llama 3
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library, with the folder's chat
    template, its named special tokens and the end ids of its generation_config.json."""

    def __init__(self, tokenizer_json: str, chat_template=None, special_tokens=None, eos_token_ids=(),
                 name="tokenizer.json"):
        self.name, self.json, self.chat_template = name, tokenizer_json, chat_template
        self.special_tokens, self.eos_token_ids = dict(special_tokens or {}), [int(i) for i in eos_token_ids]
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library's own error: a message, no type worth naming
            raise ValueError(f"could not read the tokenizer of {name} ({e})") from None
        if chat_template is not None:
            compile_chat_template(chat_template, name)  # a broken template fails here, not at the first prompt
        # the same model without the added tokens, for ordinary text: no added token is ever matched in it
        self.plain = tokenizers.Tokenizer(self.tokenizer.model)
        self.plain.normalizer, self.plain.pre_tokenizer = self.tokenizer.normalizer, self.tokenizer.pre_tokenizer
        self.added = {token.content: i for i, token in self.tokenizer.get_added_tokens_decoder().items()}
        self.added_ids = frozenset(self.added.values())
        # the model's ids are 0..n-1, the added tokens' may go past them
        self.vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=False),
                              max(self.added_ids, default=-1) + 1)
        token_id = self.token_id
        self.eot = next((t for t in END_OF_TEXT if token_id(t) is not None), self.special_tokens.get("eos_token"))
        if token_id(self.eot) is None:
            raise ValueError(f"the tokenizer of {name} has no end-of-text token (no {' or '.join(END_OF_TEXT)}, "
                             f"no eos_token in tokenizer_config.json)")
        self.eot_id = token_id(self.eot)
        pad_id = token_id(self.special_tokens.get("pad_token"))
        self.pad_id = self.eot_id if pad_id is None else pad_id
        named = (token_id(t) for t in (*END_OF_TEXT, *END_OF_TURN, self.special_tokens.get("eos_token")))
        self.stop_ids = tuple(sorted({*self.eos_token_ids, *(i for i in named if i is not None)}))
        with_specials, plain = self.tokenizer.encode("a").ids, self.plain.encode("a").ids
        self.bos_ids = tuple(with_specials[:with_specials.index(plain[0])])

    def token_id(self, token):
        """The id of a token (its text, as "<|im_end|>"), None if there is no such token."""
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as ordinary text: a typed special token is the characters it is made of."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def added_tokens(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each added token (<|im_end|>, ...) in text, as tokenizers matches them."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return [(start, end, i) for i, (start, end) in zip(encoding.ids, encoding.offsets) if i in self.added_ids]

    def decode(self, ids) -> str:
        """Text of a list (or tensor) of token ids, special tokens included."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def state(self) -> dict:
        return {"kind": "tokenizer.json", "name": self.name, "tokenizer_json": self.json,
                "chat_template": self.chat_template, "special_tokens": self.special_tokens,
                "eos_token_ids": self.eos_token_ids}


def read_json(path: str) -> dict:
    """The JSON object in path, {} if there is no such file; ValueError naming the file if it is not one."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"could not read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object")
    return value


def load_tokenizer(folder: str):
    """The tokenizer of a Hugging Face model folder: GPT-2's through tiktoken for a GPT-2 model (the same
    ids), otherwise its tokenizer.json, with the chat template of chat_template.jinja (else
    tokenizer_config.json's), the named special tokens of tokenizer_config.json (else
    special_tokens_map.json) and the end ids of generation_config.json (else config.json)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder")
    config = read_json(os.path.join(folder, "config.json"))
    if config.get("model_type") == "gpt2":
        return GPT2
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no tokenizer.json, the Hugging Face tokenizer file a model folder needs "
                         "beside its weights")
    tokenizer_config = read_json(os.path.join(folder, "tokenizer_config.json"))
    special_map = read_json(os.path.join(folder, "special_tokens_map.json"))
    special_tokens = {}
    for key in SPECIAL_NAMES:
        value = tokenizer_config.get(key, special_map.get(key))
        value = value.get("content") if isinstance(value, dict) else value  # an AddedToken written out
        if isinstance(value, str):
            special_tokens[key] = value
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers' default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if os.path.isfile(os.path.join(folder, "chat_template.jinja")):  # this file wins, as in transformers
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    generation = read_json(os.path.join(folder, "generation_config.json"))
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return HFTokenizer(text, template if isinstance(template, str) else None, special_tokens, eos, name=folder)


def tokenizer_from_state(state):
    """The tokenizer a checkpoint keeps (HFTokenizer.state); GPT-2's for None, a checkpoint from before
    tokenizers travelled with it."""
    if state is None or state == {"kind": "gpt2"}:
        return GPT2
    try:
        if state["kind"] != "tokenizer.json":
            raise KeyError("kind")
        return HFTokenizer(state["tokenizer_json"], state["chat_template"], state["special_tokens"],
                           state["eos_token_ids"], state["name"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"the checkpoint's tokenizer is damaged (its {e} is missing or wrong)") from None


def check_vocab(vocab_size: int, what: str, tokenizer=GPT2) -> None:
    """ValueError unless a model of vocab_size tokens can take the tokenizer's ids."""
    if vocab_size < tokenizer.vocab_size:
        needs = "GPT-2's tokenizer" if isinstance(tokenizer, GPT2Tokenizer) else f"the tokenizer of {tokenizer.name}"
        raise ValueError(f"{what} has a vocabulary of {vocab_size} tokens; {needs} needs {tokenizer.vocab_size}")


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


CHAT_TEMPLATE = "chat-template"  # the style of a chat model's own template (see Chat templates below)
STYLE_NAMES = (*PROMPT_STYLES, CHAT_TEMPLATE)


def default_prompt_style(tokenizer=GPT2) -> str:
    """The style of a model when none is given: its own chat template if its tokenizer has one
    (Qwen3, Llama 3.2, SmolLM2, Qwen2.5), else the chapter's alpaca (GPT-2)."""
    return CHAT_TEMPLATE if tokenizer.chat_template is not None else "alpaca"


def get_prompt_style(style: str) -> dict:
    """The templates of a style; ValueError listing the known styles otherwise. A style without
    the conversation templates gets a system message and later turns in its instruction template."""
    if style == CHAT_TEMPLATE:
        raise ValueError(f"prompt style {CHAT_TEMPLATE} is the model's own chat template, not text templates: "
                         "render it with render_text, encode_conversation or prompt_ids and the model's tokenizer")
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known styles: {', '.join(STYLE_NAMES)}")
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
# Chat templates: a chat model's own format, as transformers renders it
#
# A template is Jinja, compiled as transformers' apply_chat_template compiles it (a sandbox,
# trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now)
# and given what it gives: messages, tools and documents (None here), add_generation_prompt
# and the named special tokens (bos_token, eos_token, ...).
#
# Two settings are ours. enable_thinking=False: Qwen3's template writes an empty think block
# "<think>\n\n</think>\n\n" before the last assistant turn's answer, and with this setting its
# generation prompt ends with the same block, so a model learns its answers after the block it
# sees when it answers. And message text is always text: the text each message brought into the
# rendered text is found by rendering it again with a sentinel for that message's content
# (message_span), and a special token typed there is encoded as characters, where
# apply_chat_template would make it the token (a user could then end the assistant's turn or
# forge a system turn). Everything else the template wrote is tokenized as tokenizers does.
# Llama 3.2's template writes today's date (strftime_now) unless given date_string: dated() gives it.

TEMPLATE_SETTINGS = {"enable_thinking": False}


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.datetime.now().strftime(format)


def today() -> str:
    """Today's date as Llama 3's template writes it: "26 Jul 2024"."""
    return strftime_now("%d %b %Y")


@contextlib.contextmanager
def dated(date_string: str):
    """Within it, chat templates render as on date_string ("26 Jul 2024"): a template that writes
    today's date (Llama 3.2's "Today Date: ...") writes this one. train.py renders its data with the
    date its run started on, so that a run resumed another day trains on the same tokens. None:
    no date of its own (today's, unless an enclosing dated gives one)."""
    global TEMPLATE_SETTINGS
    saved = TEMPLATE_SETTINGS
    TEMPLATE_SETTINGS = saved if date_string is None else {**saved, "date_string": date_string}
    try:
        yield
    finally:
        TEMPLATE_SETTINGS = saved


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str, name: str) -> jinja2.Template:
    """The template compiled once; ValueError naming `name` (its folder) if it is not Jinja."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template of {name} is not valid Jinja (line {e.lineno}: {e.message})") from None


def chat_messages(messages: list[dict]) -> list[dict]:
    """The messages a template sees: role and content (an Alpaca entry's input after its instruction)."""
    return [{"role": m["role"], "content": m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")}
            for m in messages]


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The text the tokenizer's chat template renders for messages (as chat_messages gives them)."""
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.name} has no chat template; use --prompt-style alpaca, phi3 or none")
    template = compile_chat_template(tokenizer.chat_template, tokenizer.name)
    try:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               **tokenizer.special_tokens, **TEMPLATE_SETTINGS)
    except Exception as e:  # the template's raise_exception, or a template that breaks on these messages
        raise ValueError(f"the chat template of {tokenizer.name} cannot render this conversation ({e})") from None


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b (a binary search over slices, at C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


def message_span(tokenizer, messages, k, text, add_generation_prompt, sentinel) -> tuple[int, int]:
    """(start, end): the part of `text`, the render of messages, that message k's content brought,
    however the template trims or splits it: where text and its render with a sentinel (a
    character text lacks) for that content part ways, seen from either end."""
    probe = [*messages[:k], {**messages[k], "content": sentinel}, *messages[k + 1:]]
    other = render_chat(tokenizer, probe, add_generation_prompt)
    start = common_prefix(text, other)
    return start, len(text) - common_prefix(text[start:][::-1], other[start:][::-1])


def encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, learned) of a conversation in the tokenizer's chat template: all of its rendered text (with
    the generation prompt unless the last message is the assistant's), learned covering each
    assistant turn's text and the end token after it. The template's own added tokens become
    their ids; the text between them is ordinary text, cut where an assistant turn's text starts
    and ends (the chapter's prompt and response apart), so a prompt's ids always start its training
    text's; otherwise the ids are apply_chat_template's."""
    messages = chat_messages(messages)
    generation = messages[-1]["role"] != "assistant"
    text = render_chat(tokenizer, messages, generation)
    sentinel = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text), None)  # a private-use character
    if sentinel is None:
        raise ValueError("a conversation that holds every private-use character cannot be rendered")
    spans = {k: message_span(tokenizer, messages, k, text, generation, sentinel) for k, m in enumerate(messages)
             if m["role"] == "assistant" or any(token in m["content"] for token in tokenizer.added)}
    turns = [spans[k] for k, m in enumerate(messages) if m["role"] == "assistant"]
    cuts = sorted({b for span in turns for b in span})
    specials = [(start, end, i) for start, end, i in tokenizer.added_tokens(text)
                if not any(s < end and start < e for s, e in spans.values())]  # typed ones stay text
    ids, learned, starts = [], [], []
    pos = 0
    for start, end, token_id in [*specials, (len(text), len(text), None)]:
        bounds = [pos, *(c for c in cuts if pos < c < start), start]
        for a, b in zip(bounds, bounds[1:]):
            piece = tokenizer.encode(text[a:b])
            ids += piece
            learned += [any(s <= a and b <= e for s, e in turns)] * len(piece)
            starts += [a] * len(piece)
        if token_id is not None:
            ids.append(token_id)
            learned.append(False)
            starts.append(start)
        pos = end
    for _, end in turns:  # the token right after an assistant turn must be an end token: learned too
        j = next((j for j, s in enumerate(starts) if s >= end), len(ids))
        if j == len(ids) or starts[j] != end or ids[j] not in tokenizer.stop_ids:
            raise ValueError(f"the chat template of {tokenizer.name} does not end an assistant turn with an end "
                             f"token ({', '.join(tokenizer.decode([i]) for i in tokenizer.stop_ids)})")
        learned[j] = True
    return ids, learned


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


def render_text(messages: list[dict], style: str = "alpaca", tokenizer=GPT2) -> str:
    """A conversation as one text, each assistant turn followed by the tokenizer's end-of-text (or in
    the chat-template style, the template's text, with the generation prompt unless the last
    message is the assistant's): the training text, and what the exported chat template gives
    for the same messages."""
    if style == CHAT_TEMPLATE:
        return render_chat(tokenizer, chat_messages(messages), messages[-1]["role"] != "assistant")
    bos = tokenizer.decode(tokenizer.bos_ids) if tokenizer.bos_ids else ""
    return bos + "".join(text + tokenizer.eot * is_assistant for text, is_assistant in render_turns(messages, style))


def encode_conversation(messages: list[dict], style: str = "alpaca", tokenizer=GPT2) -> tuple[list[int], list[bool]]:
    """(ids, learned): the tokens of a conversation and, for each, whether it belongs to an
    assistant turn (its end-of-text included): what --mask-instructions keeps in the loss.
    Each piece of render_turns is tokenized on its own, so an Alpaca entry gives exactly the
    chapter's prompt tokens followed by its response tokens. Every assistant turn but a last
    one gets its end token here; collate appends the last one (turn_end_id), and in the
    chat-template style what the template writes after it is left out too. A conversation
    that ends with a user turn gives the prompt to generate the next assistant turn from."""
    if style == CHAT_TEMPLATE:
        ids, learned = encode_chat(messages, tokenizer)
        if messages[-1]["role"] == "assistant":  # up to its end token: the last learned token
            end = len(learned) - learned[::-1].index(True) - 1
            ids, learned = ids[:end], learned[:end]
        return ids, learned
    pieces = render_turns(messages, style)
    ids, learned = list(tokenizer.bos_ids), [False] * len(tokenizer.bos_ids)
    for k, (text, is_assistant) in enumerate(pieces):
        tokens = tokenizer.encode(text) + [tokenizer.eot_id] * (is_assistant and k < len(pieces) - 1)
        ids += tokens
        learned += [is_assistant] * len(tokens)
    return ids, learned


def turn_end_id(style: str = "alpaca", tokenizer=GPT2) -> int:
    """The token that ends an assistant turn in `style`: the tokenizer's end-of-text, or the end token
    the chat template writes after an assistant turn (<|im_end|>, <|eot_id|>)."""
    if style != CHAT_TEMPLATE:
        return tokenizer.eot_id
    ids, learned = encode_chat([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}],
                               tokenizer)
    return ids[len(learned) - learned[::-1].index(True) - 1]


def prompt_ids(entry: dict, style: str = "alpaca", tokenizer=GPT2) -> list[int]:
    """What generation feeds the model for an entry: everything before its last assistant turn
    (for an Alpaca entry, the tokens of format_prompt; in the chat-template style, what
    apply_chat_template gives with add_generation_prompt)."""
    messages = entry_messages(entry)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return encode_conversation(messages, style, tokenizer)[0]
