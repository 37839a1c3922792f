// The per-element math of the fused guidance + Euler/Heun ops, shared by the C++ CPU kernels
// (where T is float, double or at::vec::Vectorized<float/double>) and the CUDA kernels.
// Only +, - and * are used, so the same templates serve scalars and SIMD vectors.
#pragma once

#if defined(__CUDACC__)
#define FASTGUIDE_HD __host__ __device__ __forceinline__
#else
#define FASTGUIDE_HD inline
#endif

namespace fastguide {

// The step's scalars, computed once on the host in double and rounded to the math type.
template <typename S>
struct EulerScalars {
  S guidance;   // w
  S inv_t_cur;  // 1 / t_cur
  S step;       // h = t_next - t_cur
};

template <typename S>
struct HeunScalars {
  S guidance;    // w
  S inv_t_next;  // 1 / t_next
  S step;        // h = t_next - t_cur
  S half_step;   // h / 2
};

template <typename S>
inline EulerScalars<S> euler_scalars(double guidance, double t_cur, double t_next) {
  return {S(guidance), S(1.0 / t_cur), S(t_next - t_cur)};
}

template <typename S>
inline HeunScalars<S> heun_scalars(double guidance, double t_cur, double t_next) {
  double step = t_next - t_cur;
  return {S(guidance), S(1.0 / t_next), S(step), S(0.5 * step)};
}

// D = D0 + w·(D1 − D0)
template <typename T, typename S>
FASTGUIDE_HD T guided_denoised(T d_main, T d_guide, S guidance) {
  return d_guide + T(guidance) * (d_main - d_guide);
}

// deriv = (x − D)/t_cur, x_next = x + h·deriv
template <typename T, typename S>
FASTGUIDE_HD void euler_update(T x, T denoised, const EulerScalars<S>& s, T& x_next, T& deriv) {
  deriv = (x - denoised) * T(s.inv_t_cur);
  x_next = x + T(s.step) * deriv;
}

// x_euler = x + h·deriv, deriv' = (x_euler − D')/t_next, x_next = x + h/2·(deriv + deriv')
template <typename T, typename S>
FASTGUIDE_HD T heun_update(T x, T deriv, T denoised, const HeunScalars<S>& s) {
  T x_euler = x + T(s.step) * deriv;
  T deriv_next = (x_euler - denoised) * T(s.inv_t_next);
  return x + T(s.half_step) * (deriv + deriv_next);
}

}  // namespace fastguide
