// Replays a recorded sequence of dispatcher calls from C++: the CPU counterpart of a CUDA graph for
// the model wrapper's decode step (lfm_kernels/model/cpu_graph.py records the calls).
//
// A decode step of the full-size model makes about 390 dispatcher calls (the C++ ops, the views
// between them). Made from Python each costs the interpreter, the Python argument parsing and the
// boxing of the call, on caches the step's weight streams have just evicted: about 2-3 ms of a
// 45 ms quantized token. Replayed here, each call is one boxed dispatch of a prepared argument
// stack: the same ops with the same arguments, so the same bits.
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace lfmk {
namespace {

bool is_tensor_type(const c10::TypePtr& t) {
  if (t->kind() == c10::TypeKind::TensorType) return true;
  if (auto opt = t->cast<c10::OptionalType>()) return opt->getElementType()->kind() == c10::TypeKind::TensorType;
  return false;
}

bool is_tensor_list_type(const c10::TypePtr& t) {
  auto list = t->cast<c10::ListType>();
  return list && list->getElementType()->kind() == c10::TypeKind::TensorType;
}

class OpReplay {
 public:
  explicit OpReplay(int64_t num_registers) : nregs_(num_registers) {
    TORCH_CHECK_VALUE(num_registers >= 1, "OpReplay: num_registers must be >= 1, got ", num_registers);
  }

  // One call: the operator `name` (e.g. "aten::view") and its overload ("" for the default);
  // `args`: every argument of its schema in order (None where a register goes; in a tensor list, any
  // tensor as a placeholder); `reg_args`: (argument index, list element or -1, register) triples;
  // `outs`: per return of the schema, its register or -1.
  void add(const std::string& name, const std::string& overload, const py::list& args,
           const std::vector<std::tuple<int64_t, int64_t, int64_t>>& reg_args, const std::vector<int64_t>& outs) {
    TORCH_CHECK_VALUE(!ready_, "OpReplay.add: the replay already ran; record into a new one");
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& schema = handle.schema();
    const auto& formals = schema.arguments();
    TORCH_CHECK_VALUE(args.size() == formals.size(), "OpReplay.add: ", name, " takes ", formals.size(),
                      " arguments, got ", args.size());
    TORCH_CHECK_VALUE(outs.size() == schema.returns().size(), "OpReplay.add: ", name, " has ",
                      schema.returns().size(), " returns, got ", outs.size(), " registers for them");
    std::vector<bool> from_reg(formals.size(), false);
    std::vector<Patch> patches;
    for (const auto& [i, e, r] : reg_args) {
      TORCH_CHECK_VALUE(i >= 0 && i < static_cast<int64_t>(formals.size()), "OpReplay.add: argument index ", i,
                        " out of range for ", name);
      TORCH_CHECK_VALUE(r >= 0 && r < nregs_, "OpReplay.add: register ", r, " out of range [0, ", nregs_, ")");
      if (e < 0) {
        TORCH_CHECK_VALUE(is_tensor_type(formals[i].type()), "OpReplay.add: argument ", formals[i].name(), " of ",
                          name, " is not a tensor; only tensors come from registers");
        from_reg[i] = true;
      } else {
        TORCH_CHECK_VALUE(is_tensor_list_type(formals[i].type()), "OpReplay.add: argument ", formals[i].name(),
                          " of ", name, " is not a tensor list, so it has no element ", e);
        TORCH_CHECK_VALUE(e < static_cast<int64_t>(py::len(args[i])), "OpReplay.add: element ", e, " of argument ",
                          formals[i].name(), " of ", name, " is out of range");
      }
      patches.push_back({i, e, r});
    }
    // list elements after the whole-argument patches, grouped by argument (run() copies each list once)
    std::stable_sort(patches.begin(), patches.end(),
                     [](const Patch& a, const Patch& b) { return (a.elem >= 0) < (b.elem >= 0) || ((a.elem >= 0) == (b.elem >= 0) && a.arg < b.arg); });
    for (size_t k = 0; k < outs.size(); ++k) {
      if (outs[k] < 0) continue;
      TORCH_CHECK_VALUE(outs[k] < nregs_, "OpReplay.add: register ", outs[k], " out of range [0, ", nregs_, ")");
      TORCH_CHECK_VALUE(schema.returns()[k].type()->kind() == c10::TypeKind::TensorType, "OpReplay.add: return ", k,
                        " of ", name, " is not a tensor");
    }
    Call call{handle, {}, std::move(patches), outs, {}};
    call.args.reserve(formals.size());
    // a Python number where the schema has a tensor (`pos + 1`) becomes a wrapped-number tensor, as
    // in a torch.ops call, so type promotion treats it as the number it was
    torch::jit::ToIValueAllowNumbersAsTensors numbers_as_tensors(true);
    for (size_t i = 0; i < formals.size(); ++i)
      call.args.push_back(from_reg[i] ? c10::IValue() : torch::jit::toIValue(args[i], formals[i].type()));
    calls_.push_back(std::move(call));
  }

  // Runs every call in order with inputs in registers [0, inputs) and returns the `results`
  // registers. Each register is released after its last reader, as the eager step drops its
  // intermediates, so the allocator hands the same warm blocks to the next op.
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs, const std::vector<int64_t>& results) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(inputs.size()) <= nregs_, "OpReplay.run: ", inputs.size(),
                      " inputs for ", nregs_, " registers");
    for (int64_t r : results)
      TORCH_CHECK_VALUE(r >= 0 && r < nregs_, "OpReplay.run: result register ", r, " out of range");
    if (!ready_ || results != results_) plan_releases(static_cast<int64_t>(inputs.size()), results);
    std::vector<c10::IValue> regs(static_cast<size_t>(nregs_));
    for (size_t i = 0; i < inputs.size(); ++i) regs[i] = inputs[i];
    {
      py::gil_scoped_release no_gil;  // every op here is a C++ kernel
      c10::InferenceMode inference;
      torch::jit::Stack stack;
      if (profile_) call_ns_.assign(calls_.size(), 0);
      auto t0 = std::chrono::steady_clock::now();
      for (size_t j = 0; j < calls_.size(); ++j) {
        const Call& c = calls_[j];
        stack.assign(c.args.begin(), c.args.end());
        int64_t copied = -1;  // the list argument already copied out of the template
        for (const Patch& p : c.regs) {
          TORCH_CHECK(!regs[p.reg].isNone(), "OpReplay.run: register ", p.reg, " is read before it is written");
          if (p.elem < 0) {
            stack[p.arg] = regs[p.reg];
            continue;
          }
          if (copied != p.arg) {  // the template's list is shared: write into a copy
            stack[p.arg] = stack[p.arg].toTensorList().copy();
            copied = p.arg;
          }
          stack[p.arg].toTensorList().set(p.elem, regs[p.reg].toTensor());
        }
        c.op.callBoxed(&stack);
        for (size_t k = 0; k < c.outs.size(); ++k)
          if (c.outs[k] >= 0) regs[c.outs[k]] = std::move(stack[k]);
        stack.clear();
        for (int64_t r : c.release) regs[r] = c10::IValue();
        if (profile_) {
          const auto t1 = std::chrono::steady_clock::now();
          call_ns_[j] = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
          t0 = t1;
        }
      }
    }
    std::vector<at::Tensor> out;
    out.reserve(results.size());
    for (int64_t r : results) {
      TORCH_CHECK(regs[r].isTensor(), "OpReplay.run: result register ", r, " holds no tensor");
      out.push_back(regs[r].toTensor());
    }
    return out;
  }

  int64_t size() const { return static_cast<int64_t>(calls_.size()); }

  // Diagnostics for the benchmarks: with profiling on, run() keeps each call's wall time (ns,
  // the call and the release of the registers it read last) for call_times().
  void set_profile(bool on) { profile_ = on; }
  std::vector<int64_t> call_times() const { return call_ns_; }

 private:
  struct Patch {
    int64_t arg, elem, reg;  // elem: -1 for the whole argument, else the element of a tensor list
  };
  struct Call {
    c10::OperatorHandle op;
    std::vector<c10::IValue> args;
    std::vector<Patch> regs;  // where registers go: whole arguments first, then list elements
    std::vector<int64_t> outs;
    std::vector<int64_t> release;  // registers read for the last time here (and not results)
  };

  void plan_releases(int64_t ninputs, const std::vector<int64_t>& results) {
    std::vector<int64_t> last(static_cast<size_t>(nregs_), -1);
    for (size_t j = 0; j < calls_.size(); ++j)
      for (const Patch& p : calls_[j].regs) last[p.reg] = static_cast<int64_t>(j);
    for (int64_t r : results) last[r] = -1;
    for (Call& c : calls_) c.release.clear();
    for (int64_t r = 0; r < nregs_; ++r)
      if (last[r] >= 0 && r >= ninputs) calls_[last[r]].release.push_back(r);
    results_ = results;
    ready_ = true;
  }

  int64_t nregs_;
  std::vector<Call> calls_;
  std::vector<int64_t> results_;
  bool ready_ = false;
  bool profile_ = false;
  std::vector<int64_t> call_ns_;
};

}  // namespace

void register_op_replay(py::module_& m) {
  py::class_<OpReplay>(m, "OpReplay", "a recorded sequence of dispatcher calls, replayed from C++")
      .def(py::init<int64_t>(), py::arg("num_registers"))
      .def("add", &OpReplay::add, py::arg("name"), py::arg("overload"), py::arg("args"), py::arg("reg_args"),
           py::arg("outs"))
      .def("run", &OpReplay::run, py::arg("inputs"), py::arg("results"))
      .def("set_profile", &OpReplay::set_profile, py::arg("on"))
      .def("call_times", &OpReplay::call_times)
      .def("__len__", &OpReplay::size);
}

}  // namespace lfmk
