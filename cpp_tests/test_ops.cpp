// C++ tests of the unlearn_ext ops through the dispatcher (no Python): small inputs with hand-computed
// expectations for layerwise_topk (values / indices / offsets, a tie at the threshold, largest=false,
// the subtract= form), layerwise_topk_mask, sparse_accumulate_ (B = 2 updates, a repeated index across
// updates, nothing written on a bad index), masked_sgd_ (frozen coordinates bitwise unchanged, SGD step
// on the selected ones), the ValueErrors of a bad ratio, of NaN and of written tensors that share memory,
// and the version counters the in-place ops bump. When the library was built with the CUDA kernels and a
// GPU is present, the CUDA kernels are compared with the CPU ones; otherwise that test prints SKIPPED and
// why (no CUDA device, not built with CUDA), never "ok".
//
// The ops are looked up by name (findSchemaOrThrow), so this binary links libunlearn_ext only for the
// registrations its static initialisers make.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "select.h"  // keep_count

namespace {

int g_failures = 0;
int g_checks = 0;
// Set by a test that could not run, to why: main then prints SKIPPED and the reason, never "ok".
const char* g_skip_reason = nullptr;

#define EXPECT(cond)                                                                   \
  do {                                                                                \
    ++g_checks;                                                                       \
    if (!(cond)) {                                                                    \
      ++g_failures;                                                                   \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond);   \
    }                                                                                 \
  } while (0)

// ---- the ops, through the dispatcher ----

using TopkFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(at::TensorList, double, bool,
                                                              std::optional<at::TensorList>);
using MaskFn = std::vector<at::Tensor>(at::TensorList, double, bool);
using AccumulateFn = void(at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
using SgdFn = void(at::TensorList, at::TensorList, at::TensorList, std::optional<at::TensorList>, double, double,
                   double, double, double, bool, bool, double);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layerwise_topk(at::TensorList xs, double ratio, bool largest = true,
                                                              std::optional<at::TensorList> subtract = std::nullopt) {
  static const auto h = op<TopkFn>("unlearn_ext::layerwise_topk");
  return h.call(xs, ratio, largest, subtract);
}

std::vector<at::Tensor> layerwise_topk_mask(at::TensorList xs, double ratio, bool largest = true) {
  static const auto h = op<MaskFn>("unlearn_ext::layerwise_topk_mask");
  return h.call(xs, ratio, largest);
}

void sparse_accumulate_(at::TensorList dense, const at::Tensor& values, const at::Tensor& indices,
                        const at::Tensor& offsets, double alpha) {
  static const auto h = op<AccumulateFn>("unlearn_ext::sparse_accumulate_");
  h.call(dense, values, indices, offsets, alpha);
}

struct Sgd {
  double ratio = 1.0, lr = 0.1, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, maximize = false;
  double off_scale = 0.0;
};

void masked_sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                 std::optional<at::TensorList> masks, const Sgd& o) {
  static const auto h = op<SgdFn>("unlearn_ext::masked_sgd_");
  h.call(params, grads, bufs, masks, o.ratio, o.lr, o.momentum, o.dampening, o.weight_decay, o.nesterov,
         o.maximize, o.off_scale);
}

// ---- helpers ----

at::Tensor f32(std::vector<float> v) { return at::tensor(v, at::kFloat); }
at::Tensor i32(std::vector<int32_t> v) { return at::tensor(v, at::kInt); }
at::Tensor i64(std::vector<int64_t> v) { return at::tensor(v, at::kLong); }

bool same(const at::Tensor& a, const at::Tensor& b) {  // dtype, shape and every bit
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ac = a.cpu().contiguous(), bc = b.cpu().contiguous();
  return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.nbytes()) == 0;
}

void print_mismatch(const char* what, const at::Tensor& got, const at::Tensor& want) {
  if (!same(got, want)) {
    std::ostringstream os;
    os << "  " << what << ": got " << got.toString() << "\n" << got.cpu() << "\n  want " << want.toString()
       << "\n" << want.cpu() << "\n";
    std::fprintf(stderr, "%s", os.str().c_str());
  }
}

