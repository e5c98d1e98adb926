"""Quantized KV cache (int8, fp8 e4m3): kernels vs references, the engine vs a fake-quant twin.

Kernels run under the Triton interpreter on small grids. The quantizing KV-append must
give the bits of ``minipaged_kernels.kv_quant.quantize`` (the scheme's definition), the attention
kernels the float64 reference over the dequantized cache. The engine with a quantized
cache must produce exactly the tokens of an engine whose cache is float but whose K/V are
rounded the same way before they are stored, and most of the tokens of the float cache.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import triton
import triton.language as tl
from pairwise import pairwise
from test_decode_attention import REL_TOL, make_batch, rel_error
from tiny_models import assert_all_blocks_free, make_llm, make_prompts, tiny_hf_model

import minipaged_kernels
from minipaged import LLM, SamplingParams
from minipaged.attention import allocate_kv_cache, kv_cache_bytes_per_block, kv_quant
from minipaged.attention.torch_backend import TorchAttentionBackend
from minipaged.errors import InvalidEngineConfigError
from minipaged.models import build_model_from_hf
from minipaged_kernels import _kv_quant, reference

KINDS = ("int8", "fp8_e4m3")


# ---------------------------------------------------------------- the scheme in torch


def test_int8_round_trip_error_is_half_a_step_per_row():
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    x[0, 0] = 0.0  # an all-zero row: scale 0, stored zeros, no NaN
    data, scale = kv_quant.quantize(x, "int8")
    assert data.dtype == torch.int8 and scale.shape == (50, 3)
    back = kv_quant.dequantize(data, scale, torch.float32)
    assert torch.isfinite(back).all() and torch.equal(back[0, 0], torch.zeros(64))
    assert ((back - x).abs() <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(x.abs().amax(-1) / 127, scale)


def test_fp8_saturates_and_keeps_relative_error():
    x = torch.tensor([[1000.0, -1e6, 448.0, 0.3, -2.0, 1e-4] + [0.5] * 58])
    data, scale = kv_quant.quantize(x, "fp8_e4m3", torch.ones(1))
    back = kv_quant.dequantize(data, scale, torch.float32)
    assert torch.isfinite(back).all()
    assert back[0, :3].tolist() == [448.0, -448.0, 448.0]
    normal = x.abs() >= 2**-6
    assert ((back - x).abs()[normal & (x.abs() <= 448)] <= x.abs()[normal & (x.abs() <= 448)] / 16).all()


# ---------------------------------------------------------------- fp8 bit codecs


@triton.jit
def _codec_kernel(codes_ptr, decoded_ptr, values_ptr, encoded_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(decoded_ptr + offs, _kv_quant.e4m3_to_fp32(tl.load(codes_ptr + offs)))
    tl.store(encoded_ptr + offs, _kv_quant.fp32_to_e4m3(tl.load(values_ptr + offs)))


def test_fp8_bit_codecs_match_torch():
    """Every e4m3 code decodes as torch decodes it; floats (ties, subnormals, the range's
    edge) encode to torch's round-to-nearest-even bits."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = grid[torch.isfinite(grid)].sort().values
    midpoints = (finite[1:] + finite[:-1]) / 2  # exact ties: round to the even code
    noise = [torch.randn(512, generator=gen) * s for s in (50.0, 0.01, 1e-3)]
    values = torch.cat([finite, midpoints, *noise]).clamp(-448, 448)
    n = triton.next_power_of_2(values.numel())
    values = torch.cat([values, torch.zeros(n - values.numel())])
    codes = torch.cat([torch.arange(256, dtype=torch.int32), torch.zeros(n - 256, dtype=torch.int32)])
    decoded, encoded = torch.empty(n), torch.empty(n, dtype=torch.uint8)
    _codec_kernel[(1,)](codes, decoded, values, encoded, N=n)
    nan_code = (codes[:256] & 0x7F) == 0x7F
    assert torch.equal(decoded[:256][~nan_code], grid[~nan_code])
    assert torch.equal(encoded, values.to(torch.float8_e4m3fn).view(torch.uint8))


# ---------------------------------------------------------------- kernels vs references


