"""The chat rules of any Hugging Face chat model, read from its own tokenizer and template.

Nothing here names a model family. `ChatFormat.build` renders a probe conversation with the
model's template and learns from it:
- whether a system message is rendered (Gemma's and Mistral's templates refuse one: the task
  instruction then opens the user turn);
- which special token closes the assistant's turn (Llama 3 `<|eot_id|>`, ChatML `<|im_end|>`,
  Gemma `<end_of_turn>`, Mistral `</s>`, Phi-3 `<|end|>`);
- which ids end generation: that token and every EOS of the model's generation config;
- which id pads: any id will do, because padding is known by position, never by id.
The template writes BOS (or not) itself, so the tokenizer never adds special tokens to it.

The loss-mask rule is stated once, in `ChatFormat.encode`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samsum_qlora import files
from samsum_qlora.errors import UserError

if TYPE_CHECKING:
    from samsum_qlora.config import DataArgs

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
RESERVED_PADS = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>")  # pad tokens vocabularies reserve
_PROBE_SYSTEM = "Probe instruction 7301."
_PROBE_DIALOGUE = "Ana: probe dialogue 7302"
_PROBE_SUMMARY = "Probe summary 7303."
TEMPLATE_HINT = "set model.chat_template to a Jinja chat template (text or a .jinja file)"


def clean(text: str) -> str:
    """SAMSum mixes \\r\\n and \\n; the templates trim the ends anyway."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def read_template(value: str) -> str:
    """model.chat_template: a Jinja template's text (it has a "{"), or the path of a file holding one."""
    if "{" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"model.chat_template: {value} is not a file; give a .jinja file or the template's text")
    return files.utf8_text(path.read_bytes(), f"model.chat_template: {path}")


def build_messages(
    dialogue: str, instruction: str, summary: str | None = None, *, system_role: bool = True
) -> list[dict[str, str]]:
    """system (the task) + user (the dialogue) [+ assistant (the summary), for training]. Without
    a system role the task opens the user turn."""
    if system_role:
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": clean(dialogue)}]
    else:
        messages = [{"role": "user", "content": f"{instruction}\n\n{clean(dialogue)}"}]
    if summary is not None:
        messages.append({"role": "assistant", "content": clean(summary)})
    return messages


@functools.lru_cache(maxsize=16)
def _special_pattern(specials: frozenset[str]) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or r"(?!)")


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else one its vocabulary reserves for padding, else EOS. Padding
    is masked by position, so a PAD equal to EOS or to the end of turn never hides a trained token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    vocab = tokenizer.get_vocab()
    reserved = next((vocab[t] for t in RESERVED_PADS if t in vocab), None)
    if reserved is not None:
        return reserved
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} has neither a pad nor an EOS token")
    return tokenizer.eos_token_id


