"""Tiny, faithful stand-ins of six chat-model families, for testing chat and loss-mask rules on the CPU.

`build_family(name, out_dir)` writes a Hugging Face model folder in a fraction of a second: a byte-level
or SentencePiece-style BPE tokenizer trained in-process on the SAMSum sample (every byte encodable), the
family's special tokens at the family's positions, its real chat template, its BOS/EOS/PAD/UNK as the
released `tokenizer_config.json` declares them, and a tiny random-weight `LlamaForCausalLM` whose
`vocab_size == len(tokenizer)`, with `config.json` / `generation_config.json` token ids as the released
model's. Only the tokenizer's *vocabulary* is made up; its pre-tokenizer, normaliser, decoder, post-processor,
special-token flags (including Phi-3's `rstrip=True`) and add_bos behaviour follow the family.

Where every template and token fact comes from (stored copies were found with the search tools over public
GitHub files; "(memory)" marks what no stored copy confirmed):

* llama3  (meta-llama/Llama-3.2-1B-Instruct): ../shared/reference/llama-3.2-1b-instruct-shape/tokenizer_config.json,
  generation_config.json, tokenizer.json; the template is copied in full (tool branches included), byte for byte.
* smollm2 (HuggingFaceTB/SmolLM2-135M-Instruct): /work/cache/smollm2/chat_template.jinja, tokenizer_config.json,
  tokenizer.json, generation_config.json, config.json (a local copy rebuilt from the released GGUF).
* qwen2   (Qwen/Qwen2.5-0.5B-Instruct): template from the verbatim copy in mattt/Jinja
  Tests/JinjaTests/ChatTemplateTests.swift (test "Qwen/Qwen2.5-0.5B-Instruct"), identical to the one embedded in
  an OpenBMB MiniCPM-o-2_6 processor test; special tokens / bos=None / unk=None / pad from
  y0tAaAa/Qwen2.5-Instruct checkpoints/qwen-cipherchat-compute-v2/tokenizer_config.json (a Qwen2.5-Instruct
  fine-tune's copy); generation_config (eos [<|im_end|>, <|endoftext|>], bos=pad=<|endoftext|>) from several
  stored printouts of Qwen2.5-*-Instruct generation_config.json; pre-tokenizer regex from transformers 5.24's
  Qwen2Tokenizer.
* gemma   (google/gemma-2-2b-it): template from guidance-ai/guidance guidance/chat.py (gemma-2-9b-it copy; the
  same string is stored for gemma-2b-it and gemma-7b-it in mattt/Jinja and ggerganov/llama.cpp tests);
  eos_token_id [1, 107] from a stored copy of gemma-2-2b-it config.json; bos/eos/pad/unk, add_bos_token=True,
  padding_side=left and the normaliser/decoder from transformers 5.24's GemmaTokenizer (the rest: memory).
* mistral (mistralai/Mistral-7B-Instruct-v0.2): the template now on the Hub (the 'v1' template with an optional
  system message, ' [INST] ' with a leading space, ' ' + content + eos) from ggerganov/llama.cpp
  tests/test-chat-template.cpp ("mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a system
  prompt)") and guidance-ai/guidance guidance/chat.py; the original Dec-2023 template (which raises on a system
  message) is kept as `MISTRAL_V02_ORIGINAL_TEMPLATE`. add_bos_token=True, legacy=True, pad=None from the
  Mistral-7B-Instruct tokenizer_config.json embedded in abetlen/llama-cpp-python tests/test_llama_chat_format.py;
  generation_config (bos 1, eos 2, no pad) from memory.
* phi3    (microsoft/Phi-3-mini-4k-instruct): template, add_bos_token=False, legacy=False, pad/eos=<|endoftext|>,
  padding_side=left and every added token with its rstrip flag from the tokenizer_config.json embedded in
  julienkay/com.doji.transformers com.doji.transformers/Tests/Editor/LLamaTokenizerTest.cs (same template in
  guidance-ai/guidance guidance/chat.py); generation eos [32000, 32001, 32007] = [<|endoftext|>, <|assistant|>,
  <|end|>], pad 32000, bos 1 from several stored copies; config.json eos 32000 from memory.

Only the standard library, torch, transformers and tokenizers are imported (lazily, inside functions).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "samsum_qlora" / "assets" / "samsum-sample"
INSTRUCTION = "Summarize the following dialogue in one or two sentences."

FAMILIES: tuple[str, ...] = ("llama3", "smollm2", "qwen2", "gemma", "mistral", "phi3")

# ---------------------------------------------------------------------------------------------------------
# Chat templates: the real strings (escapes as in the released JSON once decoded).
# ---------------------------------------------------------------------------------------------------------

# meta-llama/Llama-3.2-1B-Instruct, tokenizer_config.json "chat_template", in full.
LLAMA32_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    "    {%- else %}\n"
    '        {%- set date_string = "26 Jul 2024" %}\n'
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "\n"
    "{#- System message #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n"
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# HuggingFaceTB/SmolLM2-135M-Instruct.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)

# Qwen/Qwen2.5-0.5B-Instruct (the same template ships with every Qwen2.5 Instruct size).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# google/gemma-2-2b-it (identical in gemma-2b-it, gemma-7b-it, gemma-2-9b-it).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.2 as on the Hub now (system message folded into the first [INST]).
MISTRAL_V02_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# The template Mistral-7B-Instruct-v0.1/v0.2 shipped with first (raises on a system message). Not used by
# build_family; pass it as chat_template= to apply_chat_template to test the older behaviour.
MISTRAL_V02_ORIGINAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# microsoft/Phi-3-mini-4k-instruct (current revision: no BOS, EOS after the last turn unless a generation prompt).
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Pre-tokenizer regexes, from the released tokenizer.json files.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HUGE = 1000000000000000019884624838656  # model_max_length where the tokenizer declares none


@dataclass(frozen=True)
class FamilySpec:
    name: str
    chat_template: str  # the real Jinja template
    special_tokens: list[str]  # special tokens, in the family's id order
    bos: str | None  # as tokenizer_config.json declares them
    eos: str
    pad: str | None
    unk: str | None
    generation_eos: list[str]  # generation_config.json eos_token_id, as token strings, in order
    pre_tokenizer: str  # "bytelevel" or "metaspace"
    closes_turn: str  # the token that closes an assistant turn
    # -- everything below has a default; faithful details the tests may want to look at --
    model_id: str = ""  # the released model this stands in for
    added_tokens: list[str] = field(default_factory=list)  # added but *not* special (Qwen's <tool_call>, Phi-3's </s>)
    leading_tokens: list[str] = field(
        default_factory=list
    )  # laid at ids 0.. (SentencePiece control tokens); others go last
    rstrip_tokens: list[str] = field(default_factory=list)  # added tokens that swallow the whitespace after them
    add_bos_token: bool | None = None  # as declared in tokenizer_config.json (None: not declared)
    add_eos_token: bool | None = None
    legacy: bool | None = None  # SentencePiece style: True puts "▁" before every text chunk, False only at the start
    generation_bos: str | None = None  # generation_config.json bos_token_id / pad_token_id
    generation_pad: str | None = None
    config_eos: list[str] = field(default_factory=list)  # config.json eos_token_id (defaults to generation_eos)
    config_pad: str | None = None
    tie_word_embeddings: bool = True
    padding_side: str = "right"
    model_max_length: int = 2048
    assistant_role: str = "assistant"  # the role name the template writes for the assistant
    system_role: bool = True  # whether the template accepts a leading system message
    default_system: str | None = None  # the system prompt the template writes when none is given


SPECS: dict[str, FamilySpec] = {
    "llama3": FamilySpec(
        name="llama3",
        model_id="meta-llama/Llama-3.2-1B-Instruct",
        chat_template=LLAMA32_TEMPLATE,
        special_tokens=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|reserved_special_token_2|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        unk=None,
        generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        generation_bos="<|begin_of_text|>",
        pre_tokenizer="bytelevel",
        closes_turn="<|eot_id|>",
        model_max_length=131072,
        default_system="",  # always writes a system header ("Cutting Knowledge Date ... Today Date ...")
    ),
    "smollm2": FamilySpec(
        name="smollm2",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        chat_template=SMOLLM2_TEMPLATE,
        special_tokens=[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<repo_name>",
            "<reponame>",
            "<file_sep>",
            "<filename>",
            "<gh_stars>",
            "<issue_start>",
            "<issue_comment>",
            "<issue_closed>",
            "<jupyter_start>",
            "<jupyter_text>",
            "<jupyter_code>",
            "<jupyter_output>",
            "<jupyter_script>",
            "<empty_output>",
        ],
        leading_tokens=[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<repo_name>",
            "<reponame>",
            "<file_sep>",
            "<filename>",
            "<gh_stars>",
            "<issue_start>",
            "<issue_comment>",
            "<issue_closed>",
            "<jupyter_start>",
            "<jupyter_text>",
            "<jupyter_code>",
            "<jupyter_output>",
            "<jupyter_script>",
            "<empty_output>",
        ],
        bos="<|im_start|>",
        eos="<|im_end|>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        generation_eos=["<|im_end|>"],
        generation_bos="<|im_start|>",
        generation_pad="<|im_end|>",
        config_pad="<|im_end|>",
        pre_tokenizer="bytelevel",
        closes_turn="<|im_end|>",
        model_max_length=8192,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ),
    "qwen2": FamilySpec(
        name="qwen2",
        model_id="Qwen/Qwen2.5-0.5B-Instruct",
        chat_template=QWEN25_TEMPLATE,
        special_tokens=[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        added_tokens=[
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        generation_eos=["<|im_end|>", "<|endoftext|>"],
        generation_bos="<|endoftext|>",
        generation_pad="<|endoftext|>",
        config_eos=["<|im_end|>"],
        pre_tokenizer="bytelevel",
        closes_turn="<|im_end|>",
        model_max_length=131072,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "gemma": FamilySpec(
        name="gemma",
        model_id="google/gemma-2-2b-it",
        chat_template=GEMMA_TEMPLATE,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
        leading_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        generation_eos=["<eos>", "<end_of_turn>"],
        generation_bos="<bos>",
        generation_pad="<pad>",
        config_pad="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        pre_tokenizer="metaspace",
        closes_turn="<end_of_turn>",
        padding_side="left",
        model_max_length=HUGE,
        assistant_role="model",
        system_role=False,
    ),
    "mistral": FamilySpec(
        name="mistral",
        model_id="mistralai/Mistral-7B-Instruct-v0.2",
        chat_template=MISTRAL_V02_TEMPLATE,
        special_tokens=["<unk>", "<s>", "</s>"],
        leading_tokens=["<unk>", "<s>", "</s>"],
        bos="<s>",
        eos="</s>",
        pad=None,
        unk="<unk>",
        generation_eos=["</s>"],
        generation_bos="<s>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
        pre_tokenizer="metaspace",
        closes_turn="</s>",
        tie_word_embeddings=False,
        padding_side="left",
        model_max_length=HUGE,
    ),
    "phi3": FamilySpec(
        name="phi3",
        model_id="microsoft/Phi-3-mini-4k-instruct",
        chat_template=PHI3_TEMPLATE,
        special_tokens=[
            "<unk>",
            "<s>",
            "<|endoftext|>",
            "<|assistant|>",
            "<|placeholder1|>",
            "<|placeholder2|>",
            "<|placeholder3|>",
            "<|placeholder4|>",
            "<|system|>",
            "<|end|>",
            "<|placeholder5|>",
            "<|placeholder6|>",
            "<|user|>",
        ],
        added_tokens=["</s>"],  # special=False in the released tokenizer_config.json
        leading_tokens=["<unk>", "<s>", "</s>"],
        rstrip_tokens=[
            "</s>",
            "<|assistant|>",
            "<|placeholder1|>",
            "<|placeholder2|>",
            "<|placeholder3|>",
            "<|placeholder4|>",
            "<|system|>",
            "<|end|>",
            "<|placeholder5|>",
            "<|placeholder6|>",
            "<|user|>",
        ],
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        generation_bos="<s>",
        generation_pad="<|endoftext|>",
        config_eos=["<|endoftext|>"],
        config_pad="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        legacy=False,
        pre_tokenizer="metaspace",
        closes_turn="<|end|>",
        tie_word_embeddings=False,
        padding_side="left",
        model_max_length=4096,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    texts: list[str] = []
    for path in sorted(SAMPLE_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts += [row["dialogue"], row["summary"]]
    texts += [INSTRUCTION, "user assistant system model", "Cutting Knowledge Date: December 2023"]
    texts += ["[INST] [/INST]"] * 50  # Mistral's [INST] markers are plain text: give them pieces
    texts += [s.default_system for s in SPECS.values() if s.default_system]
    return tuple(texts)


def _ordered_tokens(spec: FamilySpec) -> list[str]:
    """Every added token of the family, in id order (specials and plain added tokens interleaved as released)."""
    if spec.name == "phi3":  # </s> sits at id 2, between <s> and the 32000+ block
        return ["<unk>", "<s>", "</s>"] + spec.special_tokens[2:]
    return list(spec.special_tokens) + list(spec.added_tokens)


def _pipeline(spec: FamilySpec):
    """The family's normaliser, pre-tokenizer and decoder (as the released tokenizer / transformers 5 builds them)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    normalizer = None
    if spec.name == "llama3":
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        decoder = decoders.ByteLevel()
    elif spec.name == "qwen2":
        normalizer = normalizers.NFC()
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        decoder = decoders.ByteLevel()
    elif spec.name == "smollm2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        decoder = decoders.ByteLevel()
    elif spec.name == "gemma":
        # No dummy prefix; spaces become "▁" in the normaliser (GemmaTokenizer in transformers 5).
        normalizer = normalizers.Replace(" ", "▁")
        pre = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:  # mistral, phi3: the Llama-2 SentencePiece tokenizer (LlamaTokenizer in transformers 5)
        scheme = "always" if spec.legacy else "first"
        pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return normalizer, pre, decoder


