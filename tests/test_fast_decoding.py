"""The fixed-shape decode step (`generate(..., compile=...)`) gives the eager loop's tokens, and transformers' (float32)."""
import contextlib
import copy
import gc
import importlib
import weakref

import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration as HFPaliGemma

from paligemma_edu.cli import build_parser
from paligemma_edu.fast_decoding import (FAST_MODES, CUDAGraphStep, StaticDecodeStep, StaticDecoder, get_decoder,
                                         length_bucket, resolve_mode)
from paligemma_edu.gemma import GemmaConfig, GemmaForCausalLM
from paligemma_edu.generate import generate
from paligemma_edu.paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration

N_NEW = 20
GEMMA2 = dict(model_type="gemma2", num_hidden_layers=4, num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=8,
              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)


def tiny(gemma2=False, seed=0, kv_heads=1):
    "A tiny random PaliGemma whose greedy tokens vary (wide weights; Gemma 2's post-norm gains raised)."
    text = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=128) | (GEMMA2 if gemma2 else {})
    cfg = PaliGemmaConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             image_size=28, patch_size=7),
                          text_config=text, image_token_index=299, vocab_size=300, projection_dim=48, hidden_size=48)
    torch.manual_seed(seed)
    m = PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if gemma2 and "language_model" in n and "post_" in n: p.normal_(8.0, 1.0)
            else: p.normal_(0, 0.3 if gemma2 else 0.5)
    return m


def prompts(seed=0, lengths=(3, 7, 1)):
    "Left-padded rows: 16 <image> tokens, <bos>, prompt words, newline; random images."
    g = torch.Generator().manual_seed(seed)
    rows = [[299] * 16 + [2] + torch.randint(3, 290, (k,), generator=g).tolist() + [108] for k in lengths]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, torch.randn(len(rows), 3, 28, 28, generator=g), mask, torch.zeros_like(ids)


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def pair(request, tmp_path_factory):
    "Our tiny model and transformers' loaded from the files our save_pretrained wrote."
    ours = tiny(gemma2=request.param == "gemma2")
    d = tmp_path_factory.mktemp(request.param)
    ours.save_pretrained(d)
    return ours, HFPaliGemma.from_pretrained(d, attn_implementation="eager").eval()


def eos_settings(model, ids, pix, am, tt):
    "One EOS id that ends some rows early but not all, and a set that ends every row early (from a free greedy run)."
    T = ids.shape[1]
    free = generate(model, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=[])[:, T:]
    some = [t for t in free[:, 2:6].flatten().tolist() if 0 < (free == t).any(-1).sum() < len(free)]
    assert some, free
    return [some[0]], sorted({free[0, 5].item(), free[1, 3].item(), free[2, 6].item()})


def test_static_step_logits_match_eager_step(pair):
    ours, _ = pair
    ids, pix, am, tt = prompts()
    T, worst = ids.shape[1], 0.0
    with torch.inference_mode():
        cache = ours.new_cache(3, T + 24)
        eager = ours(ids, pix, am, tt, cache=cache, logits_to_keep=1).logits[:, -1]
        step = StaticDecodeStep(ours, 3, 64)
        ours(ids, pix, am, tt, cache=step.kv, logits_to_keep=1)
        mask = am.clone()
        for _ in range(24):  # past the window of 8 for Gemma 2
            tok = eager.argmax(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            eager = ours(tok[:, None], attention_mask=mask, cache=cache).logits[:, -1]
            worst = max(worst, (step(tok) - eager).abs().max().item())
    assert worst <= 1e-4, worst  # whole-model float32 tolerance
    assert step.slot.item() == T + 24 and step.pos.tolist() == (am.sum(-1) + 1 + 24).tolist()


@pytest.mark.parametrize("which", ["some rows stop", "every row stops"])
def test_greedy_left_padded_early_eos_matches_eager_and_transformers(pair, which):
    ours, hf = pair
    ids, pix, am, tt = prompts()
    eos = eos_settings(ours, ids, pix, am, tt)[which == "every row stops"]
    eager = generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    fast = generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0, compile="static")
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pix, attention_mask=am, token_type_ids=tt, max_new_tokens=N_NEW,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(fast, eager) and torch.equal(fast, ref)
    finished = torch.isin(fast[:, ids.shape[1]:], torch.tensor(eos)).any(-1)
    if which == "some rows stop": assert finished.any() and not finished.all() and fast.shape[1] == ids.shape[1] + N_NEW
    else: assert finished.all() and fast.shape[1] < ids.shape[1] + N_NEW


def test_seeded_sampling_gives_the_same_samples(pair):
    ours, _ = pair
    ids, pix, am, tt = prompts(1)
    kw = dict(max_new_tokens=N_NEW, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, seed=11, eos_token_id=[5, 7])
    a, b = generate(ours, ids, pix, am, tt, **kw), generate(ours, ids, pix, am, tt, **kw, compile="static")
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(ours, ids, pix, am, tt, **(kw | {"seed": 12})))  # the seed matters


