"""The attention kernel choice and the CPU-fast layer forms compute what the plain forms compute."""

import pytest
import torch
import torch.nn.functional as F

from fifo_stream.models.attention import SHORT_KEYS, attend
from fifo_stream.models.unet_blocks import GEGLU, GroupNorm32


def qkv(keys, dtype=torch.float32, batch=6, heads=2, queries=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=g) * 3  # large logits: the softmax must subtract its max
    k, v = (torch.randn(batch, heads, keys, dim, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("keys", [1, 8, 16, SHORT_KEYS])
def test_short_key_attention_equals_the_fused_kernel_in_fp32(keys):
    q, k, v = qkv(keys)
    mask = torch.randn(1, 1, 5, keys)
    assert torch.allclose(attend(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    assert torch.allclose(attend(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)


def test_short_key_attention_in_bf16_is_as_close_to_fp32_as_the_fused_kernel():
    q, k, v = qkv(8, torch.bfloat16)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ours = (attend(q, k, v).float() - exact).abs().max()
    fused = (F.scaled_dot_product_attention(q, k, v).float() - exact).abs().max()
    assert ours.item() <= max(3 * fused.item(), 2 ** -6)  # a few bf16 ulps of values about 1


def test_long_key_attention_uses_the_fused_kernel_and_gradients_flow():
    q, k, v = qkv(SHORT_KEYS + 1)
    assert torch.equal(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v = (t.requires_grad_() for t in qkv(8))
    attend(q, k, v).square().sum().backward()  # training runs the short-key path too
    reference = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*reference).square().sum().backward()
    for ours, theirs in zip((q, k, v), reference):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-5)


def test_geglu_in_two_products_equals_the_chunked_product():
    layer = GEGLU(8, 12)
    x = torch.randn(3, 7, 8)
    a, gate = layer.proj(x).chunk(2, dim=-1)
    assert torch.allclose(layer(x), a * F.gelu(gate), atol=1e-6)


def test_bf16_group_norm_on_the_cpu_normalizes_in_float32():
    norm = GroupNorm32(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, 8, 5, 5) * 10 + 50).bfloat16()  # a large mean: bf16 statistics would lose the signal
    expected = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
    norm.to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() <= 2 ** -7 * expected.abs().max()
