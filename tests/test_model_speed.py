"""The fast paths compute LAVT's function: compiled (regional and full) and channels-last
models give the eager model's logits and gradients, keep its state dict, and copy, EMA and
train like it; BERT's fused attention gives eager attention's features.

Compiled with ``aot_eager`` (the graphs dynamo captures, differentiated by AOTAutograd,
run without code generation): inductor's code generation took 215 s for the tiny LAVT's
17 graphs on a 2-core CPU, too slow for the suite; ``scripts/gpu_check.py`` compares
inductor's step with eager's on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from semires.ema import ema_update
from semires.model.build import TextConfig, prepare, preset
from semires.model.speed import (
    COMPILE_MODES,
    compile_model,
    is_compiled,
    regions,
    speed_up,
    uncompile,
    use_channels_last,
)
from semires.train import make_optimizer

BACKEND = "aot_eager"
SENTENCES = ["the red dog on the left", "a man in a blue shirt", "left bowl", "the car far right"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg = cfg.__class__(**{**cfg.__dict__, "text": TextConfig(dropout=0.0)})
    spec, model = prepare(cfg, corpus=SENTENCES)
    ids, att = spec.make_tokenizer().encode(SENTENCES[:3], spec.config.max_tokens)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model.train(), (images, ids, att)


def run(model, inputs):
    """Logits and every parameter's gradient of a loss that reaches every output."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    (out.float().log_softmax(1)[:, 1] * torch.linspace(-1, 1, out.shape[-1])).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, *, atol=1e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    # on the scale of the largest gradient: some (e.g. PWAM's query bias, which its instance
    # norm removes) are zero up to rounding
    scale = max(g.abs().max() for g in grads_b.values())
    for k in grads_b:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=0, atol=1e-5 * scale, msg=k)


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_model_gives_eager_logits_and_gradients(tiny, mode):
    model, inputs = tiny
    eager = run(copy.deepcopy(model), inputs)
    compiled = compile_model(copy.deepcopy(model), mode, backend=BACKEND)
    assert_same(run(compiled, inputs), eager)
    assert_same(run(compiled, inputs), eager)  # and again, from the compiled code's cache
    plain = copy.deepcopy(model)
    plain.load_state_dict(compiled.state_dict())  # BatchNorm's statistics after the two steps
    with torch.no_grad():  # the teacher's way: eval mode, no gradients (other graphs)
        compiled.eval(), plain.eval()
        torch.testing.assert_close(compiled(*inputs), plain(*inputs), rtol=0, atol=1e-5)


def test_regional_compiles_every_repeated_block_in_place(tiny):
    model, _ = tiny
    compiled = compile_model(copy.deepcopy(model), "regional", backend=BACKEND)
    kinds = {type(m).__name__ for m in regions(compiled)}
    swin = {"SwinBlock", "PatchEmbed", "PatchMerging"}
    assert kinds == swin | {"PixelWordAttention", "LanguageGate", "Decoder", "BertLayer"}
    assert all(is_compiled(m) for m in regions(compiled))
    assert len(compiled.text.bert.encoder.layer) == 2 and not is_compiled(compiled)
    assert list(compiled.state_dict()) == list(model.state_dict())  # no _orig_mod., nothing wrapped
    assert compile_model(compiled, "none") is compiled
    assert not any(is_compiled(m) for m in uncompile(compiled).modules())
    full = compile_model(copy.deepcopy(model), "full", backend=BACKEND)
    assert is_compiled(full) and not any(is_compiled(m) for m in regions(full))
    with pytest.raises(ValueError, match="compile mode 'fast': expected one of none, regional, full"):
        compile_model(model, "fast")
    assert COMPILE_MODES == ("none", "regional", "full")


def test_a_copy_of_a_compiled_model_runs_its_own_weights(tiny):
    """The EMA teacher is a deep copy of the compiled student: it must compute with its own
    parameters, and EMA must move them."""
    model, inputs = tiny
    student = compile_model(copy.deepcopy(model), "regional", backend=BACKEND)
    teacher = copy.deepcopy(student)
    assert is_compiled(teacher.decoder) and teacher.decoder.forward.__self__ is teacher.decoder
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
    plain = copy.deepcopy(model)
    plain.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(teacher(*inputs), plain(*inputs), rtol=0, atol=1e-5)
        assert not torch.allclose(teacher(*inputs), student(*inputs))
    ema_update(teacher, student, 0.5)
    for (name, t), s, p in zip(
        teacher.named_parameters(), student.parameters(), plain.parameters(), strict=True
    ):
        torch.testing.assert_close(t, 0.5 * p + 0.5 * s, msg=name)


def test_channels_last_gives_the_same_logits_gradients_and_update(tiny):
    model, inputs = tiny
    fast = use_channels_last(copy.deepcopy(model))
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # the 3 x 3 ones really are laid out otherwise
    assert list(fast.state_dict()) == list(model.state_dict())
    plain = copy.deepcopy(model)
    assert_same(run(fast, inputs), run(plain, inputs))
    for m in (fast, plain):
        opt = make_optimizer(m, lr=1e-3, weight_decay=0.01)
        opt.step()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # a channels-last state dict loads into a plain model and back
    back = copy.deepcopy(model)
    back.load_state_dict(fast.state_dict())
    for a, b in zip(back.state_dict().values(), fast.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_speed_up_is_both_settings_and_compiles_after_the_layout(tiny):
    model, inputs = tiny
    fast = speed_up(copy.deepcopy(model), compile="regional", channels_last=True, backend=BACKEND)
    assert is_compiled(fast.decoder)
    assert fast.decoder.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same(run(fast, inputs), run(copy.deepcopy(model), inputs))
    untouched = speed_up(copy.deepcopy(model))
    assert not any(is_compiled(m) for m in untouched.modules())


def test_bert_runs_fused_attention_and_equals_eager_attention(tiny):
    model, (_, ids, att) = tiny
    text = copy.deepcopy(model.text).eval()
    assert text.bert.config._attn_implementation == "sdpa"
    assert not bool(att.all())  # pads: the mask matters
    mask = text.attention_mask_4d(att)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, ids.shape[1], ids.shape[1])
    with torch.no_grad():
        fused = text(ids, att)
        ref = text.bert(input_ids=ids, attention_mask=att).last_hidden_state  # transformers' own mask
        eager = copy.deepcopy(text)
        eager.bert.set_attn_implementation("eager")
        assert eager.attention_mask_4d(att).dtype == torch.float32
        plain = eager(ids, att)
    real = att.bool()
    torch.testing.assert_close(fused[real], ref[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(fused[real], plain[real], rtol=0, atol=1e-5)
    # a BERT loaded for eager attention is switched to the fused one where the model is built
    from semires.model.text import TextEncoder

    bert = copy.deepcopy(text.bert)
    bert.set_attn_implementation("eager")
    assert TextEncoder(bert).bert.config._attn_implementation == "sdpa"
