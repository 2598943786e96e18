import dataclasses
import json
import types

import pytest
import torch
from conftest import REFERENCE, SMOKE_CONFIG, TINY_MODEL, smoke_overrides

from samsum_qlora import choices, modeling
from samsum_qlora.config import Config, ModelArgs, load_config
from samsum_qlora.errors import UserError


def test_library_configs_from_ours():
    cfg = Config()
    bnb = modeling.quantization_config(cfg.quantization)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    lora = modeling.lora_config(cfg.lora)
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, {"q_proj", "k_proj", "v_proj", "o_proj"})


def lora_parameter_count(hidden: int, kv_dim: int, layers: int, r: int, targets) -> int:
    """Trainable LoRA parameters for q/k/v/o of a Llama: r x (in + out) per adapted matrix."""
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (hidden, hidden),
    }
    return layers * sum(r * sum(shapes[m]) for m in targets)


def with_adapters(cfg):
    base = modeling.load_model(cfg.model, cfg.quantization, training=True)
    return modeling.attach_new_adapters(
        base,
        cfg.lora,
        cfg.quantization,
        dequantize=modeling.dequantize_as_configured(base, cfg.quantization),
        gradient_checkpointing=False,
        half_precision=False,
    )


def test_real_llama_shape_has_1_7m_lora_parameters():
    path = REFERENCE / "llama-3.2-1b-instruct-shape" / "config.json"
    if not path.is_file():
        pytest.skip("../shared/reference is not here")
    c = json.loads(path.read_text())
    kv = c["num_key_value_heads"] * c["head_dim"]
    lora = Config().lora
    assert (
        lora_parameter_count(c["hidden_size"], kv, c["num_hidden_layers"], lora.lora_r, lora.target_modules)
        == 1_703_936
    )


def test_4bit_load_and_lora_count_on_tiny_model(tmp_path):
    import bitsandbytes as bnb

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"quantization.dequantize_once": False}))
    model = with_adapters(cfg)
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.quant_type == "nf4"
    c = base.config
    expected = lora_parameter_count(
        c.hidden_size, c.num_key_value_heads * c.head_dim, c.num_hidden_layers, cfg.lora.lora_r, cfg.lora.target_modules
    )
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected == 7168


def test_the_model_loads_without_hub_kernels(tmp_path, monkeypatch):
    """transformers 5.25 fetches layer kernels from the Hub at load by default: offline, loading on a
    GPU failed ("Version 2 of 'kernels-community/rotary' is not available in the local cache")."""
    from transformers import AutoModelForCausalLM

    asked = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        asked.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    model = modeling.load_model(cfg.model, cfg.quantization, training=False)
    assert asked["use_kernels"] is False
    assert not getattr(model, "use_kernels", False)


def test_dequantize_once_holds_exactly_the_nf4_weights(tmp_path):
    import bitsandbytes as bnb

    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    quantized = modeling.load_model(cfg.model, cfg.quantization, training=False)
    q4 = quantized.model.layers[1].mlp.down_proj
    assert isinstance(q4, bnb.nn.Linear4bit)
    expected = bnb.functional.dequantize_4bit(q4.weight.data, q4.weight.quant_state).float()
    plain = modeling.dequantize_base(quantized, "float32").model.layers[1].mlp.down_proj
    assert type(plain) is torch.nn.Linear and not plain.weight.requires_grad
    assert torch.equal(plain.weight, expected)
    # the plain layer computes what the 4-bit layer computes (a fresh load: bitsandbytes' CPU
    # kernel repacks the weight on its first call, and multiplies in bf16, hence the tolerance)
    x = torch.randn(3, q4.in_features)
    with torch.no_grad():
        y4 = modeling.load_model(cfg.model, cfg.quantization, training=False).model.layers[1].mlp.down_proj(x)
        assert ((plain(x) - y4).norm() / y4.norm()).item() < 1e-2
    # and the NF4 weights are not the float originals: the copy is of the quantised model
    plain = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"quantization.load_in_4bit": False}))
    full = modeling.load_model(plain.model, plain.quantization, training=False)
    assert not torch.equal(full.model.layers[1].mlp.down_proj.weight.float(), expected)


