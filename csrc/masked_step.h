// The per-coordinate arithmetic of masked_sgd_ and masked_adam_, shared by the CPU loops and
// the CUDA functors so that the CPU tests exercise the float32 operation order the GPU runs: torch.optim's
// (SGD, AdamW), each hyper-parameter rounded to float32 as torch rounds a Python scalar. Masking,
// maximize and off_scale act on the gradient before these are called, and which coordinates are written
// back is the caller's. The bool switches are compile-time constants at the CPU call sites (so the loops
// stay branch-free and vectorise) and uniform branches on the GPU. The coefficients pass by value: a
// reference to them would have to be re-read after every store through a float pointer (aliasing).
// nvcc builds with --fmad=false, so no multiply-add is fused on either side.
#pragma once

#include <cmath>

#include "select.h"  // UE_HD

namespace unlearn_ext {

struct SgdCoeffs {
  float momentum, one_minus_dampening, weight_decay, neg_lr;
};

struct SgdCoordinate {
  float param, momentum_buffer;
};

// d = g (+ wd·p); with momentum b = μ·b + (1 − τ)·d and d = nesterov ? d + μ·b : b; p ← p − lr·d.
UE_HD SgdCoordinate sgd_coordinate(float p, float buffer, float g, SgdCoeffs c, bool use_momentum,
                                   bool nesterov, bool use_weight_decay) {
  float d = g;
  if (use_weight_decay) d = d + c.weight_decay * p;
  float b = buffer;
  if (use_momentum) {
    b = buffer * c.momentum + c.one_minus_dampening * d;
    d = nesterov ? d + c.momentum * b : b;
  }
  return SgdCoordinate{p + c.neg_lr * d, b};
}

struct AdamCoeffs {
  // decay = 1 − lr·wd (decoupled, AdamW); neg_step_size = −lr / (1 − β1^t).
  float decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
};

struct AdamCoordinate {
  float param, exp_avg, exp_avg_sq;
};

// torch's lerp (ATen/native/Lerp.h): the form that is exact at the nearer end of the weight.
UE_HD float torch_lerp(float self, float end, float w, bool small_weight) {
  return small_weight ? self + w * (end - self) : end - (end - self) * (1.f - w);
}

// m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²; p ← p·decay − step·m / (√v / √(1 − β2^t) + eps).
// small_weight: |1 − β1| < 0.5, which of torch's two lerp formulas applies.
UE_HD AdamCoordinate adam_coordinate(float p, float exp_avg, float exp_avg_sq, float g, AdamCoeffs c,
                                     bool small_weight) {
  const float decayed = p * c.decay;
  const float m = torch_lerp(exp_avg, g, c.one_minus_beta1, small_weight);
  const float v = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / c.bias_correction2_sqrt + c.eps;
  return AdamCoordinate{decayed + c.neg_step_size * m / denom, m, v};
}

}  // namespace unlearn_ext
