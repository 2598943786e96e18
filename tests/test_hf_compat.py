"""The private surface samsum_qlora.hf_compat leans on still exists and behaves as its docstrings say,
one test per touch point, on a tiny random Llama on the CPU: on a transformers, peft or accelerate
upgrade, this file says what moved."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import TINY_MODEL

from samsum_qlora import hf_compat, training
from samsum_qlora.generation import SlotCache

LAYERS = 2


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))


def trainer_for(model, tmp_path, trainer_class=None, **args):
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **args)
    return (trainer_class or Trainer)(model=model, args=arguments)


def with_adapters():
    """A fresh tiny Llama with LoRA adapters (peft changes the model it wraps)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


# --- loading ---------------------------------------------------------------------------------------


def test_from_pretrained_reads_use_kernels_and_would_turn_hub_kernels_on(monkeypatch):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    asked = []
    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", lambda self, use, *a, **kw: asked.append(use))
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    AutoModelForCausalLM.from_pretrained(TINY_MODEL, **hf_compat.NO_HUB_KERNELS)
    assert asked == [True, False]  # on by default; our keyword turns it off


def test_attn_implementation_is_what_every_layer_dispatches_to(llama, ids):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("hf_compat_probe", counting)
    assert hf_compat.attn_implementation(llama.config) == "sdpa"
    want = llama(input_ids=ids).logits
    hf_compat.set_attn_implementation(llama.config, "hf_compat_probe")
    try:
        got = llama(input_ids=ids).logits
    finally:
        hf_compat.set_attn_implementation(llama.config, "sdpa")
    assert len(calls) == LAYERS
    llama(input_ids=ids)
    assert len(calls) == LAYERS  # back on SDPA: the probe is no longer called
    torch.testing.assert_close(got, want)


def test_llama_attention_calls_the_module_rope_that_use_llama_rope_rebinds(llama, ids, monkeypatch):
    from transformers.models.llama import modeling_llama

    rope = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rope)  # given back after the test
    calls = []

    def counting(q, k, cos, sin, *args, **kwargs):
        calls.append(q.shape)
        return rope(q, k, cos, sin, *args, **kwargs)

    want = llama(input_ids=ids).logits
    hf_compat.use_llama_rope(counting)
    got = llama(input_ids=ids).logits
    assert len(calls) == LAYERS
    torch.testing.assert_close(got, want)


# --- the Trainer -----------------------------------------------------------------------------------


def test_n_gpu_is_the_private_count_and_stays_written(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.n_gpu == 0  # read first, as training_arguments does: the devices are set up
    hf_compat.train_on_one_gpu(args)
    assert args.device.type == "cpu"  # asking again sets nothing up anew
    assert args.n_gpu == 1


def test_overridden_trainer_methods_are_the_trainers_own_with_our_signature():
    from transformers import Trainer

    source = inspect.getsource(Trainer)
    for name in hf_compat.OVERRIDDEN_TRAINER_METHODS:
        ours, theirs = getattr(training.LossTrainer, name), getattr(Trainer, name)
        assert ours is not theirs
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)
        assert f"self.{name}(" in source  # the Trainer still calls it


def test_loss_trainer_overrides_no_other_private_trainer_method():
    """A private helper of ours that the Trainer also defines would replace the Trainer's silently."""
    from transformers import Trainer

    shadowing = {
        n for n in vars(training.LossTrainer) if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)
    }
    assert shadowing == set(hf_compat.OVERRIDDEN_TRAINER_METHODS)


def test_track_num_input_tokens_is_what_counts_the_trained_tokens(llama, tmp_path):
    trainer = trainer_for(llama, tmp_path, include_num_input_tokens_seen="non_padding")
    trainer._track_num_input_tokens({"input_ids": torch.ones(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 0]] * 2)})
    assert trainer.state.num_input_tokens_seen == 6


