"""`samsum-qlora export`: trained adapters -> merged (by merge's own code) -> GGUF files written by
llama.cpp's converter, an Ollama Modelfile and a model card, in one new folder.

--out/
  model-<outtype>.gguf   one per --outtype, the chat template (with the trained instruction as its
                         default system message) and BOS/EOS/end-of-turn inside
  Modelfile              `ollama create NAME -f Modelfile`: the instruction, stops, greedy decoding
  README.md              the model card (Hub format): base, licence, newest eval, training, usage
  merge.json             what merge measured (merged vs base + adapters)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from samsum_qlora import chat, choices, files, gguf_export, layout, model_card, modeling
from samsum_qlora.config import Config, with_overrides
from samsum_qlora.errors import UserError

MERGED = ".merged"  # inside the staging folder: the float32 merged model the converter reads, then removed


def export_config(adapters: Path, cfg: Config | None) -> Config:
    """The config given, else the run's config.yaml beside the adapters (the instruction and
    decoding they were trained and evaluated with), else the defaults on their recorded base."""
    if cfg is not None:
        return cfg
    base = layout.adapter_base(adapters)[0]
    return model_card.trained_config(adapters, with_overrides(Config(), {"model": {"name": base}}))


def check_inputs(adapters: Path, out: Path, outtypes: list[str]) -> None:
    if not adapters.is_dir():
        raise UserError(f"--adapters {adapters} is not a folder")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--out {out} exists; choose a new folder")
    files.check_can_create(out)
    unknown = [t for t in outtypes if t not in gguf_export.OUTTYPES]
    if unknown or not outtypes:
        raise UserError(f"--outtype must be among {', '.join(gguf_export.OUTTYPES)}, got {', '.join(unknown)}")


def export_gguf(
    adapters: Path,
    out: Path,
    *,
    merge: Callable[..., dict],
    cfg: Config | None = None,
    outtypes: list[str] = ("f16",),
    llama_cpp: str | None = None,
) -> dict:
    """Merge `adapters` with `merge` (merge's merge_adapters), convert, and publish `out` whole."""
    # --- refuse what cannot work before merging anything ---
    outtypes = list(dict.fromkeys(outtypes))
    check_inputs(adapters, out, outtypes)
    converter = gguf_export.find_converter(llama_cpp)
    cfg = export_config(adapters, cfg)
    base_config = modeling.read_config(cfg.model)
    modeling.check_adapters_fit(adapters, cfg.model.name, base_config)
    fmt = modeling.chat_format(cfg)  # refuses a template with no end-of-turn token
    print(f"exporting {adapters} on {cfg.model.name} to {out}: {', '.join(outtypes)}")
    gguf_export.check_converts(converter, base_config, fmt.tokenizer)

    with files.hold(layout.merge_lock(out), "export"):
        if out.is_dir():
            out.rmdir()  # empty, checked above: make room for the staged folder
        with files.disk_full_is_user_error(out.parent, "exporting"), files.staged_dir(out) as staging:
            merged = staging / MERGED
            info = merge(adapters, merged, cfg=cfg, dtype="float32")  # the converter rounds once, from float32
            written = convert_all(converter, merged, staging, outtypes, fmt)
            write_beside(staging, merged, cfg, fmt, adapters, written)
            shutil.rmtree(merged)
    print(f"exported {', '.join(g.name for g in written)} with a Modelfile and README.md to {out}")
    return info | {"gguf": {g.name: (out / g.name).stat().st_size for g in written}}


def convert_all(converter, merged: Path, staging: Path, outtypes: list[str], fmt: chat.ChatFormat) -> list[Path]:
    """Each outtype through llama.cpp's converter, after checking there is room for them all."""
    weights = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    needed = gguf_export.bytes_needed(weights, outtypes)
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise UserError(
            f"no room for the GGUFs in {staging.parent}: they need about {choices.size(needed)}, "
            f"{choices.size(free)} is free"
        )
    # the template inside the GGUF opens with the trained instruction as its default
    template = gguf_export.with_default_instruction(
        fmt.tokenizer.chat_template, fmt.instruction, system_role=fmt.system_role
    )
    gguf_export.set_chat_template(merged, template)
    written = []
    for outtype in outtypes:
        path = staging / gguf_export.gguf_name(outtype)
        gguf_export.convert(converter, merged, path, outtype)
        meta = gguf_export.read_back(path)
        gguf_export.check_end_of_turn(meta, fmt.end_of_turn, fmt.tokenizer.convert_ids_to_tokens(fmt.end_of_turn))
        written.append(path)
    return written


def stop_texts(fmt: chat.ChatFormat) -> list[str]:
    return [fmt.tokenizer.convert_ids_to_tokens(i) for i in fmt.stop_ids]


def write_beside(staging: Path, merged: Path, cfg: Config, fmt: chat.ChatFormat, adapters: Path, ggufs: list[Path]):
    """The Modelfile (on the first GGUF) and the card; merge.json moves up beside them."""
    meta = gguf_export.read_back(ggufs[0])
    stand_ins = chat.build_messages(
        gguf_export.DIALOGUE_STAND_IN, gguf_export.SYSTEM_STAND_IN, system_role=fmt.system_role
    )
    template = gguf_export.ollama_template(fmt.render(stand_ins, True), fmt.tokenizer.bos_token, meta["add_bos"])
    stops = stop_texts(fmt)
    files.write_text(
        staging / "Modelfile",
        gguf_export.modelfile(
            ggufs[0].name,
            template,
            fmt.instruction,
            stops,
            num_predict=cfg.eval.max_new_tokens,
            num_ctx=cfg.data.max_length + cfg.eval.max_new_tokens,
        ),
    )
    model_card.write(staging, cfg, adapters, ggufs=[g.name for g in ggufs], stops=stops)
    (merged / layout.MERGE_INFO).replace(staging / layout.MERGE_INFO)
