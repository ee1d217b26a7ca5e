// The Python bindings of this service's CPU kernels (kernels.h), one extension built by app/kernel_build.py. Only
// this file includes torch's Python bindings (pybind11 and its tensor conversions); the kernels include the few ATen
// headers they use, and the first build takes ~25 s instead of ~70 s with torch's whole extension API in every file.

#include "kernels.h"

#include <torch/python.h>
#include <pybind11/functional.h>  // LM.step's before_layer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &musicgen::pack, "int8 [N, K] -> the int8 kernel's layout");
  m.def("linear", &musicgen::linear, "float input x packed int8 weight -> float");
  m.def("attend", &musicgen::attend, "one query's attention over fp16 keys and values, or int8 ones with scales",
        pybind11::arg("query"), pybind11::arg("keys"), pybind11::arg("values"),
        pybind11::arg("key_scales") = pybind11::none(), pybind11::arg("value_scales") = pybind11::none());
  m.def("store_int8", &musicgen::store_rows_int8, "a step's keys or values into an int8 cache and its scales");
  pybind11::class_<musicgen::Layer>(m, "Layer")
      .def(pybind11::init<int64_t, const std::string&, musicgen::Layer::Norm, musicgen::Layer::Product,
                          musicgen::Layer::Product, c10::optional<musicgen::Layer::Norm>,
                          c10::optional<musicgen::Layer::Product>, c10::optional<musicgen::Layer::Product>,
                          musicgen::Layer::Norm, musicgen::Layer::Product, musicgen::Layer::Product>())
      .def("step", &musicgen::Layer::step, "the layer's decoding step for one new token", pybind11::arg("x"),
           pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("length"), pybind11::arg("cross_keys"),
           pybind11::arg("cross_values"), pybind11::arg("key_scales") = pybind11::none(),
           pybind11::arg("value_scales") = pybind11::none());
  // Its step runs for a whole decoding step (~15 ms at musicgen-small's size) on tensors alone: the server's other
  // threads keep the interpreter meanwhile, as they do while torch's own operators run (a `before_layer` takes it
  // back for its own call, and what it raises comes out of the step).
  pybind11::class_<musicgen::LM>(m, "LM")
      .def(pybind11::init<std::vector<at::Tensor>, at::Tensor, double, std::vector<musicgen::Layer>,
                          c10::optional<musicgen::Layer::Norm>, std::vector<musicgen::Layer::Product>>())
      .def("step", &musicgen::LM::step, "the LM's decoding step for one new token of every codebook",
           pybind11::arg("tokens"), pybind11::arg("position"), pybind11::arg("length"), pybind11::arg("keys"),
           pybind11::arg("values"), pybind11::arg("cross_keys"), pybind11::arg("cross_values"),
           pybind11::arg("key_scales"), pybind11::arg("value_scales"), pybind11::arg("before_layer") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