@functools.cache
def _tokenizer_json(name: str, vocab_size: int) -> str:
    """Train the family's tiny BPE and return its tokenizer.json (cached: building a family twice is cheap)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    spec = SPECS[name]
    metaspace = spec.pre_tokenizer == "metaspace"
    ordered = _ordered_tokens(spec)
    normalizer, pre, decoder = _pipeline(spec)

    # 1. Learn merges on the sample (never the special tokens).
    texts = list(_corpus())
    if metaspace:
        if name != "gemma":  # Llama-2's vocabulary has no newline piece: "\n" is the byte token <0x0A>
            texts = [t.replace("\n", " ") for t in texts]
        trainer_pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        if name == "gemma":  # Gemma's newline pieces ("\n", "\n\n", ...) stand alone
            trainer_pre = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"), trainer_pre]
            )
        n_train = vocab_size - len(ordered) - 256
        alphabet: list[str] = []
    else:
        trainer_pre = pre
        n_train = vocab_size - len(ordered)
        alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte encodes: no unknown text
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizer if name == "qwen2" else None
    learner.pre_tokenizer = trainer_pre
    learner.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=max(n_train, 1), initial_alphabet=alphabet, show_progress=False),
    )
    learned = json.loads(learner.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    # 2. Lay out the vocabulary as the family does: leading control tokens, byte tokens, learned pieces.
    vocab: dict[str, int] = {}
    for token in spec.leading_tokens:
        vocab[token] = len(vocab)
    if metaspace:
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)

    model = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=spec.unk if metaspace else None,
        byte_fallback=metaspace,
        fuse_unk=metaspace,
        ignore_merges=name == "llama3",
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoder

    # 3. Added tokens, in id order (those already in the vocabulary keep their ids).
    specials = set(spec.special_tokens)
    for token in ordered:
        tok.add_tokens(
            [
                AddedToken(
                    token,
                    special=token in specials,
                    normalized=False,
                    lstrip=False,
                    rstrip=token in spec.rstrip_tokens,
                    single_word=False,
                )
            ]
        )

    # 4. Post-processor: what `tokenizer(text)` adds (the chat path uses add_special_tokens=False).
    if spec.name == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif spec.add_bos_token or spec.name == "llama3":
        bos = spec.bos
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok.to_str()


def build_tokenizer(name: str, vocab_size: int = 600):
    """The family's tokenizer (a `PreTrainedTokenizerFast`), chat template included; not saved anywhere."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[name]
    named = {spec.bos, spec.eos, spec.pad, spec.unk}
    kwargs = {}
    if spec.add_bos_token is not None:
        kwargs["add_bos_token"] = spec.add_bos_token
    if spec.add_eos_token is not None:
        kwargs["add_eos_token"] = spec.add_eos_token
    if spec.legacy is not None:
        kwargs["legacy"] = spec.legacy
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(name, vocab_size)),
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        extra_special_tokens=[t for t in spec.special_tokens if t not in named],
        chat_template=spec.chat_template,
        model_max_length=spec.model_max_length,
        padding_side=spec.padding_side,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Model folder
