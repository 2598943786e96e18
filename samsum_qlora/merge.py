"""`samsum-qlora merge`: fold LoRA adapters into the base weights, check, then publish.

The merge happens in float32, never in 4 bits (adding the LoRA product into dequantised, then
requantised NF4 weights would shift the outputs) and never in bf16: there, merged and unmerged
logits of a Llama-3.2-1B-shaped model differ by ~0.16 (3.4% of the largest logit) from rounding
alone, as much as a small adapter's whole effect, so no bf16 tolerance is both safe and meaningful.
In float32 they agree to ~1e-5. Before anything is written, the merged model's logits on a few
probe prompts must match base + adapters (unmerged) within MAX_ABS_DIFF; otherwise nothing is
saved. The weights are then stored in --dtype (default: the base checkpoint's own, bf16 for Llama 3.2).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from samsum_qlora import files
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError

# Max |merged - unmerged| over the float32 probe logits: the two orders of summation agree to
# ~1e-6 relative (1.4e-5 measured on a 1B-shaped model), so 1e-3 leaves room on logits of ~10-30.
MAX_ABS_DIFF = 1e-3
DTYPES = ("bfloat16", "float16", "float32")  # what the merged weights may be stored in
PROBE_DIALOGUES = (  # short, SAMSum-like: the chat template and a dialogue, as in evaluation
    "Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)",
    "Olivia: Who are you voting for in this election?\nOliver: Liberals as always.\nOlivia: Me too!!",
    "Tim: Hi, what's up?\nKim: Bad mood tbh, I was going to do lots of stuff but ended up procrastinating\n"
    "Tim: What did you plan on doing?\nKim: Oh you know, uni stuff and unfucking my room",
)
MERGE_INFO = "merge.json"


def adapter_base(adapters: Path) -> tuple[str, str | None]:
    """(base model, revision) the adapters were trained on, from their adapter_config.json."""
    cfg_file = adapters / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError(f"{adapters} holds no LoRA adapters (no adapter_config.json)")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{cfg_file} is not valid JSON") from None
    base = meta.get("base_model_name_or_path") if isinstance(meta, dict) else None
    if not base:
        raise UserError(f"{cfg_file} names no base_model_name_or_path: pass --config (or --set model.name=...)")
    return base, meta.get("revision")


def stored_dtype(checkpoint_config, asked: str | None) -> str:
    """--dtype if given, else the base checkpoint's own dtype when it is one we store, else bf16."""
    if asked is not None:
        return asked
    own = str(getattr(checkpoint_config, "dtype", None) or "").removeprefix("torch.")
    return own if own in DTYPES else "bfloat16"


def probe_batch(tokenizer, cfg: Config):
    """Right-padded prompt ids and mask; only unpadded positions are compared."""
    import torch

    from samsum_qlora import data

    prompts = [
        data.encode_prompt(tokenizer, d, instruction=cfg.data.task_instruction, max_length=cfg.data.max_length,
                           date_string=cfg.data.date_string)
        for d in PROBE_DIALOGUES
    ]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), data.pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def logits(model, input_ids, mask):
    """float32 logits at the real (unpadded) positions, flattened to (tokens, vocab)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    return out.float()[mask.to(device).bool()]


def run(adapters: Path, out: Path, *, cfg: Config | None = None, dtype: str | None = None) -> dict:
    """Merge `adapters` into their base and save the result to `out` (a new or empty folder)."""
    import torch
    from transformers import AutoConfig

    from samsum_qlora import __version__, model as modeling

    # --- check the inputs before loading anything ---
    if not adapters.is_dir():
        raise UserError(f"--adapters {adapters} is not a folder")
    base, revision = adapter_base(adapters)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder")
    if cfg is None:
        looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1  # Hub ids have one slash
        if looks_local and not Path(base).expanduser().exists():
            raise UserError(f"the adapters' base {base} is not here (relative to another folder?); "
                            "pass --config or --set model.name=PATH")
        cfg = Config()
        cfg.model = dataclasses.replace(cfg.model, name=base, revision=revision)
        source = f"{adapters / 'adapter_config.json'}"
    else:
        source = "the config"
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # float32 through the one loader: 4-bit off, bf16 off.
    load_cfg = dataclasses.replace(
        cfg, quantization=dataclasses.replace(cfg.quantization, load_in_4bit=False),
        train=dataclasses.replace(cfg.train, bf16=False, fp16=False),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"base: {cfg.model.name} (from {source}), merged in float32 on {device}; adapters: {adapters}")

    # --- base, then base + adapters, then merged: logits on the same probe prompts ---
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 matmuls would blur the float32 check
    try:
        tokenizer = modeling.load_tokenizer(cfg.model.name, cfg.model.revision)
        # the checkpoint's own dtype, read before loading (the loaded config says float32)
        target = stored_dtype(AutoConfig.from_pretrained(cfg.model.name, revision=cfg.model.revision), dtype)
        model = modeling.load_model(load_cfg, training=False).eval()
        input_ids, mask = probe_batch(tokenizer, cfg)
        base_logits = logits(model, input_ids, mask)
        model = modeling.attach_saved_adapters(model, adapters, cfg.model.name)
        unmerged = logits(model, input_ids, mask)
        merged_model = model.merge_and_unload()
        merged = logits(merged_model, input_ids, mask)
    finally:
        torch.set_float32_matmul_precision(precision)

    # --- verify ---
    max_diff = (merged - unmerged).abs().max().item()
    effect = (unmerged - base_logits).abs().max().item()
    print(f"max |merged - (base + adapters)| over {merged.shape[0]} probe tokens x {merged.shape[1]} logits: "
          f"{max_diff:.3e} (tolerance {MAX_ABS_DIFF:.0e}, float32); the adapters move logits by up to {effect:.3e}")
    if not max_diff <= MAX_ABS_DIFF:
        raise UserError(f"merged model differs from base + adapters by {max_diff:.3e} > {MAX_ABS_DIFF:.0e}; nothing written")
    if effect == 0:
        print("warning: the adapters do not change the base's logits (untrained adapters?)")
    rounding = None
    if target != "float32":
        # Storage, not the merge: what rounding the merged weights to `target` costs on the probe.
        merged_model = modeling.cast_parameters(merged_model, modeling.torch_dtype(target))
        rounding = (logits(merged_model, input_ids, mask) - unmerged).abs().max().item()
        print(f"stored in {target}: rounding the merged weights moves the probe logits by up to {rounding:.3e}")

    # --- save: stage, then rename into place ---
    info = {
        "base_model": cfg.model.name, "base_revision": cfg.model.revision, "adapters": str(adapters),
        "merged_in": "float32", "stored_dtype": target, "max_abs_diff": max_diff, "tolerance": MAX_ABS_DIFF,
        "adapter_effect_max_abs": effect, "storage_rounding_max_abs": rounding,
        "probe_tokens": int(merged.shape[0]), "samsum_qlora": __version__,
    }
    parent = files.ensure_writable_dir(out.parent)
    staging = parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files.write_json(staging / MERGE_INFO, info)
        if out.exists():  # an empty folder: make room for the rename
            out.rmdir()
        files.publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"saved the merged model to {out}")
    return info
