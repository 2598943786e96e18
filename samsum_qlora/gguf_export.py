"""A merged model -> GGUF files for llama.cpp, Ollama and LM Studio, written by llama.cpp's own
converter (`convert_hf_to_gguf.py`, run as a program), and an Ollama Modelfile beside them.

The converter is not a PyPI package of its own: it lives in llama.cpp's source, with the `gguf`
library it was written against (`gguf-py/`). `--llama-cpp DIR` (or $LLAMA_CPP_DIR) names that
source: a llama.cpp checkout, or the one inside llama-cpp-python's source distribution (GET_SOURCE).

What the chat rules need, carried into the file and the Modelfile:
- the model's own chat template, wrapped so that a conversation without a system message gets the
  task instruction the model was trained with, where training put it (`with_default_instruction`);
- the end-of-turn token as a token llama.cpp stops at (`check_end_of_turn`);
- greedy decoding and the eval's token budget, in the Modelfile (`modelfile`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from samsum_qlora import files
from samsum_qlora.errors import UserError

if TYPE_CHECKING:
    from samsum_qlora.chat import ChatFormat

OUTTYPES = ("f16", "bf16", "q8_0", "f32")  # llama.cpp's converter writes these itself, no quantize binary needed
BYTES_PER_WEIGHT = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "f32": 4.0}  # q8_0: 32 int8 weights + one f16 scale
CONVERTER = "convert_hf_to_gguf.py"
SOURCE_ENV = "LLAMA_CPP_DIR"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist holds vendor/llama.cpp; the version this was tested with
GET_SOURCE = (
    f"pip download --no-deps --no-binary :all: {LLAMA_CPP_PYTHON} -d . && tar xzf llama_cpp_python-0.3.36.tar.gz, "
    "then pass --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp (or a git clone of ggml-org/llama.cpp)"
)
# Token texts llama.cpp itself treats as an end of generation (llama-vocab.cpp), besides the ids
# the file names as EOS and EOT.
LLAMA_CPP_END_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "</s>"}
)
# What the converter says when it refuses, and what we say instead (one line each; {} is what it named).
CONVERTER_REFUSALS = (
    (
        "BPE pre-tokenizer was not recognized",
        "llama.cpp does not know this model's tokenizer (it recognises a BPE pre-tokenizer by the hash of "
        "what it produces, and this one's is not in its list), so it cannot be converted; "
        "export a model with a tokenizer llama.cpp supports (Llama 3, SmolLM2, Qwen2.5, Gemma, Phi-3, ...)",
    ),
    (
        re.compile(r"Model (\w+) is not supported"),
        "llama.cpp cannot convert this model: its architecture {} is not one it supports",
    ),
    ("No space left on device", "no space left on the device while writing the GGUF; free some space, then rerun"),
)


@dataclass(frozen=True)
class Converter:
    script: Path

    @property
    def source(self) -> Path:
        return self.script.parent


def find_converter(given: str | None) -> Converter:
    """llama.cpp's converter from --llama-cpp (a folder or the script itself), else $LLAMA_CPP_DIR."""
    where = given or os.environ.get(SOURCE_ENV)
    if not where:
        raise UserError(f"export needs llama.cpp's converter ({CONVERTER}): {GET_SOURCE}")
    path = Path(where).expanduser()
    script = path if path.name == CONVERTER else path / CONVERTER
    if not script.is_file():
        raise UserError(f"{path} holds no {CONVERTER}; get llama.cpp's source: {GET_SOURCE}")
    return Converter(script)


def with_default_instruction(template: str, instruction: str, *, system_role: bool) -> str:
    """The chat template, opened by a block that gives a conversation without a system message the
    trained task instruction, where training put it: as the system message, or (for templates
    without a system role) before the first user message."""
    text = json.dumps(instruction)  # a valid Jinja string literal
    if system_role:
        rewrite = f"{{%- set messages = [{{'role': 'system', 'content': {text}}}] + messages %}}"
    else:
        rewrite = (
            f"{{%- set messages = [{{'role': 'user', 'content': {text} + '\\n\\n' + messages[0]['content']}}]"
            " + messages[1:] %}"
        )
    opening = "{%- if messages and messages[0]['role'] != 'system' %}" + rewrite + "{%- endif %}\n"
    return opening + template


def set_chat_template(folder: Path, template: str) -> None:
    """The template the converter copies into the GGUF: chat_template.jinja, and none in
    tokenizer_config.json (which the converter would prefer)."""
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = files.read_json(config_path)
        if config.pop("chat_template", None) is not None:
            files.write_json(config_path, config)
    files.write_text(folder / "chat_template.jinja", template)


def converter_command(converter: Converter, merged: Path, outfile: Path, outtype: str) -> list[str]:
    return [sys.executable, str(converter.script), str(merged), "--outfile", str(outfile), "--outtype", outtype]


def refusal(output: str) -> str | None:
    """Our one line for a refusal the converter's output holds, if it is one we know."""
    for said, meaning in CONVERTER_REFUSALS:
        found = said.search(output) if isinstance(said, re.Pattern) else (said in output and said)
        if found:
            return meaning.format(*(found.groups() if isinstance(found, re.Match) else ()))
    return None


