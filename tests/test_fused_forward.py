"""OPLoRA's and HiP-LoRA's fused forwards (one autograd node per projection, HiP-LoRA's two channels in one pair of
matmuls) give the output and the gradients of the update written out as a dense matrix:
``dW = U_k diag(phi) V_k^T + s (I - U_k U_k^T) B A (I - V_k V_k^T)`` (no principal channel for OPLoRA)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from spectral_peft import get_peft_model, method_config
from spectral_peft.adapters.projected_lora import ProjectedLoRA


def dense_update(layer) -> torch.Tensor:
    """``dW`` from the layer's parameters and cached singular vectors, with the projectors as explicit matrices."""
    lora = layer.lora
    U, V = lora.U_S, lora.V_S
    P_L = torch.eye(U.shape[0]) - U @ U.T
    P_R = torch.eye(V.shape[0]) - V @ V.T
    dW = lora.scaling * P_L @ lora.lora_B @ lora.lora_A @ P_R
    if hasattr(layer, "hip_phi"):
        dW = dW + (U * layer.hip_phi) @ V.T
    return dW


def grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("method", ["oplora", "hiplora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5), (7,)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_forward_matches_the_dense_update(method, dtype, shape, x_grad):
    wrapped = get_peft_model(tiny_model("llama", dtype), method_config(method, r=4, k=3), progress=False)
    g = torch.Generator().manual_seed(0)
    for layer in list(wrapped.spectral_layers().values())[:3]:  # q_proj (square), k_proj (wide) and v_proj
        with torch.no_grad():
            layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=g))
            if method == "hiplora":
                layer.hip_phi.copy_(torch.randn(layer.hip_phi.shape, generator=g))
        params = [layer.lora.lora_A, layer.lora.lora_B] + ([layer.hip_phi] if method == "hiplora" else [])
        m, n = layer.shape
        x = torch.randn(*shape, n, generator=g).to(dtype).requires_grad_(x_grad)
        G = torch.randn(*shape, m, generator=g).to(dtype)

        y = layer(x)
        (y.float() * G.float()).sum().backward()
        got = grads(params + ([x] if x_grad else []))
        y_ref = layer.base_layer(x) + (x.float() @ dense_update(layer).T).to(dtype)
        (y_ref.float() * G.float()).sum().backward()
        want = grads(params + ([x] if x_grad else []))

        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert y.dtype == dtype and y.shape == (*shape, m)
        assert torch.allclose(y.float(), y_ref.float(), rtol=tol, atol=tol)
        for a, b in zip(got, want):
            assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("method", ["oplora", "hiplora"])
def test_fp32_model_trains_under_bf16_autocast(method):
    """Mixed precision (fp32 weights, bf16 autocast, backward outside autocast, as Trainer's ``bf16=True`` runs it):
    the adapters' own autograd functions keep their factors' dtype, so the backward does not mix dtypes, and the
    gradients are those of the fp32 step to bf16 precision."""
    wrapped = get_peft_model(tiny_model("llama"), method_config(method, r=4, k=3), progress=False)
    with torch.no_grad():
        for layer in wrapped.spectral_layers().values():
            layer.lora.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    params = [p for p in wrapped.parameters() if p.requires_grad]
    wrapped(input_ids=ids, labels=ids).loss.backward()
    want = grads(params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    got = grads(params)
    assert all(a.dtype == torch.float32 for a in got)
    got, want = torch.cat([a.flatten() for a in got]), torch.cat([b.flatten() for b in want])
    assert float((got - want).norm()) <= 0.05 * float(want.norm())


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("protected", [3, 0])
def test_projected_factors_and_their_gradients(inside, soft, protected):
    g = torch.Generator().manual_seed(1)
    m, n, r, s = 12, 9, 3, 1.5
    U = torch.linalg.qr(torch.randn(m, protected, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, protected, generator=g))[0]
    w = torch.rand(protected, generator=g) if soft else torch.ones(protected)
    lora = ProjectedLoRA((m, n), r, s, U, V, w if soft else None, inside=inside)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(m, r, generator=g))
    M_L, M_R = (U * w) @ U.T, (V * w) @ V.T
    if not inside:
        M_L, M_R = torch.eye(m) - M_L, torch.eye(n) - M_R
    G = torch.randn(m, n, generator=g)

    B, A = lora.factors()
    (B @ A * G).sum().backward()
    got = grads([lora.lora_A, lora.lora_B])
    ref = s * M_L @ lora.lora_B @ lora.lora_A @ M_R
    (ref * G).sum().backward()
    want = grads([lora.lora_A, lora.lora_B])

    assert torch.allclose(B @ A, ref, atol=1e-5)
    assert torch.allclose(lora.projected_factors()[0] * s, B, atol=1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4)