def test_text_only_gemma_and_streamer():
    torch.manual_seed(3)
    cfg = GemmaConfig(vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    lm = GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters(): p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 160, (2, 9), generator=g)
    am = torch.ones_like(ids); ids[0, :4] = 0; am[0, :4] = 0
    seen_a, seen_b = [], []
    a = generate(lm, ids, attention_mask=am, max_new_tokens=30, eos_token_id=[], streamer=seen_a.append)
    b = generate(lm, ids, attention_mask=am, max_new_tokens=30, eos_token_id=[], streamer=seen_b.append, compile="static")
    assert torch.equal(a, b) and len(a[0, 9:].unique()) > 3
    assert len(seen_a) == len(seen_b) == 30 and all(torch.equal(x, y) for x, y in zip(seen_a, seen_b))


def test_compiled_step_matches_eager():
    "One torch.compile (inductor) run on the CPU: the same tokens, and a second prompt reuses the compiled decoder."
    ours = tiny()
    ids, pix, am, tt = prompts()
    eos = eos_settings(ours, ids, pix, am, tt)[1]
    eager = generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0,
                                compile=True), eager)
    ids2, pix2, am2, tt2 = prompts(5, (4, 2, 6))
    again = generate(ours, ids2, pix2, am2, tt2, max_new_tokens=N_NEW, eos_token_id=[], compile=True)
    assert torch.equal(again, generate(ours, ids2, pix2, am2, tt2, max_new_tokens=N_NEW, eos_token_id=[]))
    assert [k[2] for k in ours.static_decoders] == ["inductor"]  # one decoder, built once, reused


def test_decoders_are_reused_rebuilt_and_not_copied():
    ours = tiny(seed=1)
    a = get_decoder(ours, 2, 64, "static")
    assert get_decoder(ours, 2, 64, "static") is a
    assert copy.deepcopy(ours).static_decoders == {}                 # a copy starts with none
    for b in (1, 3, 4, 5): get_decoder(ours, b, 64, "static")
    assert len(ours.static_decoders) == 4 and (2, 64, "static", torch.float32, "cpu") not in ours.static_decoders
    c = get_decoder(ours, 5, 64, "static")
    w = next(ours.parameters())
    w.data = w.data.clone()                                           # a weight in new memory: decoders rebuilt
    assert get_decoder(ours, 5, 64, "static") is not c and len(ours.static_decoders) == 1



def test_a_decoder_built_by_hand_is_used_as_given():
    "compile= takes a decoder object; the model's own decoders come from model.static_decoder and are kept."
    ours = tiny(seed=4)
    ids, pix, am, tt = prompts()
    eager = generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=[])
    dec = StaticDecoder(ours, 3, 64)
    assert torch.equal(generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=[], compile=dec), eager)
    assert ours.static_decoders == {}                                 # the model built none of its own
    own = ours.static_decoder(3, ids.shape[1] + N_NEW, "static")
    assert own is ours.static_decoder(3, ids.shape[1] + N_NEW, "static") and len(ours.static_decoders) == 1
    with pytest.raises(ValueError, match="built for another model"):
        generate(tiny(seed=5), ids, pix, am, tt, max_new_tokens=N_NEW, compile=dec)


def test_one_interface_for_both_model_classes():
    "Both classes answer text_model and position_offset; generate imports nothing of the fast-decoding module."
    ours = tiny()
    assert ours.text_model is ours.language_model and ours.language_model.text_model is ours.language_model
    assert (ours.position_offset, ours.language_model.position_offset) == (1, 0)
    src = open(importlib.import_module("paligemma_edu.generate").__file__).read()
    assert "fast_decoding" not in src and "isinstance(model" not in src


def test_a_model_and_its_decoders_are_freed_together():
    "The decoders live on the model (no module-level table): dropping the model frees it."
    ours = tiny(seed=6)
    ids, pix, am, tt = prompts()
    generate(ours, ids, pix, am, tt, max_new_tokens=4, compile="static")
    assert len(ours.static_decoders) == 1
    alive = weakref.ref(ours)
    del ours
    gc.collect()
    assert alive() is None