def test_cuda_only_settings_without_cuda_say_what_to_set():
    from samsum_qlora import training

    with pytest.raises(UserError, match="--set train.fp16=false"):
        training.check_precision(load_config(None, {"train.bf16": False, "train.fp16": True}).train, False, True)
    with pytest.raises(UserError, match="--set train.bf16=false"):
        training.check_precision(Config().train, cuda=False, cpu_bf16=False)
    training.check_precision(Config().train, cuda=True, cpu_bf16=False)  # fine on a GPU


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"model .*no-model does not exist \(give a model folder or a Hub id\)"):
        modeling.load_tokenizer(ModelArgs(name=str(tmp_path / "no-model")))


def test_generation_model_keeps_rope_frequencies_and_adapters_in_float32(tmp_path):
    """Eval's model computes in bf16, but RoPE's inverse frequencies rounded to bf16 turn every
    position's rotation a little (it halved greedy agreement with the per-example loop on a trained
    1B stand-in), and the adapters stay float32 as in the loop."""
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"quantization.bnb_4bit_compute_dtype": "bfloat16"}))
    with_adapters(cfg).save_pretrained(tmp_path / "adapters")
    model = modeling.load_generation_model(cfg.model, cfg.quantization, tmp_path / "adapters", merge=False)
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    weights = dict(model.named_parameters())
    assert {p.dtype for n, p in weights.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in weights.items() if "base_layer" in n} == {torch.bfloat16}  # the dequantised base


def test_cast_parameters_leaves_buffers_alone():
    from transformers import AutoModelForCausalLM

    model = modeling.cast_parameters(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32), torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")} == {torch.float32}


def test_auto_dequantises_only_what_leaves_half_the_free_memory():
    """quantization.dequantize_once=auto: the bf16 copy of an 8B model's layers (~14 GiB) does not
    fit beside its activations on a 24 GB card, the 1B's (~2.3 GiB) does; a CPU always dequantises."""
    from samsum_qlora.config import QuantArgs

    auto, gib = QuantArgs(), 2**30
    assert auto.dequantize_once == "auto"
    chosen, why = choices.should_dequantize(auto, int(2.3 * gib), int(20 * gib))
    assert chosen and "dequantised once (2.3 GiB in bfloat16, 20.0 GiB free on the GPU)" in why
    chosen, why = choices.should_dequantize(auto, 14 * gib, int(18.5 * gib))
    assert not chosen and "stays in 4 bits" in why
    assert choices.should_dequantize(auto, 14 * gib, None)[0]  # a CPU
    assert choices.should_dequantize(QuantArgs(dequantize_once=True), 14 * gib, gib) == (True, "")
    assert choices.should_dequantize(QuantArgs(dequantize_once="false"), 1, 100 * gib) == (False, "")
    assert choices.should_dequantize(QuantArgs(load_in_4bit=False), 1, 100 * gib) == (False, "")


def test_auto_counts_the_4bit_layers_in_the_compute_dtype(tmp_path):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    model = modeling.load_model(cfg.model, cfg.quantization, training=False)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    expected = sum(4 * m.weight.quant_state.shape.numel() for m in layers)  # float32: 4 bytes a weight
    assert layers and modeling.dequantized_bytes(model, "float32") == expected


@pytest.mark.parametrize(
    "targets, needle",
    [
        (["q_proj", "v_proj", "o_proj"], r"4 weights of the file have no module to go to \(e.g. .*k_proj.lora_A"),
        (
            ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
            r"4 adapted weights are not in the file \(e.g. .*up_proj",
        ),
    ],
)
def test_adapters_whose_config_was_edited_are_refused(tmp_path, targets, needle):
    """peft only warns when the file's weights and the adapted modules differ; scoring such a model as
    the adapters would report adapters with some of their weights dropped."""
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    adapters = tmp_path / "adapters"
    with_adapters(cfg).save_pretrained(adapters)
    modeling.load_generation_model(cfg.model, cfg.quantization, adapters, merge=False)  # whole before the edit
    meta = json.loads((adapters / "adapter_config.json").read_text())
    (adapters / "adapter_config.json").write_text(json.dumps({**meta, "target_modules": targets}))
    for merge in (False, True):
        with pytest.raises(UserError, match=r"do not match their adapter_config.json: " + needle):
            modeling.load_generation_model(cfg.model, cfg.quantization, adapters, merge=merge)