def convert(converter: Converter, folder: Path, outfile: Path, outtype: str, *, vocab_only: bool = False) -> None:
    """Run llama.cpp's converter; its known refusals become one line, anything else its last line.
    `vocab_only` needs only config.json and the tokenizer: a quick check that the model converts."""
    started = time.monotonic()
    what = "the tokenizer" if vocab_only else outtype
    print(f"converting {what} with {converter.script} ...")
    command = converter_command(converter, folder, outfile, outtype) + (["--vocab-only"] if vocab_only else [])
    done = subprocess.run(command, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        outfile.unlink(missing_ok=True)
        last = (output.strip().splitlines() or ["no output"])[-1]
        raise UserError(refusal(output) or f"llama.cpp's converter failed on {folder} ({what}): {last[:300]}")
    seconds = time.monotonic() - started
    if vocab_only:
        print(f"llama.cpp converts this architecture and tokenizer ({seconds:.0f} s)")
    else:
        print(f"wrote {outfile.name}: {outfile.stat().st_size / 1024**2:,.1f} MiB in {seconds:.0f} s")


def check_converts(converter: Converter, model_config, tokenizer) -> None:
    """The architecture and the tokenizer, through the converter's own vocab-only run, before any
    merging: llama.cpp recognises a BPE tokenizer by the hash of what it produces, so only running
    its code tells."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="samsum-qlora-vocab-") as scratch:
        folder = Path(scratch)
        model_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        convert(converter, folder, folder / "vocab.gguf", "f16", vocab_only=True)


def read_back(path: Path) -> dict:
    """What llama.cpp will read from a GGUF: architecture, chat template, special ids, token texts."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    return {
        "architecture": value("general.architecture"),
        "chat_template": value("tokenizer.chat_template"),
        "bos": value("tokenizer.ggml.bos_token_id"),
        "eos": value("tokenizer.ggml.eos_token_id"),
        "eot": value("tokenizer.ggml.eot_token_id"),
        "add_bos": bool(value("tokenizer.ggml.add_bos_token")),
        "tokens": value("tokenizer.ggml.tokens"),
        "file_type": value("general.file_type"),
        "tensors": len(reader.tensors),
    }


def llama_cpp_summaries(
    gguf: Path, fmt: ChatFormat, dialogues: list[str], max_new_tokens: int, *, threads: int = 2
) -> list[str]:
    """llama.cpp's own greedy summaries (through llama-cpp-python, not a dependency of the package)
    from the very prompt ids eval feeds the merged model: how a GGUF is checked against its source."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=fmt.max_length + max_new_tokens, n_threads=threads, verbose=False)
    summaries = []
    for dialogue in dialogues:
        new = []
        for token in llm.generate(fmt.prompt(dialogue), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in fmt.stop_ids:
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
        summaries.append(fmt.decode(new))
    return summaries


def check_end_of_turn(meta: dict, end_of_turn: int, text: str) -> None:
    """llama.cpp must stop where the model closes its turn, or its summaries run on."""
    if end_of_turn in (meta["eos"], meta["eot"]) or text in LLAMA_CPP_END_TEXTS:
        return
    raise UserError(
        f"llama.cpp would not stop at this model's end of turn {text!r} (id {end_of_turn}): the GGUF's EOS is "
        f"id {meta['eos']} and it names no EOT; set eos_token_id to {end_of_turn} in the base's generation_config.json"
    )


def ollama_template(rendered: str, bos_text: str | None, add_bos: bool) -> str:
    """A Go template for Ollama from the prompt our chat template renders with stand-ins for the
    system text and the dialogue. llama.cpp adds BOS itself where the GGUF says so; the template
    must not write it a second time."""
    if add_bos and bos_text and rendered.startswith(bos_text):
        rendered = rendered[len(bos_text) :]
    return rendered.replace(SYSTEM_STAND_IN, "{{ .System }}").replace(DIALOGUE_STAND_IN, "{{ .Prompt }}")


SYSTEM_STAND_IN = "\x00system\x00"
DIALOGUE_STAND_IN = "\x00dialogue\x00"


def modelfile(gguf_name: str, template: str, instruction: str, stops: list[str], num_predict: int, num_ctx: int) -> str:
    """The Ollama Modelfile: the file, its prompt, greedy decoding with eval's budget, the stops."""

    def quoted(text: str) -> str:
        if '"""' in text:
            raise UserError(f'cannot write a Modelfile: {text[:40]!r}... holds """')
        return f'"""{text}"""'

    lines = [
        f"FROM ./{gguf_name}",
        f"TEMPLATE {quoted(template)}",
        f"SYSTEM {quoted(instruction)}",
        *(f"PARAMETER stop {json.dumps(s)}" for s in stops),
        "PARAMETER temperature 0",
        "PARAMETER top_k 1",
        f"PARAMETER num_predict {num_predict}",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


def gguf_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def bytes_needed(merged_float32_bytes: int, outtypes: list[str]) -> int:
    """Room the GGUFs take, from the float32 merged weights (4 bytes a weight), plus 5% for metadata."""
    weights = merged_float32_bytes / 4
    return int(1.05 * sum(weights * BYTES_PER_WEIGHT[t] for t in outtypes))