def _quant_cache(shape, kind, per_token, gen):
    """Allocated, then filled with noise (int8) / NaN codes (fp8) and NaN per-token scales.

    Rows a kernel does not write stay poisoned.
    """
    cache = kv_quant.allocate(shape, kind, torch.float32, "cpu", per_token)
    bits = cache.data.view(torch.uint8)
    bits.copy_(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8))
    if kind == "fp8_e4m3":
        bits.fill_(0x7F)
    if per_token:
        cache.scale.fill_(float("nan"))
    else:
        cache.scale.fill_(0.05)
    return cache


@pytest.mark.parametrize(
    "kind,per_token,dtype,head_dim",
    pairwise([KINDS, (True, False), (torch.float32, torch.float16, torch.bfloat16), (64, 80, 200)]),
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_kv_append_quantizes_bit_exact(kind, per_token, dtype, head_dim):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, per_token, dtype, head_dim)).encode()))
    shape, num_tokens = (5, 8, 2, head_dim), 21
    ref, ref_v = _quant_cache(shape, kind, per_token, gen), _quant_cache(shape, kind, per_token, gen)
    ours, ours_v = (kv_quant.QuantizedCache(c.data.clone(), c.scale.clone(), torch.float32) for c in (ref, ref_v))
    key = (torch.randn(num_tokens, 2, head_dim, generator=gen) * 3).to(dtype)
    value = torch.randn(num_tokens, 2, head_dim, generator=gen).to(dtype)
    key[0, 0] = 0  # a zero row
    slots = torch.randperm(40, generator=gen)[:num_tokens]
    slots[3] = -1  # padding
    minipaged_kernels.kv_append(key, value, ours.data, ours_v.data, slots, ours.scale, ours_v.scale)
    reference.kv_append(key, value, ref.data, ref_v.data, slots, ref.scale, ref_v.scale)
    for a, b in ((ours, ref), (ours_v, ref_v)):
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
        assert torch.equal(a.scale.nan_to_num(-1.0), b.scale.nan_to_num(-1.0))
    # The padding token wrote nothing: its would-be row is not in the cache.
    if per_token:
        assert int(torch.isnan(ours.scale).sum()) == 5 * 8 * 2 - 2 * (num_tokens - 1)


def _quantize_cache(cache: torch.Tensor, kind: str, per_token: bool) -> kv_quant.QuantizedCache:
    data, scale = kv_quant.quantize(cache, kind, None if per_token else torch.full((1,), 0.02))
    return kv_quant.QuantizedCache(data, scale, torch.float32)


CASES = pairwise([KINDS, (True, False), (torch.float32, torch.float16, torch.bfloat16), (8, 16), (1, 4)])


