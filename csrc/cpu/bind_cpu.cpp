// Python bindings of the fused CPU kernels (module fastsgd._C).
//
// The functions take raw addresses and sizes, never torch objects; the
// checks on devices, dtypes, shapes and layouts happen in
// fastsgd/kernels/cpu.py, which builds the tables. The layouts of the tables
// and the dtype codes are exported so Python can check it agrees with them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cpu/lamb.h"
#include "cpu/numeric.h"
#include "cpu/sgd.h"
#include "cpu/work.h"

namespace py = pybind11;

namespace fastsgd {

void bind_cpu(py::module_& m) {
  using namespace cpu;
  py::dict codes;
  codes["float32"] = int64_t(kFloat32);
  codes["float64"] = int64_t(kFloat64);
  codes["bfloat16"] = int64_t(kBFloat16);
  codes["float16"] = int64_t(kFloat16);
  m.attr("cpu_dtype_codes") = codes;
  m.attr("cpu_chunk") = py::int_(cpu::kChunk);  // segment / work-item size, for tests at its boundary
  m.attr("cpu_block") = py::int_(cpu::kBlock);           // update block of the tensor-by-tensor LARS/LAMB walk
  m.attr("cpu_whole_max") = py::int_(cpu::kWholeMax);    // larger entries are split over the threads
  m.attr("cpu_two_pass_env") = py::str(cpu::kTwoPassEnv);  // set to 1: LARS/LAMB sweep all norms, then all updates
  m.def("cpu_two_pass_forced", &cpu::two_pass_forced, "Whether the LARS/LAMB kernels run the two-sweep form now.");
  m.def(
      "cpu_reduce_plan",
      [](const std::vector<int64_t>& numel, int threads) {
        const ReducePlan rp = make_reduce_plan(make_plan(numel), threads);
        py::list items;
        for (int64_t k = 0; k < rp.num_items(); ++k) {
          py::list item;
          for (int64_t i = rp.item_start[size_t(k)]; i < rp.item_start[size_t(k) + 1]; ++i) item.append(rp.whole[size_t(i)]);
          items.append(item);
        }
        return py::make_tuple(rp.shared, items);
      },
      "How the LARS/LAMB kernels split entries of these sizes over `threads` threads:\n"
      "(entries shared by all threads, work items of whole entries in the order they are handed out).",
      py::arg("numel"), py::arg("threads"));
  m.attr("cpu_sgd_table_fields") =
      py::make_tuple("param", "grad", "buf", "numel", "param_dtype", "buf_dtype", "first_step");
  m.attr("cpu_lamb_table_fields") = py::make_tuple("param", "grad", "exp_avg", "exp_avg_sq", "step", "numel",
                                                   "param_dtype", "state_dtype", "step_dtype");
  static_assert(kSgdTableWidth == 7 && kLambTableWidth == 9, "update the exported field names");

  m.def("cpu_sgd_step", &sgd_step, py::call_guard<py::gil_scoped_release>(),
        "SGD / momentum / Nesterov over a table of CPU tensors in one pass.\n\n"
        "table: address of a C-contiguous int64 array [num_entries, 7] (see cpu_sgd_table_fields);\n"
        "hparams: 0 or the address of float64 (lr, momentum) pairs per entry (stacked trials).",
        py::arg("table"), py::arg("num_entries"), py::arg("hparams"), py::arg("lr"), py::arg("momentum"),
        py::arg("dampening"), py::arg("weight_decay"), py::arg("grad_scale"), py::arg("maximize"),
        py::arg("nesterov"), py::arg("lr_in_momentum"), py::arg("threads"));
  m.def("cpu_lars_step", &lars_step, py::call_guard<py::gil_scoped_release>(),
        "LARS (timm's rule) over a table of CPU tensors: per-tensor norms, then the momentum pass.\n\n"
        "table: as for cpu_sgd_step.",
        py::arg("table"), py::arg("num_entries"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
        py::arg("weight_decay"), py::arg("grad_scale"), py::arg("nesterov"), py::arg("trust_coeff"),
        py::arg("eps"), py::arg("trust_clip"), py::arg("always_adapt"), py::arg("lr_in_momentum"),
        py::arg("threads"));
  m.def("cpu_lamb_step", &lamb_step, py::call_guard<py::gil_scoped_release>(),
        "LAMB over a table of CPU tensors; increments each entry's step tensor.\n\n"
        "table: address of a C-contiguous int64 array [num_entries, 9] (see cpu_lamb_table_fields);\n"
        "grad_divisor: gradients are divided by it (grad_scale times the clipping divisor).",
        py::arg("table"), py::arg("num_entries"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("bias_correction"), py::arg("trust_clip"), py::arg("always_adapt"),
        py::arg("grad_divisor"), py::arg("threads"));
}

}  // namespace fastsgd
