// How autograd sees the in-place ops (sparse_accumulate_, masked_sgd_, masked_adam_): as it sees torch's own
// in-place ops. Without these kernels the dispatcher passed them straight through, so a backward through a
// graph that had saved a tensor the op then changed used the new values: a silently wrong gradient where
// torch's index_add_ raises.
//   ADInplaceOrView: bumps the version counter of every tensor the op writes (the schema's Tensor(a!)
//     arguments), so such a backward raises "modified by an inplace operation"; this key runs in
//     torch.no_grad() and inference mode too, like torch's.
//   Autograd: refuses, under grad mode, a leaf that requires grad (or a view of one), and gives every written
//     tensor a NotImplemented history when an input requires grad, so backpropagating through the op
//     raises instead of treating it as the identity. The ops are update steps: call them under
//     torch.no_grad(), as torch.optim does.
// Both are boxed kernels that read the written arguments from the schema, registered for every in-place op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <vector>

namespace unlearn_ext {
namespace {

constexpr const char* kInplaceOps[] = {"sparse_accumulate_", "masked_sgd_", "masked_adam_"};

// The tensors of the op's arguments on the stack (before the call): all of them, and those the schema marks
// as written.
struct TensorArgs {
  std::vector<at::Tensor> all, written;
};

TensorArgs tensor_args(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t start = stack.size() - args.size();
  TensorArgs out;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    const bool written = alias != nullptr && alias->isWrite();
    auto add = [&](const at::Tensor& t) {
      if (!t.defined()) return;
      out.all.push_back(t);
      if (written) out.written.push_back(t);
    };
    const c10::IValue& v = stack[start + i];
    if (v.isTensor()) {
      add(v.toTensor());
    } else if (v.isTensorList()) {
      for (const c10::IValue& e : v.toListRef()) add(e.toTensor());
    }
  }
  return out;
}

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const std::vector<at::Tensor> written = tensor_args(op, *stack).written;
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) torch::autograd::increment_version(t);
}

void record_inplace_history(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const TensorArgs args = tensor_args(op, *stack);
  std::vector<at::Tensor> needing_grad;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : args.all) {
      if (t.requires_grad()) needing_grad.push_back(t);
    }
  }
  const bool any_requires_grad = !needing_grad.empty();
  for (const at::Tensor& t : args.written) torch::autograd::check_inplace(t, any_requires_grad);
  c10::intrusive_ptr<torch::autograd::Node> grad_fn;
  if (any_requires_grad) {
    grad_fn = c10::make_intrusive<torch::autograd::NotImplemented>(
        op.schema().name(), torch::autograd::collect_next_edges(needing_grad));
  }
  {
    const at::AutoDispatchBelowAutograd guard;
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }
  if (grad_fn) torch::autograd::rebase_history(args.written, grad_fn);
}

}  // namespace
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, ADInplaceOrView, m) {
  for (const char* name : unlearn_ext::kInplaceOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&unlearn_ext::bump_written_versions>());
  }
}

TORCH_LIBRARY_IMPL(unlearn_ext, Autograd, m) {
  for (const char* name : unlearn_ext::kInplaceOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&unlearn_ext::record_inplace_history>());
  }
}