@pytest.mark.parametrize("kind,per_token,dtype,block_size,group", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_decode_on_quantized_cache_matches_reference(kind, per_token, dtype, block_size, group):
    seed = zlib.crc32(repr((kind, per_token, dtype, block_size, group)).encode())
    q, k_cache, v_cache, tables, lens = make_batch(
        [1, block_size + 1, 70], block_size, 2, group, 64, torch.float32, "cpu", seed
    )
    kq, vq = _quantize_cache(k_cache, kind, per_token), _quantize_cache(v_cache, kind, per_token)
    q = q.to(dtype)
    out = torch.full_like(q, float("nan"))
    minipaged_kernels.paged_decode_attention(
        q,
        kq.data,
        vq.data,
        tables,
        lens,
        out=out,
        num_splits=2 if group == 4 else 1,
        k_scale=kq.scale,
        v_scale=vq.scale,
    )
    ref = reference.paged_decode_attention(
        q.double(), kq.data, vq.data, tables, lens, k_scale=kq.scale, v_scale=vq.scale
    )
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("kind,per_token,dtype,block_size,group", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_prefill_on_quantized_cache_matches_reference(kind, per_token, dtype, block_size, group):
    seed = zlib.crc32(repr(("prefill", kind, per_token, dtype, block_size, group)).encode())
    _, k_cache, v_cache, tables, lens = make_batch([3, 40, 19], block_size, 2, group, 64, torch.float32, "cpu", seed)
    kq, vq = _quantize_cache(k_cache, kind, per_token), _quantize_cache(v_cache, kind, per_token)
    cu = torch.tensor([0, 1, 21, 40], dtype=torch.int32)  # a decode, a chunk behind a prefix, a whole prompt
    q = torch.randn(40, 2 * group, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = torch.full_like(q, float("nan"))
    minipaged_kernels.paged_prefill_attention(
        q, kq.data, vq.data, tables, cu, lens, out=out, k_scale=kq.scale, v_scale=vq.scale
    )
    ref = reference.paged_prefill_attention(
        q.double(), kq.data, vq.data, tables, cu, lens, k_scale=kq.scale, v_scale=vq.scale
    )
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < REL_TOL[dtype]


def test_quantized_kernels_reject_bad_scales():
    q, k_cache, v_cache, tables, lens = make_batch([5], 8, 2, 1, 64, torch.float32, "cpu", 1)
    kq, vq = _quantize_cache(k_cache, "int8", True), _quantize_cache(v_cache, "int8", True)
    with pytest.raises(ValueError, match="needs k_scale"):
        minipaged_kernels.paged_decode_attention(q, kq.data, vq.data, tables, lens)
    with pytest.raises(ValueError, match="k_scale has shape"):
        minipaged_kernels.paged_decode_attention(
            q, kq.data, vq.data, tables, lens, k_scale=kq.scale[:, :, :1], v_scale=vq.scale
        )
    with pytest.raises(ValueError, match="go with int8 or fp8"):
        minipaged_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, k_scale=kq.scale, v_scale=vq.scale)
    with pytest.raises(ValueError, match="v_scale shape"):
        minipaged_kernels.kv_append(q[:, :2], q[:, :2], kq.data, vq.data, torch.tensor([0]), kq.scale, torch.ones(1))


# ---------------------------------------------------------------- the engine


class FakeQuantBackend(TorchAttentionBackend):
    """A float cache whose K/V are rounded through ``kv_quant`` before they are stored:
    the independent reference for an engine with a quantized cache."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        layer_scale = None if kv_quant.PER_TOKEN_SCALE[self.kind] else torch.ones(1)
        k, v = (kv_quant.dequantize(*kv_quant.quantize(x, self.kind, layer_scale), x.dtype) for x in (k, v))
        return super().forward(q, k, v, k_cache, v_cache, meta, scale)


def _fake_quant_llm(hf, kind: str, **kwargs) -> LLM:
    model = build_model_from_hf(hf, attention_backend="torch")
    backend = FakeQuantBackend(kind)
    model.attention_backend = backend
    for layer in model.model.layers:
        layer.self_attn.backend = backend
    return LLM(model, num_kv_blocks=256, block_size=8, **kwargs)


def _generate(llm: LLM, prompts, max_tokens, n: int = 1):
    params = [
        SamplingParams(n=n, temperature=0 if n == 1 else 1.0, seed=i, max_tokens=m, ignore_eos=True)
        for i, m in enumerate(max_tokens)
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_all_blocks_free(llm)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_hf_model("llama")
    prompts, max_tokens = make_prompts(seed=7)
    return hf, prompts, max_tokens


@pytest.mark.parametrize("kind", KINDS)
def test_engine_equals_fake_quant_reference(tiny, kind):
    """Greedy and seeded n=2 sampling (fork + copy-on-write of blocks and their scales),
    with prefix caching and chunked prefill: token for token the fake-quant engine's."""
    hf, prompts, max_tokens = tiny
    prompts, max_tokens = prompts[:8], [min(m, 12) for m in max_tokens[:8]]
    for n, extra in ((1, {"max_num_batched_tokens": 24}), (2, {})):
        ours = _generate(make_llm(hf, kv_cache_dtype=kind, **extra), prompts, max_tokens, n)
        ref = _generate(_fake_quant_llm(hf, kind, **extra), prompts, max_tokens, n)
        assert ours == ref


def test_engine_int8_agrees_with_float_cache_on_most_tokens(tiny):
    hf, prompts, max_tokens = tiny
    fp = _generate(make_llm(hf), prompts, max_tokens)
    q8 = _generate(make_llm(hf, kv_cache_dtype="int8"), prompts, max_tokens)
    same = sum(a == b for x, y in zip(fp, q8) for a, b in zip(x[0], y[0]))
    total = sum(len(x[0]) for x in fp)
    assert same / total >= 0.8, (same, total)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_backend_matches_torch_backend_on_quantized_cache(tiny, kind):
    hf, prompts, max_tokens = tiny
    few, short = prompts[:2], [4] * 2
    torch_out = _generate(make_llm(hf, kv_cache_dtype=kind), few, short)
    triton_out = _generate(make_llm(hf, backend="triton", kv_cache_dtype=kind), few, short)
    assert triton_out == torch_out


# ---------------------------------------------------------------- config, sizing, errors


@pytest.mark.parametrize("bad", ["int4", "fp8", None, 8])
def test_unknown_kv_cache_dtype_is_a_typed_error(tiny, bad):
    with pytest.raises(InvalidEngineConfigError) as err:
        LLM(build_model_from_hf(tiny[0]), kv_cache_dtype=bad)
    assert err.value.field == "kv_cache_dtype"


def test_fp8_without_platform_support_is_a_typed_error(monkeypatch):
    monkeypatch.setitem(kv_quant.STORAGE, "fp8_e4m3", None)
    from minipaged.config import EngineConfig

    with pytest.raises(InvalidEngineConfigError, match="float8_e4m3fn") as err:
        EngineConfig(kv_cache_dtype="fp8_e4m3")
    assert err.value.field == "kv_cache_dtype"


def test_triton_backend_refuses_a_head_dim_its_kernels_do_not_cover():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=1024,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = build_model_from_hf(transformers.LlamaForCausalLM(cfg), attention_backend="triton")
    assert model.config.head_dim == 512
    with pytest.raises(InvalidEngineConfigError, match="head_dim <= 256") as err:
        LLM(model, num_kv_blocks=4, kv_cache_dtype="int8")
    assert err.value.field == "kv_cache_dtype"


def test_kv_cache_memory_buys_proportionally_more_blocks(tiny):
    hf = tiny[0]
    budget = 1 << 20
    blocks = {
        kind: make_llm(hf, num_kv_blocks=None, kv_cache_memory=budget, kv_cache_dtype=kind).config.num_kv_blocks
        for kind in ("auto", *KINDS)
    }
    model = build_model_from_hf(hf)
    d = model.config.head_dim
    assert blocks["fp8_e4m3"] == budget // kv_cache_bytes_per_block(model.config, 8, torch.float32, "fp8_e4m3")
    assert blocks["fp8_e4m3"] // 4 == blocks["auto"]
    assert blocks["int8"] == budget // (2 * 3 * 8 * 2 * (d + 4))
    # The allocation is exactly what the sizing counted.
    for kind in ("auto", *KINDS):
        caches = allocate_kv_cache(model.config, 5, 8, torch.float32, "cpu", kind)
        nbytes = sum(
            t.nbytes if isinstance(t, torch.Tensor) else t.data.nbytes + (t.scale.nbytes if t.per_token else 0)
            for pair in caches
            for t in pair
        )
        assert nbytes == 5 * kv_cache_bytes_per_block(model.config, 8, torch.float32, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_cpu_decode_equals_the_gather_path_on_quantized_caches(tiny, kind):
    """The numba decode kernel dequantizes in place; the gather path dequantizes gathered
    blocks. Engines differing only in that give the same tokens, and nothing leaks."""
    from minipaged.attention.torch_backend import fused_decode_available

    if not fused_decode_available():
        pytest.skip("numba not installed")
    hf, prompts, max_tokens = tiny
    outputs = []
    for decode_kernel in ("fused", "gather"):
        llm = make_llm(hf, kv_cache_dtype=kind)
        backend = TorchAttentionBackend(decode_kernel=decode_kernel)
        llm.model.attention_backend = backend
        for layer in llm.model.model.layers:
            layer.self_attn.backend = backend
        cache = llm.engine_core.worker.kv_caches[0][0]
        assert isinstance(cache, kv_quant.QuantizedCache) and backend.uses_fused_decode(cache) == (
            decode_kernel == "fused"
        )
        outputs.append(_generate(llm, prompts[:8], [min(m, 12) for m in max_tokens[:8]], n=2))
    assert outputs[0] == outputs[1]
