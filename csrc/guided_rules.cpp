// The rule ops (torch.ops.fastguide.rule_moments / rule_apply): schemas and CPU kernels.
// See guided_rules.h for what they compute; fastguide/rules.py for the rules built on them.
// Pass 1 (moments) reads the predictions once and sums per sample in fixed blocks; pass 2 (apply)
// reads them again and writes the solver's outputs and the new momentum.  Math in float32 on AVX2
// vectors (float64 for float64 tensors; half types load into float vectors).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_lanes.h"
#include "guided_rules.h"

namespace {

using at::vec::Vectorized;
using fastguide::cpu::kStreamBytes;
using fastguide::cpu::Lanes;
using fastguide::cpu::stream_fence;

constexpr int64_t kApplyBlock = 1 << 14;  // elements per apply task (whole vectors within a sample)

template <typename V>
double lane_sum(const V& v) {
  using T = typename V::value_type;
  __at_align__ T lanes[V::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t k = 0; k < V::size(); ++k) total += static_cast<double>(lanes[k]);
  return total;
}

// NaN in some lane iff a lane of the accumulated (v − v) terms saw a NaN or an infinity.
template <typename V>
bool any_nan(const V& v) {
  using T = typename V::value_type;
  __at_align__ T lanes[V::size()];
  v.store(lanes);
  for (int64_t k = 0; k < V::size(); ++k) {
    if (lanes[k] != lanes[k]) return true;
  }
  return false;
}

// One affine combination Σ c_k·input_k over the inputs present (c: the six coefficients).
template <typename V>
inline V combine(const V* c, const V& x, const V& d1, const V* delta, const V* m, const V* e, const V* noise) {
  V acc = c[0] * x;
  acc = at::vec::fmadd(c[1], d1, acc);
  if (delta) acc = at::vec::fmadd(c[2], *delta, acc);
  if (m) acc = at::vec::fmadd(c[3], *m, acc);
  if (e) acc = at::vec::fmadd(c[4], *e, acc);
  if (noise) acc = at::vec::fmadd(c[5], *noise, acc);
  return acc;
}

template <typename scalar_t>
void moments_kernel(const scalar_t* x, const scalar_t* d1, const scalar_t* d0, const scalar_t* m,
                    const at::opmath_type<scalar_t>* coefs, double* sums, int64_t batch, int64_t n) {
  using L = Lanes<scalar_t>;
  using V = typename L::Math;
  using M = at::opmath_type<scalar_t>;
  const int64_t blocks = (n + fastguide::kRuleBlock - 1) / fastguide::kRuleBlock;
  std::vector<double> partial(batch * blocks * 5);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / blocks, block = task % blocks;
      const M* c = coefs + b * 8;
      const V c1x(c[0]), c1d(c[1]), c1t(c[2]), c1m(c[3]), c2x(c[4]), c2d(c[5]), c2t(c[6]), c2m(c[7]);
      V s1(0), s2(0), s11(0), s12(0), s22(0);
      const int64_t begin = b * n + block * fastguide::kRuleBlock;
      const int64_t end = std::min(begin + fastguide::kRuleBlock, (b + 1) * n);
      V xv[L::kParts], d1v[L::kParts], d0v[L::kParts], mv[L::kParts];
      for (int64_t i = begin; i < end; i += L::kSize) {
        const int64_t count = std::min(L::kSize, end - i);
        L::load(d1 + i, count, d1v);
        if (x) L::load(x + i, count, xv);
        if (d0) L::load(d0 + i, count, d0v);
        if (m) L::load(m + i, count, mv);
        for (int k = 0; k < L::kParts; ++k) {
          V e1 = c1d * d1v[k], e2 = c2d * d1v[k];
          if (x) {
            e1 = at::vec::fmadd(c1x, xv[k], e1);
            e2 = at::vec::fmadd(c2x, xv[k], e2);
          }
          if (d0) {
            const V delta = d1v[k] - d0v[k];
            e1 = at::vec::fmadd(c1t, delta, e1);
            e2 = at::vec::fmadd(c2t, delta, e2);
          }
          if (m) {
            e1 = at::vec::fmadd(c1m, mv[k], e1);
            e2 = at::vec::fmadd(c2m, mv[k], e2);
          }
          s1 = s1 + e1;
          s2 = s2 + e2;
          s11 = at::vec::fmadd(e1, e1, s11);
          s12 = at::vec::fmadd(e1, e2, s12);
          s22 = at::vec::fmadd(e2, e2, s22);
        }
      }
      double* out = partial.data() + task * 5;
      out[0] = lane_sum(s1);
      out[1] = lane_sum(s2);
      out[2] = lane_sum(s11);
      out[3] = lane_sum(s12);
      out[4] = lane_sum(s22);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    for (int k = 0; k < 5; ++k) {
      double total = 0;
      for (int64_t block = 0; block < blocks; ++block) total += partial[(b * blocks + block) * 5 + k];
      sums[b * 5 + k] = total;
    }
  }
}

