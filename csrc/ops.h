// Declarations of the CPU kernels registered in registration.cpp.
// Layouts follow scaled_dot_product_attention: q [B, H, N, D], k/v [B, H, L, D].
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fused_cpp {

// The attention op (schema: fused/_library.py). out [B,H,N,D]; maps [B,T,N] (head_mean) or [B,H,T,N], T = 0
// without token_index; lse [B,H,N]. key_mask bool [B,L] hides keys.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& token_index, const std::optional<at::Tensor>& key_mask,
    double scale, bool head_mean);

// dq, dk, dv. grad_maps is absent when the maps did not receive a gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& token_index, const std::optional<at::Tensor>& key_mask,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_maps, double scale, bool head_mean);

// threshold [...], mask bool [..., N]; maps float32/float64 [..., N].
std::tuple<at::Tensor, at::Tensor> otsu_mask(const at::Tensor& maps, int64_t bins,
                                             const std::string& mode);

}  // namespace fused_cpp