def test_modes_and_limits():
    assert resolve_mode(False, "cpu") is None and resolve_mode(True, "cpu") == "inductor"
    assert resolve_mode(True, "cuda") == "reduce-overhead" and resolve_mode("static", "cpu") == "static"
    for mode in ("cuda-graph", "reduce-overhead"):
        with pytest.raises(ValueError, match="needs the model on a CUDA device"): resolve_mode(mode, "cpu")
    ours = tiny(seed=2)
    ids, pix, am, tt = prompts()
    with pytest.raises(ValueError, match="compile must be False, True or one of"):
        generate(ours, ids, pix, am, tt, compile="fast")
    with pytest.raises(RuntimeError, match="CUDA graphs need the model on a CUDA device"):
        CUDAGraphStep(StaticDecodeStep(ours, 3, 64))
    with pytest.raises(ValueError, match="this decoder holds batch 3 x 32 positions"):
        StaticDecoder(ours, 3, 32).generate(ours, ids, pix, am, tt, 20)
    assert (length_bucket(30, 1024), length_bucket(65, 1024), length_bucket(900, 600)) == (64, 128, 900)
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert tuple(next(a for a in gen._actions if a.dest == "compile").choices) == FAST_MODES  # the CLI offers every mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["cuda-graph", "reduce-overhead"])
def test_cuda_paths_match_eager(mode):
    ours = tiny().cuda()
    ids, pix, am, tt = (t.cuda() for t in prompts())
    eos = [int(t) for t in eos_settings(ours, ids, pix, am, tt)[1]]
    eager = generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    for _ in range(2):  # captured once, replayed on the second call
        assert torch.equal(generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0,
                                    compile=mode), eager)


@pytest.mark.parametrize("gemma2", [False, True])
def test_compiled_batch_one_runs_the_c_matvec_and_gives_eager_tokens(gemma2):
    "compile=True at batch 1 on the CPU: every one-row product goes through paligemma_edu::matvec; the tokens are eager's."
    from torch.profiler import profile
    from paligemma_edu.fast_decoding import matvec_kernel
    if matvec_kernel() is None: pytest.skip("no C compiler here: compiled decoding keeps torch's products")
    ours = tiny(gemma2=gemma2)
    ids, pix, am, tt = prompts(3, (5,))
    eager = generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=[])
    assert torch.equal(generate(ours, ids, pix, am, tt, max_new_tokens=N_NEW, eos_token_id=[], compile=True), eager)
    with profile() as prof: generate(ours, ids, pix, am, tt, max_new_tokens=4, eos_token_id=[], compile=True)
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = ours.text_model.cfg.num_hidden_layers
    assert calls.get("paligemma_edu::matvec", 0) == 3 * (7 * layers + 1)  # 3 steps x (q, k, v, o, gate, up, down + head)
    assert next(iter(ours.static_decoders.values())).matvec


def test_matvec_op_and_backend():
    "The C product equals torch's within float32 rounding (any width); matvec_backend rewrites one-row products only."
    from paligemma_edu.fast_decoding import matvec_backend, matvec_kernel
    if matvec_kernel() is None: pytest.skip("no C compiler here")
    torch.manual_seed(0)
    for N, K in ((300, 48), (7, 15), (2048, 512)):
        W, x = torch.randn(N, K), torch.randn(K)
        torch.testing.assert_close(torch.ops.paligemma_edu.matvec(x, W), W.double().mv(x.double()).float(), rtol=1e-5,
                                   atol=1e-5 * K ** 0.5)
        Wb, xb = W.bfloat16(), x.bfloat16()
        ref = (Wb.double() @ xb.double()).to(torch.bfloat16)                             # exact sums, one rounding
        err = (torch.ops.paligemma_edu.matvec(xb, Wb).double() - ref.double()).abs()
        assert (err <= 2 ** -8 * ref.double().abs() + 1e-6 * K).all()
    lin = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4, bias=False))
    for rows, calls in ((1, 2), (2, 0)):                                                  # two rows: torch's products
        torch._dynamo.reset()
        compiled = torch.compile(lin, backend=matvec_backend, fullgraph=True, dynamic=False)
        x = torch.randn(rows, 1, 16)
        with torch.inference_mode(): compiled(x)                                          # compiled (fake calls counted too)
        with torch.inference_mode(), profile_ops() as ops: y = compiled(x)
        with torch.inference_mode(): torch.testing.assert_close(y, lin(x))
        assert ops().get("paligemma_edu::matvec", 0) == calls
    with pytest.raises(ValueError, match="matvec needs"): torch.ops.paligemma_edu.matvec(torch.ones(3), torch.ones(4, 5))
    with pytest.raises(ValueError, match="matvec needs"): torch.ops.paligemma_edu.matvec(torch.ones(5), torch.ones(5, 4).T)


@contextlib.contextmanager
def profile_ops():
    "Profile the block; the value, called after it closes, counts the custom paligemma_edu operators that ran."
    from torch.profiler import profile
    with profile() as prof: yield lambda: {e.key: e.count for e in prof.key_averages() if e.key.startswith("paligemma_edu::")}


def test_static_decoder_without_a_c_compiler_keeps_torch_products(monkeypatch):
    "No kernel (the build failed): the step is compiled by plain Inductor, and a later decoder with the kernel uses it."
    import paligemma_edu.fast_decoding as FD
    ours = tiny()
    with monkeypatch.context() as m:
        m.setattr(FD, "matvec_kernel", lambda: None)
        assert not StaticDecoder(ours, 1, 64, "inductor").matvec
    assert StaticDecoder(ours, 1, 64, "inductor").matvec == (FD.matvec_kernel() is not None)
    assert not StaticDecoder(ours, 1, 64, "static").matvec