template <typename scalar_t>
struct ApplyPointers {
  const scalar_t *x, *d1, *d0, *m, *e, *noise;
  scalar_t *out, *out2, *m_out;
};

template <typename scalar_t>
int apply_kernel(const ApplyPointers<scalar_t>& p, const at::opmath_type<scalar_t>* coefs, int64_t batch,
                 int64_t n) {
  using L = Lanes<scalar_t>;
  using V = typename L::Math;
  const int64_t blocks = (n + kApplyBlock - 1) / kApplyBlock;
  // Streaming needs every full vector 32-byte aligned: aligned outputs and samples of whole vectors.
  bool streaming = batch * n * int64_t(sizeof(scalar_t)) >= kStreamBytes && n % L::kSize == 0;
  for (const scalar_t* q : {static_cast<const scalar_t*>(p.out), static_cast<const scalar_t*>(p.out2),
                            static_cast<const scalar_t*>(p.m_out)}) {
    streaming = streaming && reinterpret_cast<uintptr_t>(q) % 32 == 0;
  }
  int flags = 0;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    V bad_d1(0), bad_d0(0), bad_out(0);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t b = task / blocks, block = task % blocks;
      V c[3][6];
      for (int j = 0; j < 3; ++j) {
        for (int k = 0; k < 6; ++k) c[j][k] = V(coefs[(b * 3 + j) * 6 + k]);
      }
      const int64_t begin = b * n + block * kApplyBlock;
      const int64_t end = std::min(begin + kApplyBlock, (b + 1) * n);
      V xv[L::kParts], d1v[L::kParts], d0v[L::kParts], mv[L::kParts], ev[L::kParts], nv[L::kParts];
      V o[L::kParts], o2[L::kParts], om[L::kParts];
      for (int64_t i = begin; i < end; i += L::kSize) {
        const int64_t count = std::min(L::kSize, end - i);
        L::load(p.x + i, count, xv);
        L::load(p.d1 + i, count, d1v);
        if (p.d0) L::load(p.d0 + i, count, d0v);
        if (p.m) L::load(p.m + i, count, mv);
        if (p.e) L::load(p.e + i, count, ev);
        if (p.noise) L::load(p.noise + i, count, nv);
        for (int k = 0; k < L::kParts; ++k) {
          V delta;
          if (p.d0) {
            delta = d1v[k] - d0v[k];
            bad_d0 = bad_d0 + (d0v[k] - d0v[k]);
          }
          bad_d1 = bad_d1 + (d1v[k] - d1v[k]);
          const V* dp = p.d0 ? &delta : nullptr;
          const V* mp = p.m ? &mv[k] : nullptr;
          const V* ep = p.e ? &ev[k] : nullptr;
          const V* np = p.noise ? &nv[k] : nullptr;
          o[k] = combine(c[0], xv[k], d1v[k], dp, mp, ep, np);
          if (p.out2) o2[k] = combine(c[1], xv[k], d1v[k], dp, mp, ep, np);
          if (p.m_out) om[k] = combine(c[2], xv[k], d1v[k], dp, mp, ep, np);
        }
        if constexpr (L::kParts == 1) {
          bad_out = bad_out + (o[0] - o[0]);
        } else {  // the values as stored: a float that overflows the half type is flagged
          V stored[L::kParts];
          typename L::Storage rounded = at::vec::convert_from_float<scalar_t>(o[0], o[1]);
          std::tie(stored[0], stored[1]) = at::vec::convert_to_float<scalar_t>(rounded);
          for (int k = 0; k < L::kParts; ++k) bad_out = bad_out + (stored[k] - stored[k]);
        }
        L::store(p.out + i, count, o, streaming);
        if (p.out2) L::store(p.out2 + i, count, o2, streaming);
        if (p.m_out) L::store(p.m_out + i, count, om, streaming);
      }
    }
    if (streaming) stream_fence();
    int bits = (any_nan(bad_d1) ? 1 : 0) | (any_nan(bad_d0) ? 2 : 0) | (any_nan(bad_out) ? 4 : 0);
    if (bits) __atomic_fetch_or(&flags, bits, __ATOMIC_RELAXED);
  });
  return flags;
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* mutable_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->mutable_data_ptr<scalar_t>() : nullptr;
}

