"""Our model as a summarizer: the chat format, the prompts, the batches and the model that `eval` and
`bench` share, so the speed `bench` measures is the speed of the code `eval` runs.

`Summarizer` loads once (the base, dequantised NF4 on the fast path, with the adapters merged or
attached unless scoring the base alone) and decodes many prompts in batches; `local_predictor`
wraps it as the `predictor.Predict` an evaluation calls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from samsum_qlora import batching, generation, layout, modeling
from samsum_qlora.config import Config
from samsum_qlora.errors import UserError
from samsum_qlora.predictor import Predict, Prediction, Save


class Summarizer:
    def __init__(self, cfg: Config, adapters: Path | None):
        check_context(cfg)
        self.cfg, self.adapters = cfg, adapters
        self.fmt = modeling.chat_format(cfg)
        self.decoding = generation.Decoding(
            cfg.eval.max_new_tokens, self.fmt.stop_ids, self.fmt.pad_id, **cfg.eval.decoding()
        )
        self.model = None

    def prompts(self, dialogues: list[str]) -> list[list[int]]:
        """Prompt ids, the dialogue's tail cut to fit data.max_length, as in training."""
        return self.fitted_prompts(dialogues)[0]

    def fitted_prompts(self, dialogues: list[str]) -> tuple[list[list[int]], list[bool]]:
        """`prompts(dialogues)`, and which dialogues were cut; how many is said on stderr."""
        fitted = [self.fmt.fit_prompt(d) for d in dialogues]
        cut = [truncated for _, truncated in fitted]
        if any(cut):
            print(
                f"warning: {sum(cut)} of {len(cut)} dialogues are longer than data.max_length={self.fmt.max_length} "
                'tokens with the prompt: only their beginning is summarised (their records say "truncated": true)',
                file=sys.stderr,
            )
        return [ids for ids, _ in fitted], cut

    def batches(self, prompts: list[list[int]], *, rank: int = 0, processes: int = 1) -> list[list[int]]:
        """The batches one process would generate, longest first; with `processes` > 1, only
        batches rank, rank + N, ...: each padded exactly as one process would pad it. Beam search
        keeps num_beams rows of cache per prompt, so its batches hold num_beams times fewer prompts."""
        e = self.cfg.eval
        lengths = [len(p) for p in prompts]
        budget = e.max_tokens_per_batch // e.num_beams
        every = batching.generation_batches(
            lengths, max_rows=e.batch_size, max_tokens=budget, new_tokens=e.max_new_tokens
        )
        return every[rank::processes]

    def load(self):
        """The generation model, loaded on first use and checked against the tokenizer."""
        if self.model is None:
            c = self.cfg
            self.model = modeling.load_generation_model(
                c.model, c.quantization, self.adapters, merge=c.eval.merge_adapters
            )
            modeling.check_vocabulary(self.model, self.fmt.tokenizer)
        return self.model

    def generate(
        self,
        prompts: list[list[int]],
        batches: list[list[int]],
        on_batch: Callable[[list[int], list[generation.Decoded]], None],
        *,
        keys: list[int] | None = None,
        progress: bool = True,
    ) -> None:
        """Decode `batches` of `prompts`; `keys` (the rows' indices) seed sampled batches."""
        generation.generate(
            self.load(),
            prompts,
            batches,
            self.decoding,
            graphs=self.cfg.eval.cuda_graphs,
            on_batch=on_batch,
            progress=progress,
            keys=keys,
        )

    def text(self, decoded: generation.Decoded, *, truncated: bool = False) -> Prediction:
        return Prediction(self.fmt.decode(decoded.ids), decoded.ended, truncated)


def adapters_to_use(cfg: Config, adapters: str | None, base_only: bool) -> Path | None:
    """The adapters `eval` and `summarize` generate with: --adapters, else <train.output_dir>/lora_adapters;
    None with --base-only (a base or merged model alone). Checked before any model loads."""
    if base_only and adapters:
        raise UserError("--base-only and --adapters contradict each other: give one")
    if base_only:
        return None
    folder = Path(adapters) if adapters else layout.RunDir(Path(cfg.train.output_dir)).adapters
    if not folder.is_dir():
        raise UserError(
            f"adapters not found: {folder} (train first, pass --adapters DIR, or --base-only for the base or a "
            "merged model alone)"
        )
    # said now, not after loading the model: adapters at all, whole, and for this base
    layout.check_adapters_base(folder, cfg.model.name)
    layout.check_adapter_weights(folder)
    return folder


def check_context(cfg: Config) -> None:
    """A prompt (up to data.max_length tokens) and eval.max_new_tokens must fit the model's positions:
    past them a model writes nonsense, or the cache for billions of tokens takes all memory."""
    positions = getattr(modeling.read_config(cfg.model), "max_position_embeddings", None)
    d, e = cfg.data, cfg.eval
    if positions and d.max_length + e.max_new_tokens > positions:
        room = f"at most {positions - d.max_length}" if positions > d.max_length else "none"
        raise UserError(
            f"eval.max_new_tokens={e.max_new_tokens} does not fit {cfg.model.name}: it has {positions:,} "
            f"positions and a prompt may take data.max_length={d.max_length} of them, leaving {room} for the "
            "summary; lower eval.max_new_tokens (or data.max_length)"
        )


def local_predictor(cfg: Config, adapters: Path | None, *, rank: int = 0, processes: int = 1) -> Predict:
    """Our own model as a `Predict`. With `processes` > 1, this process's share of the batches."""

    def predict(rows: list[dict], save: Save) -> None:
        summarizer = Summarizer(cfg, adapters)
        prompts, cut = summarizer.fitted_prompts([r["dialogue"] for r in rows])
        batches = summarizer.batches(prompts, rank=rank, processes=processes)
        if not batches:
            return  # fewer batches than processes: nothing for this one, so no model to load

        def on_batch(indices, decoded):
            save(indices, [summarizer.text(d, truncated=cut[i]) for i, d in zip(indices, decoded)])

        summarizer.generate(prompts, batches, on_batch, keys=[r["index"] for r in rows], progress=rank == 0)

    return predict