#define CHECK_SAME(got, want)              \
  do {                                     \
    print_mismatch(#got, (got), (want));   \
    EXPECT(same((got), (want)));            \
  } while (0)

// Runs f and reports whether it threw c10::ValueError (Python ValueError) whose message holds `needle`.
bool throws_value_error(const std::function<void()>& f, const char* needle) {
  try {
    f();
  } catch (const c10::ValueError& e) {
    const bool ok = std::string(e.what()).find(needle) != std::string::npos;
    if (!ok) std::fprintf(stderr, "  ValueError without \"%s\": %s\n", needle, e.what());
    return ok;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "  unexpected exception type: %s\n", e.what());
    return false;
  }
  std::fprintf(stderr, "  no exception (expected ValueError \"%s\")\n", needle);
  return false;
}

// ---- tests ----

// Layer 0: |x| = 3 5 1 5 2 5, ratio 1/3 -> k = 2 of the three tied 5s: the lower indices 1, 3.
// Layer 1: |x| = .5 .25 .75 .5, k = ceil(4/3) = 2: .75 (index 2), then the tie .5 -> index 0.
// Layer 2: empty, k = 0.  Layer 3: one element, k = max(1, ceil(1/3)) = 1.
void test_topk() {
  const std::vector<at::Tensor> xs = {f32({3, -5, 1, 5, 2, -5}).view({2, 3}), f32({0.5f, -0.25f, 0.75f, 0.5f}),
                                      f32({}), f32({-7})};
  auto [values, indices, offsets] = layerwise_topk(xs, 1.0 / 3.0);
  CHECK_SAME(values, f32({-5, 5, 0.5f, 0.75f, -7}));
  CHECK_SAME(indices, i32({1, 3, 0, 2, 0}));
  CHECK_SAME(offsets, i64({0, 2, 4, 4, 5}));

  // largest=false: smallest |x|; layer 1 ties .5 at 0 and 3 after .25 -> {1, 0}.
  auto [sv, si, so] = layerwise_topk(xs, 1.0 / 3.0, /*largest=*/false);
  CHECK_SAME(sv, f32({1, 2, 0.5f, -0.25f, -7}));
  CHECK_SAME(si, i32({2, 4, 0, 1, 0}));
  CHECK_SAME(so, i64({0, 2, 4, 4, 5}));

  // ratio 1 keeps everything, in index order.
  auto [av, ai, ao] = layerwise_topk({xs[1]}, 1.0);
  CHECK_SAME(av, f32({0.5f, -0.25f, 0.75f, 0.5f}));
  CHECK_SAME(ai, i32({0, 1, 2, 3}));
  CHECK_SAME(ao, i64({0, 4}));

  // subtract=: selects on the update d = after - before and returns its signed values.
  // d = [1, -4, 0.5, 4, 0] -> k = ceil(0.4 * 5) = 2: the tie |4| at indices 1 and 3.
  const at::Tensor before = f32({1, 2, 3, 4, 5}), after = f32({2, -2, 3.5f, 8, 5});
  const std::vector<at::Tensor> sub = {before};
  auto [dv, di, dof] = layerwise_topk({after}, 0.4, true, at::TensorList(sub));
  CHECK_SAME(dv, f32({-4, 4}));
  CHECK_SAME(di, i32({1, 3}));
  CHECK_SAME(dof, i64({0, 2}));

  // float16 / bfloat16: the same selection, values in the input dtype.
  for (const auto dt : {at::kHalf, at::kBFloat16}) {
    auto [hv, hi, ho] = layerwise_topk({xs[0].to(dt), xs[1].to(dt)}, 1.0 / 3.0);
    CHECK_SAME(hv, f32({-5, 5, 0.5f, 0.75f}).to(dt));
    CHECK_SAME(hi, i32({1, 3, 0, 2}));
    CHECK_SAME(ho, i64({0, 2, 4}));
  }

  // The ratio 0.1 on 30 elements keeps 3 (r*n = 3.0000000000000004 counts as 3).
  auto [tv, ti, to] = layerwise_topk({at::arange(30, at::kFloat)}, 0.1);
  CHECK_SAME(ti, i32({27, 28, 29}));
}

