// The Python module fastguide._C. Importing it runs the static op registrations of every
// kernel file (TORCH_LIBRARY_FRAGMENT(fastguide, ...)); the ops are then torch.ops.fastguide.*.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastguide, m) {}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastguide C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&module);
}
