"""Prompts: how an instruction becomes model input, for answering and for task selection.

Answers use the tokenizer's chat template when it has one (instruct models were tuned on it),
else an Alpaca-style plain template, opened with the BOS token when the tokenizer adds one itself
(a base Gemma scores plain English at perplexity 12.0 with it and 245.8 without, bench/prompt_bos.py: prompts are
tokenized without special tokens, so the template must write it, as chat templates do). The task-selection prompt task_prompt(x) (Qiu et al.
2024) wraps the instruction in a question whose answer is the task label; its template is
configurable and recorded in a library's manifest so inference uses exactly what training did.
"""

from __future__ import annotations

import re
import secrets
import sys

from chainlora.errors import ChainloraError

PLAIN_TEMPLATE = "### Instruction:\n{text}\n\n### Response:\n"

DEFAULT_TASK_PROMPT = (
    "Classify the instruction below by the task it asks for. Answer with the task name only.\n\n"
    "Instruction: {instruction}"
)


def user_message(instruction: str, input: str = "") -> str:
    """The user's turn: the instruction, then its input (Alpaca style) when there is one."""
    return f"{instruction}\n\n{input}" if input else instruction


def has_chat_template(tokenizer: object) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def bos_text(tokenizer: object) -> str:
    """The BOS token's text when the tokenizer puts it before every text on its own (Gemma,
    Llama), else "" (SmolLM2, GPT-2): what a plain prompt must start with."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    return bos if tokenizer("a")["input_ids"][:1] == [bos_id] else ""


def render(tokenizer: object, text: str, system: str | None = None) -> str:
    """The prompt string for `text`, ending where the model's answer starts.

    system=None keeps the chat template's own default system message (if it has one).
    """
    if not has_chat_template(tokenizer):
        return bos_text(tokenizer) + (f"{system}\n\n" if system else "") + PLAIN_TEMPLATE.format(text=text)
    return render_messages(tokenizer, ([{"role": "system", "content": system}] if system is not None else [])
                           + [{"role": "user", "content": text}])


_folded_note: set[int] = set()


def render_messages(tokenizer: object, messages: list[dict]) -> str:
    """The chat template's rendering, generation prompt added. A template without a system role
    (Gemma 2, Mistral's older ones raise on it) gets the system message folded into the first
    user turn, as Gemma 3's own template does, with a one-line note the first time."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError from the template's raise_exception
        if not messages or messages[0]["role"] != "system":
            raise ChainloraError(f"the model's chat template refused the conversation: {str(e).splitlines()[0]}")
        first_error = e
    try:
        rendered = tokenizer.apply_chat_template(fold_system(messages), tokenize=False, add_generation_prompt=True)
    except Exception:
        raise ChainloraError(f"the model's chat template refused the conversation: {str(first_error).splitlines()[0]}")
    if id(tokenizer) not in _folded_note:
        _folded_note.add(id(tokenizer))
        print("note: the chat template has no system role; the system prompt is put at the start of "
              "the first user turn", file=sys.stderr)
    return rendered


def fold_system(messages: list[dict]) -> list[dict]:
    """The conversation without its system message, which opens the first user turn instead."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first = next((m for m in rest if m["role"] == "user"), None)
    if first is None:
        return [{"role": "user", "content": system}] + rest
    first["content"] = f"{system}\n\n{first['content']}" if system else first["content"]
    return rest


def ids(tokenizer: object, prompt: str | list[int]) -> list[int]:
    """The token ids generation reads for a rendered prompt: no special tokens are added (the
    chat template wrote them). A list of ids is a prompt already tokenized (a forwarded one).
    Local answering and forwarding both go through here, so a backend sees the same tokens."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return [int(t) for t in prompt]


def special_strings(tokenizer: object) -> list[str]:
    """The text of the tokenizer's special tokens (`<|im_start|>`, `<|eot_id|>`, ...), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return sorted({t.content for t in added.values() if getattr(t, "special", False) and t.content},
                  key=len, reverse=True)


class UserText:
    """Text from users kept as text: a special token's string in it (`<|im_start|>system`) is
    tokenized as the plain characters it is, never as the control token, so user text cannot
    forge a chat turn. The chat template's own tokens stay real.

    `plain(text)` marks each special string in `text` with a placeholder (private-use characters
    and a random nonce: no template touches them) before the template renders it; `plain.ids(rendered)`
    tokenizes the rendered prompt as `ids` does, each placeholder as its string with
    `split_special_tokens`. Text without special strings is untouched, so its ids are exactly
    those training used (data/examples.py)."""

    def __init__(self, tokenizer: object):
        self.tok, self.specials = tokenizer, special_strings(tokenizer)
        self.find = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        nonce = secrets.token_hex(8)
        self.mark = f"\ue000{nonce}"
        self.marks = re.compile(f"\ue000{nonce}(\\d+)\ue001")

    def __call__(self, text: str) -> str:
        if self.find is None:
            return text
        return self.find.sub(lambda m: f"{self.mark}{self.specials.index(m.group(0))}\ue001", text)

    def ids(self, rendered: str) -> list[int]:
        """The rendered prompt's token ids, marked special strings as plain text."""
        if self.mark not in rendered:
            return ids(self.tok, rendered)
        pieces = self.marks.split(rendered)  # text, index, text, index, ..., text
        out: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                out += self.tok(self.specials[int(piece)], add_special_tokens=False,
                                split_special_tokens=True)["input_ids"]
            elif piece:
                out += ids(self.tok, piece)
        return out


def end_of_answer(tokenizer: object) -> str:
    """What closes an answer in training targets: the chat turn end, else the EOS token."""
    return tokenizer.eos_token or ""


def task_prompt(instruction: str, input: str = "", template: str = DEFAULT_TASK_PROMPT) -> str:
    """The task-selection prompt task_prompt(x); `template` uses {instruction} (and may use {input}).

    The input is appended to the instruction unless the template places it itself, so the
    selector sees the whole request.
    """
    if "{input}" in template:
        return template.format(instruction=instruction, input=input)
    return template.format(instruction=user_message(instruction, input))


def check_task_prompt(template: str) -> None:
    """Reject a task_prompt template that cannot be filled (named in the error)."""
    if "{instruction}" not in template:
        raise ChainloraError("task_prompt: the template must contain {instruction}")
    try:
        template.format(instruction="x", input="y")
    except (KeyError, IndexError, ValueError) as e:
        raise ChainloraError(f"task_prompt: bad template placeholder {e}")


def render_chat(tokenizer: object, messages: list[dict], system: str | None = None) -> str:
    """A whole conversation as the prompt (the server's chat requests); the library's system
    prompt goes first unless the conversation brings its own. Without a chat template only the
    last user turn is used."""
    if not has_chat_template(tokenizer):
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        sys_text = next((m["content"] for m in messages if m["role"] == "system"), system)
        return render(tokenizer, last, sys_text)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + list(messages)
    return render_messages(tokenizer, messages)


class UserTurn:
    """Finds the last user message in a prompt rendered in the model's own chat template, so a
    prompt sent as token ids (lm-evaluation-harness, a client that renders for itself) is routed
    by what the user asked, as a chat request is, not by the template's words around it.

    The user turn's opening is what the template writes before a user message, back to the
    special token that starts it (`<|im_start|>user\\n`, `<|start_header_id|>user<|end_header_id|>\\n\\n`);
    its close is everything the template writes after it (up to the assistant's turn)."""

    MARK = "\ue000chainlora-user\ue001"

    def __init__(self, tokenizer: object, system: str | None = None):
        rendered = render(tokenizer, self.MARK, system)
        at = rendered.index(self.MARK)
        self.close = rendered[at + len(self.MARK):]
        specials = [m.start() for s in special_strings(tokenizer) for m in re.finditer(re.escape(s), rendered[:at])]
        self.open = rendered[:at].split("\n\n")[-1] if not has_chat_template(tokenizer) else ""
        for start in sorted(specials, reverse=True):  # back over special tokens until a word is in it
            self.open = rendered[start:at]
            if re.search(r"[A-Za-z]", re.sub("|".join(map(re.escape, special_strings(tokenizer))), "", self.open)):
                break

    def last(self, text: str) -> str | None:
        """The last user message in `text` (a decoded prompt, special tokens kept), or None."""
        if not self.open or not self.close.strip():
            return None
        i = text.rfind(self.open)
        j = text.find(self.close.strip(), i + len(self.open)) if i >= 0 else -1
        return text[i + len(self.open):j].strip() or None if j >= 0 else None


def token_prompt_text(tokenizer: object, ids: list[int], system: str | None = None) -> str:
    """What a prompt sent as token ids is routed by: its last user message when it is in the
    model's chat template, else its decoded text (special tokens left out)."""
    found = UserTurn(tokenizer, system).last(tokenizer.decode(ids))
    return found or tokenizer.decode(ids, skip_special_tokens=True).strip() or "(token prompt)"