def test_auto_checkpointing_turns_on_only_when_activations_would_not_fit():
    """train.gradient_checkpointing=auto, with the activation bytes measured on the 1B: an 8B kept in
    4 bits on a 24 GB card (18.6 GiB free after loading) needs it; the 1B there does not; a CPU never."""
    from types import SimpleNamespace

    from samsum_qlora.config import TrainArgs

    gib, auto = 2**30, TrainArgs()
    assert auto.gradient_checkpointing == "auto"
    llama_8b = SimpleNamespace(num_hidden_layers=32, hidden_size=4096)
    llama_1b = SimpleNamespace(num_hidden_layers=16, hidden_size=2048)
    on, why = choices.should_checkpoint(auto, llama_8b, in_4bit=True, tokens=4096, free=int(18.6 * gib))
    assert on and "on, since a batch of 4,096 tokens would keep about 33.5 GiB of activations and 18.6 GiB is" in why
    off, why = choices.should_checkpoint(auto, llama_1b, in_4bit=False, tokens=4096, free=21 * gib)
    assert not off and "off, since a batch of 4,096 tokens would keep about 5.6 GiB of activations" in why
    assert choices.should_checkpoint(auto, llama_1b, in_4bit=False, tokens=4096, free=5 * gib)[0]  # an 8 GB card
    assert choices.should_checkpoint(auto, llama_8b, in_4bit=True, tokens=4096, free=None) == (False, "")
    forced = TrainArgs(gradient_checkpointing="false")
    assert choices.should_checkpoint(forced, llama_8b, in_4bit=True, tokens=4096, free=gib) == (False, "")


def test_graphs_get_room_for_a_second_batchs_activations():
    """training_model's room for CUDA graphs: twice a batch's activations within 90% of the free
    memory. The H200 runs in docs/performance.md had it (5.6 GiB and 8.4 GiB of 135-138 GiB); the
    1B on a 12 GB card (about 9 GiB free after loading) would not."""
    from types import SimpleNamespace

    gib = 2**30
    llama_1b = SimpleNamespace(num_hidden_layers=16, hidden_size=2048)
    dequantized = choices.activation_bytes(llama_1b, in_4bit=False, tokens=4096)
    four_bit = choices.activation_bytes(llama_1b, in_4bit=True, tokens=4096)
    assert round(dequantized / gib, 1) == 5.6 and round(four_bit / gib, 1) == 8.4  # what auto printed there
    assert choices.graphs_fit(dequantized, int(135.1 * gib)) and choices.graphs_fit(four_bit, int(137.7 * gib))
    assert not choices.graphs_fit(dequantized, 9 * gib)
    assert choices.graphs_fit(dequantized, None)  # a CPU: nothing to crowd (and no graphs)


def test_the_training_model_comes_with_its_checkpointing_decided(tmp_path, tokenizer):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"train.gradient_checkpointing": "auto"}))
    model, args, chosen = modeling.training_model(cfg, tokenizer)
    assert cfg.train.gradient_checkpointing == "auto" and args.gradient_checkpointing is False  # a CPU
    # the record the run follows: the same choices, each auto one decided (a CPU: the base dequantised)
    assert (chosen.gradient_checkpointing, chosen.cuda_graphs) == (args.gradient_checkpointing, args.cuda_graphs)
    assert chosen.dequantize_once is cfg.quantization.load_in_4bit
    assert not model.get_base_model().is_gradient_checkpointing


