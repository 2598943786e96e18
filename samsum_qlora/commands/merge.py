"""`samsum-qlora merge`: fold LoRA adapters into the base weights, check, then publish.

The merge happens in float32, never in 4 bits (adding the LoRA product into dequantised, then
requantised NF4 weights would shift the outputs) and never in bf16, whose rounding alone moves
merged logits about as much as a small adapter's whole effect. In float32 merged and unmerged
logits agree to ~1e-5. Before anything is written, the merged model's logits on a few probe
prompts must match base + adapters (unmerged) within MAX_ABS_DIFF; otherwise nothing is saved.
The weights are then stored in --dtype (default: the base checkpoint's own, bf16 for Llama 3.2).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from samsum_qlora import batching, chat, files, layout, model_card, modeling, runtime
from samsum_qlora.config import DTYPES, Config, with_overrides
from samsum_qlora.errors import UserError

# Max |merged - unmerged| over the float32 probe logits: the two orders of summation agree to
# ~1e-6 relative, so 1e-3 leaves room on logits of ~10-30.
MAX_ABS_DIFF = 1e-3
PROBE_DIALOGUES = (  # short, SAMSum-like: the chat template and a dialogue, as in evaluation
    "Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nAmanda: I'll bring you tomorrow :-)",
    "Olivia: Who are you voting for in this election?\nOliver: Liberals as always.\nOlivia: Me too!!",
    "Tim: Hi, what's up?\nKim: Bad mood tbh, I was going to do lots of stuff but ended up procrastinating\n"
    "Tim: What did you plan on doing?\nKim: Oh you know, uni stuff and unfucking my room",
)


def stored_dtype(checkpoint_config, asked: str | None) -> str:
    """--dtype if given, else the base checkpoint's own dtype when it is one we store, else bf16."""
    if asked is not None:
        return asked
    own = str(getattr(checkpoint_config, "dtype", None) or "").removeprefix("torch.")
    return own if own in DTYPES else "bfloat16"


def probe_batch(fmt: chat.ChatFormat):
    """Right-padded prompt ids and mask; only unpadded positions are compared."""
    return batching.pad([fmt.prompt(d) for d in PROBE_DIALOGUES], fmt.pad_id)


def logits(model, input_ids, mask):
    """float32 logits at the real (unpadded) positions, flattened to (tokens, vocab)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    return out.float()[mask.to(device).bool()]


def base_config(adapters: Path, cfg: Config | None) -> tuple[Config, str]:
    """The config naming the base: the one given, else the adapters' own adapter_config.json."""
    if cfg is not None:
        return cfg, "the config"
    base, revision = layout.adapter_base(adapters)
    if layout.is_local(base) and not Path(base).expanduser().exists():
        raise UserError(
            f"the adapters' base {base} is not here (relative to another folder?); "
            "pass --config or --set model.name=PATH"
        )
    return with_overrides(Config(), {"model": {"name": base, "revision": revision}}), str(
        adapters / layout.ADAPTER_CONFIG
    )


@contextlib.contextmanager
def exact_float32():
    import torch

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 matmuls would blur the float32 check
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def merge_adapters(adapters: Path, out: Path, *, cfg: Config | None = None, dtype: str | None = None) -> dict:
    """Merge `adapters` into their base and save the result to `out` (a new or empty folder)."""
    # --- check the inputs before loading anything, and claim --out ---
    if not adapters.is_dir():
        raise UserError(f"--adapters {adapters} is not a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a new folder")
    files.check_can_create(out)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg, source = base_config(adapters, cfg)
    layout.check_adapters_base(adapters, cfg.model.name)
    modeling.check_adapters_fit(adapters, cfg.model.name, modeling.read_config(cfg.model))
    with files.hold(layout.merge_lock(out), "merge", out):  # a second merge into --out is refused, naming this one
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not empty; choose a new folder")
        return _merge(adapters, out, cfg, source, dtype)


def _merge(adapters: Path, out: Path, cfg: Config, source: str, dtype: str | None) -> dict:
    from transformers import AutoConfig

    from samsum_qlora import __version__

    print(f"base: {cfg.model.name} (from {source}), merged in float32 on {runtime.device_name()}; adapters: {adapters}")
    f32 = with_overrides(cfg, {"quantization": {"load_in_4bit": False, "bnb_4bit_compute_dtype": "float32"}})

    # --- base, then base + adapters, then merged: logits on the same probe prompts ---
    with exact_float32():
        fmt = modeling.chat_format(cfg)
        # the checkpoint's own dtype, read before loading (the loaded config says float32)
        target = stored_dtype(AutoConfig.from_pretrained(cfg.model.name, revision=cfg.model.revision), dtype)
        model = modeling.load_model(f32.model, f32.quantization, training=False).eval()
        modeling.check_vocabulary(model, fmt.tokenizer)  # as eval checks: the probe's ids must be embedded
        input_ids, mask = probe_batch(fmt)
        base_logits = logits(model, input_ids, mask)
        model = modeling.attach_saved_adapters(model, adapters, cfg.model.name)
        unmerged = logits(model, input_ids, mask)
        merged_model = model.merge_and_unload()
        merged = logits(merged_model, input_ids, mask)
    info = verify(merged, unmerged, base_logits)
    if target != "float32":
        # Storage, not the merge: what rounding the merged weights to `target` costs on the probe.
        merged_model = modeling.cast_parameters(merged_model, modeling.torch_dtype(target))
        rounding = (logits(merged_model, input_ids, mask) - unmerged).abs().max().item()
        print(f"stored in {target}: rounding the merged weights moves the probe logits by up to {rounding:.3e}")
        info["storage_rounding_max_abs"] = rounding

    # --- save: stage, then rename into place ---
    info |= {
        "base_model": cfg.model.name,
        "base_revision": cfg.model.revision,
        "adapters": str(adapters),
        "merged_in": "float32",
        "stored_dtype": target,
        "samsum_qlora": __version__,
    }
    with contextlib.suppress(OSError):
        out.rmdir()  # an empty folder: make room for the rename
    with files.disk_full_is_user_error(out.parent, "saving the merged model"), files.staged_dir(out) as staging:
        merged_model.save_pretrained(staging)
        fmt.tokenizer.save_pretrained(staging)
        files.write_json(staging / layout.MERGE_INFO, info)
        model_card.write(staging, cfg, adapters)  # README.md: the Hub's model card
    print(f"saved the merged model to {out}")
    return info


def verify(merged, unmerged, base_logits) -> dict:
    """The merged model must compute what base + adapters compute, or nothing is written."""
    max_diff = (merged - unmerged).abs().max().item()
    effect = (unmerged - base_logits).abs().max().item()
    print(
        f"max |merged - (base + adapters)| over {merged.shape[0]} probe tokens x {merged.shape[1]} logits: "
        f"{max_diff:.3e} (tolerance {MAX_ABS_DIFF:.0e}, float32); the adapters move logits by up to {effect:.3e}"
    )
    if not max_diff <= MAX_ABS_DIFF:
        raise UserError(
            f"merged model differs from base + adapters by {max_diff:.3e} > {MAX_ABS_DIFF:.0e}; nothing written"
        )
    if effect == 0:
        print("warning: the adapters do not change the base's logits (untrained adapters?)")
    return {
        "max_abs_diff": max_diff,
        "tolerance": MAX_ABS_DIFF,
        "adapter_effect_max_abs": effect,
        "storage_rounding_max_abs": None,
        "probe_tokens": int(merged.shape[0]),
    }