// Big layers (the sampled-bracket path) and a mid-size one (the radix path), with many ties (values on a
// grid of 1/16), against a stable sort: the k largest (or smallest) |value|, ties to the lower index.
// Built by cpp_tests/run.sh without the per-ISA clones, so this checks the baseline x86-64 code that the
// Python tests (run on whatever the CPU picks) may not reach.
void test_topk_big_layers_match_a_stable_sort() {
  at::manual_seed(7);
  const std::vector<int64_t> sizes = {200003, 5000, 65536 * 3 + 17};
  std::vector<at::Tensor> after, before;
  for (int64_t n : sizes) {
    before.push_back(at::round(at::randn({n}) * 16) / 16);
    after.push_back(before.back() + at::round(at::randn({n}) * 8) / 16);
  }
  for (const bool subtract : {false, true}) {
    for (const bool largest : {true, false}) {
      for (const double ratio : {0.01, 0.1, 0.5}) {
        const std::vector<at::Tensor> sub = before;
        auto [values, indices, offsets] =
            subtract ? layerwise_topk(after, ratio, largest, at::TensorList(sub)) : layerwise_topk(after, ratio, largest);
        const auto masks = layerwise_topk_mask(after, ratio, largest);
        for (size_t l = 0; l < sizes.size(); ++l) {
          const at::Tensor ranked = subtract ? after[l] - before[l] : after[l];
          const int64_t k = unlearn_ext::keep_count(sizes[l], ratio);
          const at::Tensor order = std::get<1>(at::sort(ranked.abs(), /*stable=*/true, 0, /*descending=*/largest));
          const at::Tensor want = std::get<0>(at::sort(order.slice(0, 0, k)));
          const int64_t lo = offsets[l].item<int64_t>(), hi = offsets[l + 1].item<int64_t>();
          CHECK_SAME(indices.slice(0, lo, hi), want.to(at::kInt));
          CHECK_SAME(values.slice(0, lo, hi), ranked.index_select(0, want));
          if (!subtract) {
            CHECK_SAME(masks[l], at::zeros({sizes[l]}, at::kBool).index_fill_(0, want, true));
          }
        }
      }
    }
  }
}

void test_topk_mask() {
  const std::vector<at::Tensor> xs = {f32({3, -5, 1, 5, 2, -5}).view({2, 3}), f32({0.5f, -0.25f, 0.75f, 0.5f})};
  const auto masks = layerwise_topk_mask(xs, 1.0 / 3.0);
  EXPECT(masks.size() == 2);
  CHECK_SAME(masks[0], at::tensor(std::vector<uint8_t>{0, 1, 0, 1, 0, 0}).to(at::kBool).view({2, 3}));
  CHECK_SAME(masks[1], at::tensor(std::vector<uint8_t>{1, 0, 1, 0}).to(at::kBool));
}

void test_sparse_accumulate() {
  // Two layers, B = 2 stored updates; index 1 of layer 0 appears in both.
  const std::vector<at::Tensor> dense = {f32({10, 20, 30}), f32({1, 2, 3, 4})};
  const at::Tensor values = f32({1, 2, 0.5f, 4, -8, 16});
  const at::Tensor indices = i32({0, 1, 3, 1, 2, 0});
  const at::Tensor offsets = i64({0, 2, 3, 5, 6});  // (b0, l0) (b0, l1) (b1, l0) (b1, l1)
  sparse_accumulate_(dense, values, indices, offsets, -1.0);
  CHECK_SAME(dense[0], f32({9, 14, 38}));
  CHECK_SAME(dense[1], f32({-15, 2, 3, 3.5f}));

  // alpha = 0.5 on a float16 layer and a bfloat16 values tensor.
  const std::vector<at::Tensor> half = {f32({1, 1}).to(at::kHalf)};
  sparse_accumulate_(half, f32({2, 4}).to(at::kBFloat16), i32({0, 1}), i64({0, 2}), 0.5);
  CHECK_SAME(half[0], f32({2, 3}).to(at::kHalf));

  // Bad input raises ValueError and writes nothing.
  const at::Tensor keep0 = dense[0].clone(), keep1 = dense[1].clone();
  EXPECT(throws_value_error([&] { sparse_accumulate_(dense, f32({1, 1}), i32({3, 0}), i64({0, 1, 2}), 1.0); },
                           "out of range"));
  EXPECT(throws_value_error([&] { sparse_accumulate_(dense, f32({1, 1, 1}), i32({0, 1, 2}), i64({0, 1, 2, 3}), 1.0); },
                           "multiple"));
  EXPECT(throws_value_error([&] { sparse_accumulate_(dense, f32({1, 1}), i32({0}), i64({0, 1, 1}), 1.0); },
                           "entries"));
  CHECK_SAME(dense[0], keep0);
  CHECK_SAME(dense[1], keep1);
}

