"""Logit parity with HF transformers' Qwen2ForCausalLM loaded from the same safetensors files."""
import pytest
import torch
from conftest import PARITY_CONFIGS, left_padded_batch, write_checkpoint

from qwen_mini import Qwen, QwenConfig

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def masked_max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


def test_logits_match_transformers_without_padding(parity_checkpoint):
    ours, hf, config = parity_checkpoint
    input_ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(input_ids) - hf(input_ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_logits_match_transformers_with_left_padding(parity_checkpoint):
    ours, hf, config = parity_checkpoint
    input_ids, mask = left_padded_batch(config.vocab_size, [13, 7, 1, 10], seed=2)
    with torch.no_grad():
        diff = masked_max_diff(ours(input_ids, mask), hf(input_ids, attention_mask=mask).logits, mask)
    assert diff <= 1e-4


def test_left_padding_does_not_change_real_tokens_logits(parity_checkpoint):
    """Independent of HF: a padded row's logits equal the same prompt run alone."""
    ours, _, config = parity_checkpoint
    input_ids, mask = left_padded_batch(config.vocab_size, [12, 5], seed=3)
    with torch.no_grad():
        batched = ours(input_ids, mask)
        alone = ours(input_ids[1:, -5:])
    assert (batched[1, -5:] - alone[0]).abs().max().item() <= 1e-5


def test_explicit_position_ids_match_transformers(parity_checkpoint):
    ours, hf, config = parity_checkpoint
    input_ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    position_ids = torch.arange(20, 29)[None]
    with torch.no_grad():
        diff = (ours(input_ids, position_ids=position_ids) - hf(input_ids, position_ids=position_ids).logits)
    assert diff.abs().max().item() <= 1e-4


def full_size_model(device="cpu") -> Qwen:
    """Our 0.5B model with random weights: biases and norms made non-trivial, the 0.02 init elsewhere."""
    config = QwenConfig.from_name("qwen2.5-0.5b")
    torch.manual_seed(0)
    model = Qwen(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_full_size_config_matches_transformers_fp32(device):
    """Fast default-suite check of the 0.5B shapes: HF's model holding our very tensors (no disk round trip)."""
    pytest.importorskip("transformers")
    from bench.hf_twin import hf_twin

    ours = full_size_model(device)
    input_ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (ours(input_ids.to(device)) - hf_twin(ours)(input_ids.to(device)).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_full_size_round_trip_left_padding_and_kv_cache_match_transformers(device, tmp_path):
    """The 0.5B shapes end to end: our safetensors files load back bit for bit and into HF transformers; a
    left-padded batch gives HF's logits; KV-cache greedy decoding writes HF generate's tokens. (~1-2 min on 2 CPU
    cores: 2 GB of float32 weights written, read twice, and two models' forward passes.)"""
    transformers = pytest.importorskip("transformers")
    from qwen_mini import from_pretrained, generate, save_pretrained

    ours = full_size_model(device)
    save_pretrained(ours, tmp_path, dtype=torch.float32)
    loaded = from_pretrained(tmp_path, dtype=torch.float32, device=device)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).to(device).eval()
    input_ids, mask = (t.to(device) for t in left_padded_batch(ours.config.vocab_size, [24, 9], seed=5))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF's generate numbers left-padded rows
    with torch.no_grad():
        diff = masked_max_diff(loaded(input_ids, mask),
                               hf(input_ids, attention_mask=mask, position_ids=position_ids).logits, mask)
        reference = hf.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[:, input_ids.shape[1]:]
    print(f"full-size fp32 {device} max abs logit diff: {diff:.3e}")
    assert diff <= 1e-3
    assert torch.equal(generate(loaded, input_ids, mask, max_new_tokens=8), reference)


# ---- reduced precision ---------------------------------------------------------------------------------------------
# bf16 rounds every intermediate to ~3 significant digits, so neither implementation matches the float32 logits
# closely (max errors of 0.1-0.3 on these random configs). The criterion is relative: our max error against the
# float32 reference may be at most BF16_ERROR_RATIO times HF's at the same precision, plus a floor of one bf16 step
# at 1.0 (for errors near zero); and greedy decoding writes HF's tokens for GREEDY_STEPS steps, which only an
# implementation that rounds where HF rounds does (a 0.1 logit difference flips near-ties within a few steps).
# The reference is HF's default attention (SDPA), given the positions HF's own generate uses for left-padded rows
# (real tokens before each one); with those, our bf16 and autocast logits equal HF's bit for bit on this CPU.
BF16_ERROR_RATIO, BF16_ERROR_FLOOR, GREEDY_STEPS = 1.1, 2.0 ** -7, 32
PRECISIONS = {"bf16_weights": (torch.bfloat16, False), "fp32_weights_autocast": (torch.float32, True)}


def reduced_precision_failures(directory, config, precision: str, device: str) -> tuple[list[str], dict]:
    """(what fails the criterion, the measured errors) for the checkpoint in `directory` at `precision`."""
    import contextlib

    from conftest import hf_reference

    from qwen_mini import from_pretrained, generate

    weights_dtype, use_autocast = PRECISIONS[precision]
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if use_autocast \
        else contextlib.nullcontext
    input_ids, mask = (t.to(device) for t in left_padded_batch(config.vocab_size, [20, 11, 16, 5], seed=7))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    ours = from_pretrained(directory, dtype=weights_dtype, device=device)
    hf = hf_reference(directory, dtype=weights_dtype, attn_implementation="sdpa").to(device)
    with torch.no_grad():
        reference = hf_reference(directory, attn_implementation="sdpa").to(device)(
            input_ids, attention_mask=mask, position_ids=position_ids).logits
        with autocast():
            logits = {"ours": ours(input_ids, mask).float(),
                      "hf": hf(input_ids, attention_mask=mask, position_ids=position_ids).logits.float()}
            tokens = {"ours": generate(ours, input_ids, mask, max_new_tokens=GREEDY_STEPS),
                      "hf": hf.generate(input_ids, attention_mask=mask, max_new_tokens=GREEDY_STEPS, do_sample=False,
                                        pad_token_id=0, eos_token_id=None)[:, input_ids.shape[1]:]}
    errors = {side: (value - reference)[real].abs().max().item() for side, value in logits.items()}
    failures = []
    if errors["ours"] > BF16_ERROR_RATIO * errors["hf"] + BF16_ERROR_FLOOR:
        failures.append(f"max logit error vs float32: ours {errors['ours']:.4f} > {BF16_ERROR_RATIO} x HF's "
                        f"{errors['hf']:.4f} + {BF16_ERROR_FLOOR}")
    if not torch.equal(tokens["ours"], tokens["hf"]):
        step = int((tokens["ours"] != tokens["hf"]).any(0).nonzero()[0])
        failures.append(f"greedy tokens differ from HF's from step {step} of {GREEDY_STEPS}")
    return failures, errors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_reduced_precision_is_as_accurate_as_transformers(name, precision, device, tmp_path):
    write_checkpoint(PARITY_CONFIGS[name], tmp_path, seed=sorted(PARITY_CONFIGS).index(name))
    failures, errors = reduced_precision_failures(tmp_path, PARITY_CONFIGS[name], precision, device)
    print(f"{name} {precision} {device}: max logit error vs float32 ours {errors['ours']:.4f}, HF {errors['hf']:.4f}")
    assert not failures, failures


def test_reduced_precision_check_catches_rmsnorm_weight_multiply_in_float32(tmp_path, monkeypatch):
    """The mutation the criterion exists for: RMSNorm multiplying its weight in float32 before rounding (HF rounds
    the normalised input to bf16 first). Less rounding, so the max error alone cannot see it; greedy tokens do."""
    from qwen_mini import model as model_module

    def weight_multiply_in_float32(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)

    monkeypatch.setattr(model_module.RMSNorm, "forward", weight_multiply_in_float32)
    caught = []
    for name, config in sorted(PARITY_CONFIGS.items()):
        directory = tmp_path / name
        write_checkpoint(config, directory, seed=sorted(PARITY_CONFIGS).index(name))
        failures, _ = reduced_precision_failures(directory, config, "bf16_weights", "cpu")
        caught += failures
    assert caught, "the bf16 criterion passed a model whose RMSNorm rounds differently from the reference"
