// The one TORCH_LIBRARY registration of the CPU kernels: they become
// torch.ops.fused_cpp.*, which torch.compile traces through the fake
// implementations registered in fused/_cpp.py (pybind11 bindings would break
// the graph).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fused_cpp, m) {
  m.def("attention_with_maps(Tensor q, Tensor k, Tensor v, Tensor token_index, float scale, bool head_mean)"
        " -> (Tensor out, Tensor maps, Tensor lse)");
  m.def("attention_with_maps_backward(Tensor q, Tensor k, Tensor v, Tensor token_index, Tensor out,"
        " Tensor lse, Tensor grad_out, Tensor? grad_maps, float scale, bool head_mean)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("masked_attention(Tensor q, Tensor k, Tensor v, Tensor key_mask, float scale)"
        " -> (Tensor out, Tensor lse)");
  m.def("masked_attention_backward(Tensor q, Tensor k, Tensor v, Tensor key_mask, Tensor out,"
        " Tensor lse, Tensor grad_out, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("otsu_mask(Tensor maps, int bins, str mode) -> (Tensor threshold, Tensor mask)");
}

TORCH_LIBRARY_IMPL(fused_cpp, CPU, m) {
  m.impl("attention_with_maps", &fused_cpp::attention_with_maps);
  m.impl("attention_with_maps_backward", &fused_cpp::attention_with_maps_backward);
  m.impl("masked_attention", &fused_cpp::masked_attention);
  m.impl("masked_attention_backward", &fused_cpp::masked_attention_backward);
  m.impl("otsu_mask", &fused_cpp::otsu_mask);
}