void test_masked_sgd() {
  // ratio 0.5 of |grad|: layer 0 keeps indices 1, 3 (|g| 4 and 3); layer 1 keeps index 0.
  const float lr = 0.1f, wd = 0.01f, mom = 0.9f;
  const at::Tensor p0 = f32({1, -2, 3, 4}), g0 = f32({0.5f, -4, 1, 3});
  const at::Tensor p1 = f32({5, 6}), g1 = f32({-2, 1});
  const at::Tensor b0 = f32({0.25f, 0.5f, -1, 2}), b1 = f32({0.125f, 7});
  std::vector<at::Tensor> params = {p0.clone(), p1.clone()}, bufs = {b0.clone(), b1.clone()};
  Sgd o;
  o.ratio = 0.5;
  o.lr = lr;
  o.momentum = mom;
  o.weight_decay = wd;
  masked_sgd_(params, {g0, g1}, bufs, std::nullopt, o);

  // torch.optim.SGD on a selected coordinate: d = g + wd p; b = mom b + d; p -= lr b (float32).
  auto step = [&](float p, float g, float b, float* new_b) {
    const float d = g + wd * p;
    *new_b = b * mom + 1.0f * d;
    return p + (-lr) * *new_b;
  };
  float nb01, nb03, nb10;
  const float np01 = step(-2, -4, 0.5f, &nb01), np03 = step(4, 3, 2, &nb03), np10 = step(5, -2, 0.125f, &nb10);
  // Frozen coordinates (0, 2 of layer 0; 1 of layer 1) keep their bits, param and buffer.
  CHECK_SAME(params[0], f32({1, np01, 3, np03}));
  CHECK_SAME(bufs[0], f32({0.25f, nb01, -1, nb03}));
  CHECK_SAME(params[1], f32({np10, 6}));
  CHECK_SAME(bufs[1], f32({nb10, 7}));

  // Explicit masks, momentum 0 with no buffers: plain masked SGD.
  std::vector<at::Tensor> q = {p0.clone()};
  const std::vector<at::Tensor> m = {at::tensor(std::vector<uint8_t>{1, 0, 0, 1}).to(at::kBool)};
  Sgd plain;
  plain.lr = 0.5;
  masked_sgd_(q, {g0}, {}, at::TensorList(m), plain);
  CHECK_SAME(q[0], f32({1 - 0.5f * 0.5f, -2, 3, 4 - 0.5f * 3}));

  // off_scale > 0: unselected coordinates take the step on the scaled gradient.
  std::vector<at::Tensor> r = {p0.clone()};
  plain.off_scale = 0.1;
  masked_sgd_(r, {g0}, {}, at::TensorList(m), plain);
  const float off = static_cast<float>(0.1);
  CHECK_SAME(r[0], f32({1 - 0.5f * 0.5f, -2 + (-0.5f) * (-4 * off), 3 + (-0.5f) * (1 * off), 4 - 0.5f * 3}));
}

void test_errors() {
  const std::vector<at::Tensor> xs = {f32({1, 2, 3})};
  for (const double bad : {0.0, -0.5, 1.5, std::nan("")}) {
    EXPECT(throws_value_error([&] { layerwise_topk(xs, bad); }, "ratio"));
    EXPECT(throws_value_error([&] { layerwise_topk_mask(xs, bad); }, "ratio"));
    std::vector<at::Tensor> p = {f32({1, 2, 3})};
    Sgd o;
    o.ratio = bad;
    EXPECT(throws_value_error([&] { masked_sgd_(p, xs, {}, std::nullopt, o); }, "ratio"));
  }
  // NaN in a selected-from layer: ValueError naming the layer; masked_sgd_ writes nothing.
  const std::vector<at::Tensor> nan_xs = {f32({1, 2}), f32({1, NAN, 3})};
  EXPECT(throws_value_error([&] { layerwise_topk(nan_xs, 0.5); }, "xs[1]"));
  EXPECT(throws_value_error([&] { layerwise_topk_mask(nan_xs, 0.5); }, "xs[1]"));
  std::vector<at::Tensor> p = {f32({1, 2}), f32({4, 5, 6})};
  Sgd o;
  o.ratio = 0.5;
  EXPECT(throws_value_error([&] { masked_sgd_(p, nan_xs, {}, std::nullopt, o); }, "grads[1]"));
  CHECK_SAME(p[0], f32({1, 2}));
  CHECK_SAME(p[1], f32({4, 5, 6}));

  // Messages start with the op (csrc/checks.h), whichever check fails.
  EXPECT(throws_value_error([&] { layerwise_topk(xs, 1.5); }, "layerwise_topk: ratio must be in (0, 1]"));
  EXPECT(throws_value_error([&] { masked_sgd_(p, {f32({1, 2})}, {}, std::nullopt, o); },
                            "masked_sgd_: grads has 1 tensors but params has 2"));

  // Tensors written in place must not share memory: one tensor twice, or overlapping views.
  const at::Tensor d = f32({0, 0, 0, 0});
  const std::vector<at::Tensor> twice = {d, d}, overlapping = {d.slice(0, 0, 3), d.slice(0, 2, 4)};
  for (const auto& dense : {twice, overlapping}) {
    EXPECT(throws_value_error([&] { sparse_accumulate_(dense, f32({1, 1}), i32({0, 0}), i64({0, 1, 2}), 1.0); },
                              "sparse_accumulate_: dense[0] and dense[1] share memory"));
  }
  CHECK_SAME(d, f32({0, 0, 0, 0}));
}

