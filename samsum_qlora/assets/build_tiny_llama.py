"""Builds `tiny-llama/`: the embedded default's model, shipped in the repo (a few hundred KB).

A Llama-architecture model with random weights, briefly pre-trained on the sample dialogues, and
a byte-level BPE tokenizer trained on the sample dialogues beside it, with Llama 3's pre-tokenizer,
special tokens and the Llama 3.2 chat template, so that every code path (chat template, BOS,
<|eot_id|>, pad id, 4-bit loading, LoRA on q/k/v/o) is the real model's, only small. Rerun it
with `python -m samsum_qlora.assets.build_tiny_llama`.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "tiny-llama"
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]
# Llama 3's pre-tokenizer split (from Meta's tokenizer.json).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The Llama 3.2 Instruct chat template, tool-calling branches left out (we never pass tools).
CHAT_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def corpus() -> list[str]:
    texts = []
    for path in sorted((HERE / "samsum-sample").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["dialogue"], row["summary"]]
    texts += ["Summarize the following dialogue in one or two sentences.", "Cutting Knowledge Date: December 2023"]
    return texts


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown text
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",  # as in Meta's Instruct tokenizer_config.json
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # a multiple of 64: bitsandbytes quantises in blocks of 64
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama 3.2
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=False
    )
    return model


def pretrain(model, tokenizer, steps: int = 300) -> None:
    """A few hundred steps of plain language modelling on the *dialogues* of the train sample
    (never the summaries, never the chat format), so the base model writes words rather than
    noise, and fine-tuning has something to teach: the task, the format and when to stop."""
    import torch

    texts = []
    for line in (HERE / "samsum-sample" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["dialogue"])
    stream = [i for t in texts for i in tokenizer(t)["input_ids"]]
    block = 64
    blocks = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")
    model.eval()


def main() -> None:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    pretrain(model, tokenizer)
    OUT.mkdir(exist_ok=True)
    tokenizer.save_pretrained(OUT)
    model.save_pretrained(OUT)
    print(f"wrote {OUT}: vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
