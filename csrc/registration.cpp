// The CPU kernels as implementations of torch.ops.fused_cpp.*. The schemas are
// declared once, in Python (fused/_library.py), before this library is loaded;
// torch.compile traces the ops through the fake implementations registered there
// (pybind11 bindings would break the graph).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(fused_cpp, CPU, m) {
  m.impl("attention", &fused_cpp::attention);
  m.impl("attention_backward", &fused_cpp::attention_backward);
  m.impl("otsu_mask", &fused_cpp::otsu_mask);
}