// The in-place ops bump the version counter of every tensor they write (csrc/autograd.cpp), so autograd
// notices that a tensor it saved has changed.
void test_version_counters() {
  const at::Tensor d = f32({0, 0});
  const int64_t before = d._version();
  sparse_accumulate_({d}, f32({1}), i32({1}), i64({0, 1}), 1.0);
  EXPECT(d._version() == before + 1);
  std::vector<at::Tensor> params = {f32({1, 2})}, bufs = {f32({0, 0})};
  const int64_t p_before = params[0]._version(), b_before = bufs[0]._version();
  Sgd o;
  o.momentum = 0.9;
  masked_sgd_(params, {f32({1, 1})}, bufs, std::nullopt, o);
  EXPECT(params[0]._version() == p_before + 1 && bufs[0]._version() == b_before + 1);
}

// The CUDA kernels against the CPU ones (only with a GPU and a CUDA build of the library).
void test_cuda_matches_cpu() {
  const bool has_device = at::hasCUDA();
  const bool has_kernels = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("unlearn_ext::layerwise_topk", "")
                               .hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  if (!has_kernels) {
    g_skip_reason = has_device ? "not built with CUDA" : "no CUDA device; not built with CUDA";
    return;
  }
  if (!has_device) {
    g_skip_reason = "no CUDA device";
    return;
  }
  at::manual_seed(0);
  std::vector<at::Tensor> cpu = {at::randn({1000}), at::randn({70, 3000}), at::zeros({0}),
                                 at::randint(-3, 4, {200000}).to(at::kFloat)};  // many ties
  std::vector<at::Tensor> gpu;
  for (const auto& x : cpu) gpu.push_back(x.cuda());
  for (const double r : {0.001, 0.1, 0.5, 1.0}) {
    for (const bool largest : {true, false}) {
      auto [cv, ci, co] = layerwise_topk(cpu, r, largest);
      auto [gv, gi, go] = layerwise_topk(gpu, r, largest);
      CHECK_SAME(gv.cpu(), cv);
      CHECK_SAME(gi.cpu(), ci);
      CHECK_SAME(go.cpu(), co);
      const auto cm = layerwise_topk_mask(cpu, r, largest), gm = layerwise_topk_mask(gpu, r, largest);
      for (size_t l = 0; l < cm.size(); ++l) CHECK_SAME(gm[l].cpu(), cm[l]);
    }
  }
}

}  // namespace

int main() {
  const struct {
    const char* name;
    void (*fn)();
  } tests[] = {{"topk", test_topk},
               {"topk_big_layers", test_topk_big_layers_match_a_stable_sort},
               {"topk_mask", test_topk_mask},
               {"sparse_accumulate", test_sparse_accumulate},
               {"masked_sgd", test_masked_sgd},
               {"errors", test_errors},
               {"version_counters", test_version_counters},
               {"cuda_matches_cpu", test_cuda_matches_cpu}};
  int skipped = 0;
  for (const auto& t : tests) {
    const int before = g_failures;
    g_skip_reason = nullptr;
    try {
      t.fn();
    } catch (const std::exception& e) {
      ++g_failures;
      std::fprintf(stderr, "test %s threw: %s\n", t.name, e.what());
    }
    if (g_failures != before) {
      std::printf("%-20s FAILED\n", t.name);
    } else if (g_skip_reason) {
      ++skipped;
      std::printf("%-20s SKIPPED (%s)\n", t.name, g_skip_reason);
    } else {
      std::printf("%-20s ok\n", t.name);
    }
  }
  std::printf("%d checks, %d failed, %d test(s) skipped\n", g_checks, g_failures, skipped);
  return g_failures == 0 ? 0 : 1;
}