def test_prepare_inputs_keeps_every_key_and_moves_tensors_to_the_device(llama, tmp_path):
    trainer = trainer_for(llama, tmp_path)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), training.TRAINED_AT: torch.tensor([1, 4])}
    prepared = hf_compat.prepare_inputs(trainer, batch)
    assert set(prepared) == set(batch)  # keys the model does not take survive: the loss pops them
    assert all(t.device == trainer.args.device for t in prepared.values())
    assert prepared[training.TRAINED_AT].tolist() == [1, 4]


def test_the_graphed_steps_loss_rule_is_the_trainers(llama, tmp_path):
    """The CUDA-graph step runs where the model takes loss kwargs and `loss_is_scaled_for_ga` is not
    False, and then leaves the loss undivided by the accumulation steps: so does Trainer.training_step."""
    from transformers import Trainer

    class FixedLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return torch.tensor(6.0, requires_grad=True)

    trainer = trainer_for(llama, tmp_path, FixedLoss, gradient_accumulation_steps=2)
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop

    def step() -> float:
        return float(trainer.training_step(llama, {"input_ids": torch.ones(1, 2, dtype=torch.long)}, 3))

    assert hf_compat.model_accepts_loss_kwargs(trainer) is True
    assert hf_compat.loss_is_scaled_for_ga(trainer) is None
    assert step() == 6.0
    trainer.loss_is_scaled_for_ga = False
    assert hf_compat.loss_is_scaled_for_ga(trainer) is False
    assert step() == 3.0
    trainer.loss_is_scaled_for_ga = None
    trainer.model_accepts_loss_kwargs = False
    assert hf_compat.model_accepts_loss_kwargs(trainer) is False
    assert step() == 3.0


def test_load_best_model_loads_the_best_checkpoints_adapters(tmp_path):
    model = with_adapters()
    best = tmp_path / "checkpoint-2"
    model.save_pretrained(best)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = trainer_for(model, tmp_path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.zero_()
    trainer.state.best_model_checkpoint = str(best)
    hf_compat.load_best_model(trainer)
    assert saved and all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if "lora_" in n)


def test_progress_callback_keeps_its_bar_where_readable_progress_reads_it(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    callback = ProgressCallback()
    assert getattr(callback, hf_compat.PROGRESS_BAR) is None
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state = TrainerState(max_steps=3, is_world_process_zero=True)
    callback.on_train_begin(args, state, TrainerControl())
    try:
        assert callable(getattr(callback, hf_compat.PROGRESS_BAR).write)
    finally:
        callback.on_train_end(args, state, TrainerControl())
    assert issubclass(training.ReadableProgress, ProgressCallback)


# --- decoding --------------------------------------------------------------------------------------


def test_slot_cache_has_the_cache_protocol_with_transformers_signatures():
    from transformers import Cache, DynamicCache

    for name in hf_compat.CACHE_PROTOCOL:
        ours = inspect.signature(getattr(SlotCache, name)).parameters
        for library in (Cache, DynamicCache):
            theirs = inspect.signature(getattr(library, name)).parameters
            assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()], name