@pytest.mark.parametrize("cos_rows", [1, 3])  # positions shared by the rows, or one set per row
def test_flat_rope_rotates_every_token_as_the_batched_rope_does(cos_rows):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    seen = []

    def spy(q, k, cos, sin):
        seen.append((q.shape[0], cos.shape[0]))
        return apply_rotary_pos_emb(q, k, cos, sin)

    rows, width, heads, kv_heads, dim = 3, 5, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    # the layout a Llama's attention hands over: projections viewed as heads, then transposed
    q0 = torch.randn(rows, width, heads * dim, generator=gen, requires_grad=True)
    k0 = torch.randn(rows, width, kv_heads * dim, generator=gen, requires_grad=True)
    q = q0.view(rows, width, heads, dim).transpose(1, 2)
    k = k0.view(rows, width, kv_heads, dim).transpose(1, 2)
    angles = torch.rand(cos_rows, width, dim // 2, generator=gen).repeat(1, 1, 2) * 6
    cos, sin = angles.cos(), angles.sin()

    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = modeling.flat_rope(spy)(q, k, cos, sin)

    assert seen == [(1, 1)]  # one row and one cos row, whatever the batch: one compile for all
    assert got_q.shape == want_q.shape and got_k.shape == want_k.shape
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    assert not torch.equal(got_q, q)  # it did rotate
    weights = torch.randn(want_q.shape, generator=gen)
    want = torch.autograd.grad((want_q * weights).sum() + want_k.sum(), (q0, k0))
    got = torch.autograd.grad((got_q * weights).sum() + got_k.sum(), (q0, k0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_compiling_fused_kernels_early_draws_no_random_numbers():
    """The head-start compile runs beside a seeded run's loading: it must leave the RNG alone."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(TINY_MODEL)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    modeling.compile_fused_kernels(config, "sdpa", "bfloat16", "cpu")  # no liger on a CPU: plain layers
    assert torch.equal(torch.get_rng_state(), before)
    assert config.num_hidden_layers > 1  # the caller's config is left as it was


def test_no_compile_thread_without_a_gpu_or_fused_kernels(monkeypatch):
    import importlib.util

    tiny, q = ModelArgs(name=str(TINY_MODEL)), Config().quantization
    assert modeling.start_compiling_fused_kernels(tiny, q) is None  # no GPU here
    monkeypatch.setattr(modeling.runtime, "has_cuda", lambda: True)
    assert modeling.start_compiling_fused_kernels(dataclasses.replace(tiny, liger_kernels=False), q) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # liger-kernel not installed
    assert modeling.start_compiling_fused_kernels(tiny, q) is None


def test_within_unmasked_causal_attention_sdpa_runs_causal_without_a_mask(sdpa_calls):
    """Even where transformers would build a mask (as while a CUDA graph is captured: simulated by
    calling every position tensor traced), the model's SDPA gets none and is_causal, with the same
    logits; outside, the implementation is plain sdpa again."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32, attn_implementation="sdpa").eval()
    seen = sdpa_calls
    ids = torch.tensor([[5, 9, 14, 3, 7, 21], [8, 2, 2, 11, 4, 6]])
    with torch.no_grad():
        masked = model(input_ids=ids, use_cache=False).logits  # as training runs it
        assert seen and all(s == (False, False) for s in seen)  # a [T, T] mask built
        seen.clear()
        with modeling.unmasked_causal_attention(model):
            plain = model(input_ids=ids, use_cache=False).logits
        assert seen and all(s == (True, True) for s in seen)
    assert model.config._attn_implementation == "sdpa"  # given back
    assert torch.allclose(plain, masked, atol=1e-5)


@pytest.mark.parametrize(
    "change, plain",
    [
        ({}, True),
        ({"sliding_window": 3}, False),  # a window is a mask of its own
        ({"sliding_window": 3, "use_sliding_window": False}, True),  # Qwen2's way of turning it off
        ({"layer_types": ["full_attention", "sliding_attention"]}, False),
        ({"_attn_implementation": "eager"}, False),
    ],
)
def test_only_plainly_causal_sdpa_models_drop_their_mask(change, plain):
    import transformers

    config = transformers.AutoConfig.from_pretrained(TINY_MODEL)
    config._attn_implementation = "sdpa"
    for key, value in change.items():
        setattr(config, key, value)
    model = types.SimpleNamespace(config=config)
    before = config._attn_implementation
    with modeling.unmasked_causal_attention(model):
        assert (config._attn_implementation == modeling.CAUSAL_ATTENTION) is plain
    assert config._attn_implementation == before
