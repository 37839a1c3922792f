// The per-element math of the fused guidance + solver ops (Euler, ancestral, Heun,
// DPM-Solver++(2M)), shared by the C++ CPU kernels (where T is float, double or
// at::vec::Vectorized<float/double>) and the CUDA kernels.  Only +, -, * and fmadd are used, so
// the same templates serve scalars and SIMD vectors.
#pragma once

#if defined(__CUDACC__)
#define FASTGUIDE_HD __host__ __device__ __forceinline__
#else
#define FASTGUIDE_HD inline
#endif

#include <math.h>

namespace fastguide {

// a·b + c rounded once.  For at::vec::Vectorized arguments, argument-dependent lookup finds
// at::vec::fmadd instead.  Written out (not left to the compiler's contraction of a*b + c), so
// that every compiler and both devices round the same way.
FASTGUIDE_HD float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
FASTGUIDE_HD double fmadd(double a, double b, double c) { return fma(a, b, c); }

// The step's scalars, computed once on the host in double and rounded to the math type.
template <typename S>
struct EulerScalars {
  S guidance;     // w
  S inv_t_cur;    // 1 / t_cur
  S step;         // h = t_next - t_cur
  S noise_scale;  // σ_up·S_noise of an ancestral step (used only with a noise tensor)
};

template <typename S>
struct HeunScalars {
  S guidance;    // w
  S inv_t_next;  // 1 / t_next
  S step;        // h = t_next - t_cur
  S half_step;   // h / 2
};

template <typename S>
struct DpmScalars {
  S guidance;   // w
  S x_coef;     // σ_next / σ
  S d_coef;     // weight of this step's D
  S prev_coef;  // weight of the previous step's D (0: first order, D_prev unread)
};

template <typename S>
inline EulerScalars<S> euler_scalars(double guidance, double t_cur, double t_next, double noise_scale = 0.0) {
  return {S(guidance), S(1.0 / t_cur), S(t_next - t_cur), S(noise_scale)};
}

template <typename S>
inline HeunScalars<S> heun_scalars(double guidance, double t_cur, double t_next) {
  double step = t_next - t_cur;
  return {S(guidance), S(1.0 / t_next), S(step), S(0.5 * step)};
}

template <typename S>
inline DpmScalars<S> dpm_scalars(double guidance, double x_coef, double d_coef, double prev_coef) {
  return {S(guidance), S(x_coef), S(d_coef), S(prev_coef)};
}

// D = D0 + w·(D1 − D0)
template <typename T, typename S>
FASTGUIDE_HD T guided_denoised(T d_main, T d_guide, S guidance) {
  return fmadd(T(guidance), d_main - d_guide, d_guide);
}

// deriv = (x − D)/t_cur, x_next = x + h·deriv
template <typename T, typename S>
FASTGUIDE_HD void euler_update(T x, T denoised, const EulerScalars<S>& s, T& x_next, T& deriv) {
  deriv = (x - denoised) * T(s.inv_t_cur);
  x_next = fmadd(T(s.step), deriv, x);
}

// The ancestral step's fresh noise on top of the Euler step: x_next + σ_up·S_noise·noise
template <typename T, typename S>
FASTGUIDE_HD T add_noise(T x_next, T noise, const EulerScalars<S>& s) {
  return fmadd(T(s.noise_scale), noise, x_next);
}

// x_euler = x + h·deriv, deriv' = (x_euler − D')/t_next, x_next = x + h/2·(deriv + deriv')
template <typename T, typename S>
FASTGUIDE_HD T heun_update(T x, T deriv, T denoised, const HeunScalars<S>& s) {
  T x_euler = fmadd(T(s.step), deriv, x);
  T deriv_sum = fmadd(x_euler - denoised, T(s.inv_t_next), deriv);  // deriv + deriv'
  return fmadd(T(s.half_step), deriv_sum, x);
}

// First-order DPM-Solver++ step: x_next = x_coef·x + d_coef·D
template <typename T, typename S>
FASTGUIDE_HD T dpm_update(T x, T denoised, const DpmScalars<S>& s) {
  return fmadd(T(s.d_coef), denoised, T(s.x_coef) * x);
}

// The 2M step: x_next = (x_coef·x + d_coef·D) + prev_coef·D_prev
template <typename T, typename S>
FASTGUIDE_HD T dpm_update(T x, T denoised, T denoised_prev, const DpmScalars<S>& s) {
  return fmadd(T(s.prev_coef), denoised_prev, dpm_update(x, denoised, s));
}

}  // namespace fastguide