# ---------------------------------------------------------------------------------------------------------


def _ids(tokenizer, tokens: list[str]) -> int | list[int] | None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids  # a single id is written as an int, as the released files do


# The family's own architecture (Phi-3's fused qkv_proj and gate_up_proj, Gemma's scaled embeddings,
# Qwen2's attention biases), so generation and LoRA targets are exercised on each.
ARCHITECTURE_NAMES = {
    "llama3": "LlamaConfig",
    "smollm2": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "gemma": "GemmaConfig",
    "mistral": "MistralConfig",
    "phi3": "Phi3Config",
}
# LoRA targets for a family whose layers are not named like Llama's
LORA_TARGETS = {"phi3": ["qkv_proj", "o_proj"]}


def build_family(name: str, out_dir: Path, vocab_size: int = 600) -> Path:
    """Writes a Hugging Face model folder (tokenizer files with the chat template, config.json,
    model.safetensors, generation_config.json) of a tiny random-weight model of the family's own
    architecture (2 layers, hidden 64, 4 heads of 16, 2 kv heads, intermediate 128,
    torch.manual_seed(0)) whose vocab_size == len(tokenizer), and returns out_dir."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = SPECS[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(name, vocab_size)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 neither saves nor reads add_bos_token/add_eos_token when a tokenizer.json is present (the
    # post-processor decides); write them anyway, as the released tokenizer_config.json declares them.
    declared = {
        k: v for k, v in (("add_bos_token", spec.add_bos_token), ("add_eos_token", spec.add_eos_token)) if v is not None
    }
    if declared:
        config_path = out_dir / "tokenizer_config.json"
        config_path.write_text(json.dumps({**declared, **json.loads(config_path.read_text())}, indent=2) + "\n")

    bos = tokenizer.convert_tokens_to_ids(spec.generation_bos) if spec.generation_bos else None
    config = getattr(transformers, ARCHITECTURE_NAMES[name])(
        vocab_size=len(tokenizer),
        hidden_size=64,  # a multiple of 64: bitsandbytes quantises in blocks of 64
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=_ids(tokenizer, spec.config_eos or spec.generation_eos),
        pad_token_id=_ids(tokenizer, [spec.config_pad] if spec.config_pad else []),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos,
        eos_token_id=_ids(tokenizer, spec.generation_eos),
        pad_token_id=_ids(tokenizer, [spec.generation_pad] if spec.generation_pad else []),
    )
    model.save_pretrained(out_dir)
    return out_dir


__all__ = [
    "FAMILIES",
    "LORA_TARGETS",
    "MISTRAL_V02_ORIGINAL_TEMPLATE",
    "SPECS",
    "FamilySpec",
    "build_family",
    "build_tokenizer",
]