def fit_dialogue(
    tokenizer, dialogue: str, render: Callable[[str], list[int]], max_length: int, rendered: list[int] | None = None
) -> tuple[str, list[int]] | None:
    """Shorten the dialogue's tail until `render(dialogue)` fits `max_length` tokens.

    Cuts at token boundaries mapped back to characters, so a multi-byte character is never split
    into replacement characters. Returns (dialogue used, ids), or None when not even the
    dialogue's first token fits. `rendered`: `render(dialogue)`, when the caller has it already."""
    ids = render(dialogue) if rendered is None else rendered
    excess = len(ids) - max_length
    if excess <= 0:
        return dialogue, ids
    offsets = tokenizer(dialogue, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ends = [end for _, end in offsets["offset_mapping"]]
    keep = len(ends) - excess
    while keep > 0:
        # re-encoding the shortened text may merge differently at the cut: re-render, re-measure
        shortened = dialogue[: ends[keep - 1]].rstrip()
        ids = render(shortened)
        excess = len(ids) - max_length
        if excess <= 0 and shortened:
            return shortened, ids
        keep -= max(excess, 1)
    return None


def char_budget(tokenizer, max_length: int) -> int:
    """Characters of a dialogue that surely hold more than `max_length` tokens: a dialogue is cut
    to these before it is rendered and tokenised (a 10 MB one took 2.8 GB of memory whole), which
    changes none of the tokens that fit. A token covers at most as many characters as its
    vocabulary entry has (byte-level BPE writes a byte as one character, SentencePiece a space
    as one); twice that, for normalisers that join characters."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * (max_length + 1) * longest


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


@dataclass
class EncodeStats:
    kept: int = 0
    skipped_empty: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def describe(self, where: str, max_length: int) -> str:
        return (
            f"{self.kept} training rows from {where} ({self.trained_tokens:,} trained of {self.tokens:,} "
            f"tokens); skipped {self.skipped_empty} with an empty dialogue or summary, dropped "
            f"{self.dropped_too_long} whose summary cannot fit {max_length} tokens, shortened "
            f"{self.truncated} dialogues"
        )


@dataclass(eq=False)
class ChatFormat:
    """A tokenizer with the chat rules read from its template, and the prompt settings."""

    tokenizer: Any
    instruction: str
    max_length: int
    date_string: str
    system_role: bool = True
    end_of_turn: int = -1
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    _specials: frozenset[str] = field(default=frozenset(), repr=False)
    _char_budget: int | None = field(default=None, repr=False)

    @classmethod
    def build(cls, tokenizer, data: DataArgs, generation_eos: Iterable[int] = ()) -> ChatFormat:
        specials = frozenset(tokenizer.all_special_tokens) | {
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special
        }
        fmt = cls(tokenizer, data.task_instruction, data.max_length, data.date_string, _specials=specials)
        fmt.system_role = fmt._renders_system()
        fmt.end_of_turn = fmt._closing_token()
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        fmt.stop_ids = tuple(dict.fromkeys([fmt.end_of_turn, *generation_eos, *eos]))
        fmt.pad_id = pad_id(tokenizer)
        fmt._char_budget = char_budget(tokenizer, data.max_length)
        return fmt

    # --- rendering ---

    @property
    def name(self) -> str:
        return self.tokenizer.name_or_path

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, date_string=self.date_string
            )
        except Exception as e:  # jinja's TemplateError, or whatever the template raises
            raise UserError(
                f"the chat template of {self.name} failed: {str(e).splitlines()[0]}; {TEMPLATE_HINT}"
            ) from None

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def plain(self, text: str) -> str:
        """`clean(text)` without special-token strings: a literal "<|eot_id|>" in a dialogue would
        otherwise become a real end of turn (or a second BOS) inside the prompt."""
        return clean(_special_pattern(self._specials).sub("", clean(text)))

    def messages(self, dialogue: str, summary: str | None = None) -> list[dict[str, str]]:
        return build_messages(dialogue, self.instruction, summary, system_role=self.system_role)

    def _renders_system(self) -> bool:
        probe = build_messages(_PROBE_DIALOGUE, _PROBE_SYSTEM)
        try:
            text = self.tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=True, date_string=self.date_string
            )
        except Exception:  # e.g. "System role not supported"
            return False
        return _PROBE_SYSTEM in text

    def _completion(self, prompt_text: str, full_text: str) -> str:
        """What the template writes after the generation prompt: the assistant's turn."""
        if not full_text.startswith(prompt_text):
            raise UserError(
                f"the chat template of {self.name} does not begin the conversation with its "
                f"generation prompt, so the summary cannot be told from the prompt; {TEMPLATE_HINT}"
            )
        return full_text[len(prompt_text) :]

    def _closing_token(self) -> int:
        """The first special token the template writes after the assistant's message."""
        prompt = self.render(self.messages(_PROBE_DIALOGUE), True)
        completion = self._completion(prompt, self.render(self.messages(_PROBE_DIALOGUE, _PROBE_SUMMARY), False))
        at = completion.find(_PROBE_SUMMARY)
        if at < 0:
            raise UserError(
                f"the chat template of {self.name} does not write the assistant's message after "
                f"its generation prompt; {TEMPLATE_HINT}"
            )
        specials = special_ids(self.tokenizer)
        closing = next((i for i in self.ids(completion[at + len(_PROBE_SUMMARY) :]) if i in specials), None)
        if closing is None:
            raise UserError(
                f"the chat template of {self.name} closes the assistant's turn with no special "
                f"token, so a model could not learn where a summary ends; {TEMPLATE_HINT}"
            )
        return closing

    # --- tokens ---

    def prompt(self, dialogue: str) -> list[int]:
        """Prompt ids for generation: the template's rendering of the task and the dialogue, ending
        in the assistant's header, the dialogue's tail cut to fit data.max_length."""
        return self.fit_prompt(dialogue)[0]

    def fit_prompt(self, dialogue: str) -> tuple[list[int], bool]:
        """`prompt(dialogue)`, and whether the dialogue's tail was cut to fit."""
        plain = self.plain(dialogue)
        fitted = fit_dialogue(self.tokenizer, self._bounded(plain), self._prompt_ids, self.max_length)
        if fitted is None:
            raise UserError(f"data.max_length={self.max_length} is too short for even the prompt template")
        used, ids = fitted
        return ids, used != plain

    def _bounded(self, dialogue: str) -> str:
        return dialogue if self._char_budget is None else dialogue[: self._char_budget]

    def _prompt_ids(self, dialogue: str) -> list[int]:
        return self.ids(self.render(self.messages(dialogue), True))

    def encode(self, dialogue: str, summary: str) -> Encoded | None:
        """Tokens and labels of one training row.

        The mask rule: labels are -100 over the prompt (the template's rendering of the task and
        the dialogue, up to and including the assistant's header) and equal the tokens over
        everything the template writes after it in that turn: the summary, the token that closes
        the turn, and whatever follows it (ChatML's newline, Phi-3's EOS). So the model learns the
        summary and where it ends, never the prompt. The row is the prompt's own ids followed by
        the completion's, so training conditions on exactly the ids generation starts from.

        Rows longer than data.max_length lose the end of their dialogue, never a summary token.
        Returns None for an empty dialogue or summary, or a summary that cannot fit with any prompt.
        """
        return self._encode_plain(self.plain(dialogue), self.plain(summary))

    def _encode_plain(self, dialogue: str, summary: str) -> Encoded | None:
        if not dialogue or not summary:
            return None
        whole, dialogue = dialogue, self._bounded(dialogue)
        prompt_text = self.render(self.messages(dialogue), True)
        full_text = self.render(self.messages(dialogue, summary), False)
        completion = self._completion(prompt_text, full_text)
        prompt, full = self.ids(prompt_text), self.ids(full_text)
        # The conversation tokenised whole, as the model saw chats in its own training; where a
        # token would straddle the prompt's end, the completion is tokenised on its own instead.
        answer = full[len(prompt) :] if full[: len(prompt)] == prompt else self.ids(completion)
        fitted = fit_dialogue(self.tokenizer, dialogue, self._prompt_ids, self.max_length - len(answer), prompt)
        if fitted is None:
            return None
        used, prompt = fitted
        bos = self.tokenizer.bos_token_id
        if bos is not None and prompt[:2] == [bos, bos]:
            raise UserError(f"the chat template of {self.name} writes two BOS tokens; {TEMPLATE_HINT}")
        return Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, truncated=used != whole)

    def encode_rows(self, rows: list[dict[str, str]], progress: bool = True) -> tuple[dict[str, list], EncodeStats]:
        """Encode many rows; returns columns (id, input_ids, labels) and what was skipped and why."""
        from tqdm.auto import tqdm

        columns: dict[str, list] = {"id": [], "input_ids": [], "labels": []}
        stats = EncodeStats()
        for row in tqdm(rows, desc="tokenising", unit="row", disable=not progress, leave=False):
            dialogue, summary = self.plain(row["dialogue"]), self.plain(row["summary"])
            if not dialogue or not summary:
                stats.skipped_empty += 1
                continue
            enc = self._encode_plain(dialogue, summary)
            if enc is None:
                stats.dropped_too_long += 1
                continue
            columns["id"].append(row["id"])
            columns["input_ids"].append(enc.input_ids)
            columns["labels"].append(enc.labels)
            stats.kept += 1
            stats.truncated += enc.truncated
            stats.tokens += len(enc.input_ids)
            stats.trained_tokens += sum(label != IGNORE_INDEX for label in enc.labels)
        return columns, stats

    def decode(self, ids: list[int]) -> str:
        """A generated summary as text: up to the first stop id, without special-token text."""
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        # no clean-up: it would take the spaces out of "Bo is late ." -style text on BPE tokenizers
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.plain(text)