class Recording:
    """A cache seen through: the names the model asks it for."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "asked", set())

    def __getattr__(self, name):
        self.asked.add(name)
        return getattr(self.inner, name)


def test_the_decoder_forward_asks_a_cache_for_the_protocol_and_nothing_else(llama, ids):
    cache = SlotCache(16, False, "cpu", rows=2)
    seen = Recording(cache)
    with torch.no_grad():
        llama(input_ids=ids, use_cache=True, **{hf_compat.cache_keyword(llama): seen})
        cache.advance(ids.shape[1])
        step = {hf_compat.cache_keyword(llama): seen}
        llama(input_ids=ids[:, :1], position_ids=torch.full((2, 1), 5), use_cache=True, **step)
    assert seen.asked - set(hf_compat.CACHE_OPTIONAL) == set(hf_compat.CACHE_PROTOCOL)
    assert not any(hasattr(SlotCache, name) for name in hf_compat.CACHE_OPTIONAL)


def test_cache_keyword_names_the_parameter_the_decoder_fills(llama, ids):
    from transformers.models.llama.modeling_llama import LlamaModel

    keyword = hf_compat.cache_keyword(llama)
    assert keyword in inspect.signature(LlamaModel.forward).parameters
    assert hf_compat.cache_keyword(with_adapters()) == keyword  # through peft's wrapper too
    cache = SlotCache(16, False, "cpu", rows=2)
    with torch.no_grad():
        llama.base_model.forward(input_ids=ids, use_cache=True, **{keyword: cache})
    assert sorted(cache.keys) == list(range(LAYERS))  # every layer wrote its keys into our cache
    assert cache.keys[0].shape[-2] == ids.shape[1]


def test_sdpa_attention_forward_and_sdpa_mask_take_what_we_pass():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    head = ["module", "query", "key", "value", "attention_mask", "dropout", "scaling"]
    assert list(inspect.signature(sdpa_attention_forward).parameters)[: len(head)] == head
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask  # the mask our decode attention registers


def test_logits_warpers_take_no_input_ids():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = torch.tensor([[2.0, 1.0, 0.0]])
    torch.testing.assert_close(TemperatureLogitsWarper(0.5)(None, scores), scores / 0.5)
    assert torch.isinf(TopPLogitsWarper(0.5)(None, scores)).tolist() == [[False, True, True]]


# --- flags on models and layers --------------------------------------------------------------------


def test_a_4bit_load_sets_the_flag_mark_dequantized_clears():
    from transformers import AutoModelForCausalLM

    from samsum_qlora import modeling
    from samsum_qlora.config import QuantArgs

    four = AutoModelForCausalLM.from_pretrained(
        TINY_MODEL, quantization_config=modeling.quantization_config(QuantArgs()), device_map={"": "cpu"}
    )
    assert hf_compat.loaded_in_4bit(four) is True
    hf_compat.mark_dequantized(four)
    assert hf_compat.loaded_in_4bit(four) is False
    assert hf_compat.loaded_in_4bit(AutoModelForCausalLM.from_pretrained(TINY_MODEL)) is False


def test_peft_casts_adapter_inputs_until_told_not_to():
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Net().to(torch.bfloat16), LoraConfig(r=2, target_modules=["proj"]))
    lora_a = model.base_model.model.proj.lora_A["default"]
    assert lora_a.weight.dtype == torch.float32  # peft keeps adapters in float32 on a bf16 base
    seen = []
    lora_a.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    model(x)
    assert seen[-1] == torch.float32
    hf_compat.stop_adapter_input_casts(model)
    uncast = hf_compat.uncast_adapter_layers(model)
    assert uncast == [model.base_model.model.proj]
    with pytest.raises(RuntimeError):  # bf16 into the float32 adapter: training's autocast does this matmul
        model(x)
    assert seen[-1] == torch.bfloat16
    hf_compat.set_input_casts(uncast, True)
    model(x)
    assert seen[-1] == torch.float32


def test_accelerate_keeps_the_forward_it_wraps_in_autocast():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    class Probe(torch.nn.Module):
        def forward(self, x):
            return torch.tensor(float(torch.is_autocast_enabled("cpu")))

    model = Probe()
    assert hf_compat.forward_without_autocast(model) is None  # not wrapped
    AcceleratorState._reset_state(True)
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    finally:
        AcceleratorState._reset_state(True)  # the Trainers of later tests set up their own
    assert model(torch.ones(1)).item() == 1.0  # the wrapped forward runs in autocast
    plain = hf_compat.forward_without_autocast(model)
    assert plain.__func__ is Probe.forward
    assert plain(torch.ones(1)).item() == 0.0


def test_hub_kernels_pin_is_a_version_range():
    from packaging.version import Version

    lowest, excluded = hf_compat.hub_kernels_pin()
    assert Version(lowest) < Version(excluded)
    assert isinstance(hf_compat.hub_kernels_available(), bool)