at::Tensor rule_moments_cpu(const std::optional<at::Tensor>& x, const at::Tensor& d1,
                            const std::optional<at::Tensor>& d0, const std::optional<at::Tensor>& m,
                            const at::Tensor& coefs) {
  const char* op = "fastguide::rule_moments";
  TORCH_CHECK(d1.device().is_cpu(), op, ": this kernel needs CPU tensors, got ", d1.device());
  fastguide::check_rule_coefs(op, coefs, d1, 2, 4);
  fastguide::check_rule_tensor(op, "x", x, d1);
  fastguide::check_rule_tensor(op, "d0", d0, d1);
  fastguide::check_rule_tensor(op, "m", m, d1);
  const int64_t batch = d1.size(0);
  auto sums = at::zeros({batch, 5}, d1.options().dtype(at::kDouble));
  const int64_t n = d1.numel() / batch;
  if (n == 0) return sums;
  auto d1c = d1.contiguous();
  auto xc = fastguide::contiguous_or_none(x), d0c = fastguide::contiguous_or_none(d0),
       mc = fastguide::contiguous_or_none(m);
  auto cc = coefs.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d1.scalar_type(), "rule_moments_cpu", [&] {
    moments_kernel<scalar_t>(ptr_or_null<scalar_t>(xc), d1c.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(d0c),
                             ptr_or_null<scalar_t>(mc), cc.const_data_ptr<at::opmath_type<scalar_t>>(),
                             sums.mutable_data_ptr<double>(), batch, n);
  });
  return sums;
}

void rule_apply_cpu(const at::Tensor& x, const at::Tensor& d1, const std::optional<at::Tensor>& d0,
                    const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& e,
                    const std::optional<at::Tensor>& noise, const at::Tensor& coefs, const at::Tensor& out,
                    const std::optional<at::Tensor>& out2, const std::optional<at::Tensor>& m_out,
                    const std::optional<at::Tensor>& flags) {
  const char* op = "fastguide::rule_apply";
  fastguide::check_rule_apply(op, c10::DeviceType::CPU, x, d1, d0, m, e, noise, coefs, out, out2, m_out, flags);
  const int64_t batch = x.size(0);
  const int64_t n = x.numel() / batch;
  if (n == 0) return;
  auto xc = x.contiguous(), d1c = d1.contiguous();
  auto d0c = fastguide::contiguous_or_none(d0), mc = fastguide::contiguous_or_none(m),
       ec = fastguide::contiguous_or_none(e), nc = fastguide::contiguous_or_none(noise);
  auto cc = coefs.contiguous();
  int bits = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rule_apply_cpu", [&] {
    ApplyPointers<scalar_t> p{xc.const_data_ptr<scalar_t>(), d1c.const_data_ptr<scalar_t>(),
                              ptr_or_null<scalar_t>(d0c), ptr_or_null<scalar_t>(mc), ptr_or_null<scalar_t>(ec),
                              ptr_or_null<scalar_t>(nc), out.mutable_data_ptr<scalar_t>(),
                              mutable_or_null<scalar_t>(out2), mutable_or_null<scalar_t>(m_out)};
    bits = apply_kernel<scalar_t>(p, cc.const_data_ptr<at::opmath_type<scalar_t>>(), batch, n);
  });
  if (flags && bits) flags->bitwise_or_(bits);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastguide, m) {
  m.def("rule_moments(Tensor? x, Tensor d1, Tensor? d0, Tensor? m, Tensor coefs) -> Tensor");
  m.def("rule_apply(Tensor x, Tensor d1, Tensor? d0, Tensor? m, Tensor? e, Tensor? noise, Tensor coefs, *,"
        " Tensor(a!) out, Tensor(b!)? out2, Tensor(c!)? m_out, Tensor(d!)? flags) -> ()");
}

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("rule_moments", &rule_moments_cpu);
  m.impl("rule_apply", &rule_apply_cpu);
}
