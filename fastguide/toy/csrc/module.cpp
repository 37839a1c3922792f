// The Python module fastguide.toy._C: the toy experiment's CPU kernels.  Importing it runs the
// static op registrations of mixture.cpp and sampler.cpp; the ops are then torch.ops.fastguide_toy.*
// (mixture_score, silu_derivatives, sample).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastguide_toy, m) {}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastguide toy experiment CPU kernels", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
