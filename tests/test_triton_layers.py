"""The fused small ops of model/triton_layers.py against their plain-torch references.

On the CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), in float32
and float16; on a GPU (marked `gpu`) in bfloat16 at Qwen3-235B-A22B's shapes as well.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from expertmesh.model import triton_layers  # noqa: E402
from expertmesh.model.config import RopeConfig  # noqa: E402
from expertmesh.model.layers import RMSNorm, RotaryEmbedding, apply_rope, rms_normalize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _dtypes():
    return CPU_DTYPES + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (3, 4096)])
def test_rms_norm_equals_the_module(dtype, shape):
    g = torch.Generator(device="cpu").manual_seed(shape[0])
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    norm = RMSNorm(shape[1], 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(shape[1], generator=g))
    y = triton_layers.rms_norm(x, norm.weight, 1e-6)
    torch.testing.assert_close(y, norm(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", _dtypes())
def test_rms_norm_with_residual_adds_in_place_then_normalises(dtype):
    g = torch.Generator(device="cpu").manual_seed(7)
    x, res = (torch.randn(6, 80, generator=g).to(DEVICE, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(80, generator=g)).to(DEVICE, dtype)
    expected_res = x + res
    expected = w * rms_normalize(expected_res, 1e-5)
    res_inout = res.clone()
    y = triton_layers.rms_norm(x, w, 1e-5, residual_TD=res_inout)
    torch.testing.assert_close(res_inout, expected_res, **TOL[dtype])
    torch.testing.assert_close(y, expected, **TOL[dtype])


def _reference_qk_rope_kv(qkv, H, G, positions, rope_module, kv, slots, qk_w, eps):
    d = qkv.shape[2]
    qk, v = qkv[:, : H + G], qkv[:, H + G:]
    if qk_w is not None:
        weight = torch.cat((qk_w[0].expand(H, -1), qk_w[1].expand(G, -1)))
        qk = weight * rms_normalize(qk, eps)
    cos, sin = rope_module(positions, qkv.dtype)
    qk = apply_rope(qk, cos, sin)
    kv = kv.clone()
    flat = kv.view(2, -1, G, d)
    keep = slots >= 0
    flat[0].index_copy_(0, slots[keep], qk[keep, H:])
    flat[1].index_copy_(0, slots[keep], v[keep])
    return qk[:, :H], kv


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("rope", [RopeConfig(theta=1e6),
                                  RopeConfig(theta=1e6, rope_type="yarn", factor=4.0,
                                             original_max_position_embeddings=64)])
def test_qk_norm_rope_kv_equals_the_reference(dtype, qk_norm, rope):
    H, G, d, S, N = 8, 2, 64, 4, 12
    g = torch.Generator(device="cpu").manual_seed(3)
    T = 7
    qkv = torch.randn(T, H + 2 * G, d, generator=g).to(DEVICE, dtype)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 4000], device=DEVICE)
    slots = torch.tensor([3, 17, -1, 0, 44, 30, 9], device=DEVICE)  # -1: a padding row writes nothing
    kv = torch.randn(2, N, S, G, d, generator=g).to(DEVICE, dtype)
    qk_w = (1 + 0.1 * torch.randn(2, d, generator=g)).to(DEVICE, dtype) if qk_norm else None
    rotary = RotaryEmbedding(rope, d, 256).to(DEVICE)
    ref_q, ref_kv = _reference_qk_rope_kv(qkv, H, G, positions, rotary, kv, slots, qk_w, 1e-6)
    got_kv = kv.clone()
    q = triton_layers.qk_norm_rope_kv(qkv, H, G, positions, rotary.inv_freq, rotary.attention_factor, got_kv,
                                      slots, qk_w, 1e-6)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(q, ref_q, **tol)
    torch.testing.assert_close(got_kv, ref_kv, **tol)


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("shape", [(1, 2 * 48), (9, 2 * 1536)])
def test_silu_and_mul(dtype, shape):
    h = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(DEVICE, dtype)
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(triton_layers.silu_and_mul(h), F.silu(gate) * up, **TOL[dtype])
