// Elementwise fp16 kernels of the UNet/VAE/whisper graphs, fp32 arithmetic.
#include <cuda_fp16.h>

__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

// y[r, i] = x[r, i] * gelu(x[r, d + i]) for rows of width 2d (diffusers GEGLU).
extern "C" __global__ void geglu_f16(const __half* __restrict__ x, __half* __restrict__ y, long rows, int d) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * d) return;
  long r = idx / d;
  int i = idx % d;
  float a = __half2float(x[r * 2 * d + i]);
  float g = __half2float(x[r * 2 * d + d + i]);
  y[idx] = __float2half(a * gelu_erf(g));
}

// GEGLU eight outputs per thread (d % 8 == 0, 16-byte aligned): grid y indexes the row.
extern "C" __global__ void geglu_f16x8(const __half* __restrict__ x, __half* __restrict__ y, int d) {
  LS_PDL_ENTER();
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v * 8 >= d) return;
  const long row = blockIdx.y;
  const uint4 av = *reinterpret_cast<const uint4*>(x + row * 2 * d + v * 8);
  const uint4 gv = *reinterpret_cast<const uint4*>(x + row * 2 * d + d + v * 8);
  const __half2* a = reinterpret_cast<const __half2*>(&av);
  const __half2* g = reinterpret_cast<const __half2*>(&gv);
  uint4 out;
  __half2* o = reinterpret_cast<__half2*>(&out);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 fa = __half22float2(a[j]), fg = __half22float2(g[j]);
    o[j] = __floats2half2_rn(fa.x * gelu_erf(fg.x), fa.y * gelu_erf(fg.y));
  }
  *reinterpret_cast<uint4*>(y + row * d + v * 8) = out;
}

// Unary ops: 0 exact GELU, 1 SiLU, 2 x * a + b, 3 clamp(x, a, b).
__device__ __forceinline__ float unary_op(float v, int mode, float a, float b) {
  switch (mode) {
    case 0: return gelu_erf(v);
    case 1: return v / (1.f + __expf(-v));
    case 2: return v * a + b;
    default: return fminf(fmaxf(v, a), b);
  }
}

extern "C" __global__ void unary_f16(const __half* __restrict__ x, __half* __restrict__ y, long n,
                                     int mode, float a, float b) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  y[idx] = __float2half(unary_op(__half2float(x[idx]), mode, a, b));
}

// The same, eight elements per thread in one 16-byte load and store (n % 8 == 0, x and y
// 16-byte aligned): the scalar form's 2-byte accesses ran whisper's GELUs at a third of the
// memory's speed. x may be y.
extern "C" __global__ void unary_f16x8(const uint4* x, uint4* y, long n8, int mode, float a,
                                       float b) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n8) return;
  const uint4 in = x[idx];
  const __half2* h = reinterpret_cast<const __half2*>(&in);
  uint4 out;
  __half2* o = reinterpret_cast<__half2*>(&out);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    o[j] = __floats2half2_rn(unary_op(f.x, mode, a, b), unary_op(f.y, mode, a, b));
  }
  y[idx] = out;
}

// y = a + b on equal shapes, two elements per thread (n even, pointers 4-byte aligned).
extern "C" __global__ void add_f16x2(const __half2* __restrict__ a, const __half2* __restrict__ b,
                                     __half2* __restrict__ y, long n2) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n2) return;
  const float2 x = __half22float2(a[idx]), z = __half22float2(b[idx]);
  y[idx] = __floats2half2_rn(x.x + z.x, x.y + z.y);
}

// Broadcasting binary op (0 add, 1 mul): y contiguous with dims (d0..d4); a and b read through
// per-axis strides (0 on broadcast axes).
extern "C" __global__ void binary_f16(const __half* __restrict__ a, const __half* __restrict__ b,
                                      __half* __restrict__ y, long n, int op,
                                      int d1, int d2, int d3, int d4,
                                      long a0, long a1, long a2, long a3, long a4,
                                      long b0, long b1, long b2, long b3, long b4) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  long r = idx;
  const long i4 = r % d4; r /= d4;
  const long i3 = r % d3; r /= d3;
  const long i2 = r % d2; r /= d2;
  const long i1 = r % d1; r /= d1;
  const float x = __half2float(a[r * a0 + i1 * a1 + i2 * a2 + i3 * a3 + i4 * a4]);
  const float z = __half2float(b[r * b0 + i1 * b1 + i2 * b2 + i3 * b3 + i4 * b4]);
  y[idx] = __float2half(op == 0 ? x + z : x * z);
}

// The same, eight elements of the last axis per thread: d4 counts 8-element vectors, every
// stride but the last (1 for both) is a multiple of 8, and the pointers are 16-byte aligned.
extern "C" __global__ void binary_f16x8(const __half* __restrict__ a, const __half* __restrict__ b,
                                        __half* __restrict__ y, long n8, int op,
                                        int d1, int d2, int d3, int d4,
                                        long a0, long a1, long a2, long a3,
                                        long b0, long b1, long b2, long b3) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n8) return;
  long r = idx;
  const long i4 = (r % d4) * 8; r /= d4;
  const long i3 = r % d3; r /= d3;
  const long i2 = r % d2; r /= d2;
  const long i1 = r % d1; r /= d1;
  const uint4 av = *reinterpret_cast<const uint4*>(a + r * a0 + i1 * a1 + i2 * a2 + i3 * a3 + i4);
  const uint4 bv = *reinterpret_cast<const uint4*>(b + r * b0 + i1 * b1 + i2 * b2 + i3 * b3 + i4);
  const __half2* x = reinterpret_cast<const __half2*>(&av);
  const __half2* z = reinterpret_cast<const __half2*>(&bv);
  uint4 out;
  __half2* o = reinterpret_cast<__half2*>(&out);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 fx = __half22float2(x[j]), fz = __half22float2(z[j]);
    o[j] = op == 0 ? __floats2half2_rn(fx.x + fz.x, fx.y + fz.y)
                   : __floats2half2_rn(fx.x * fz.x, fx.y * fz.y);
  }
  reinterpret_cast<uint4*>(y)[idx] = out;
}

// The epilogue of a convolution: y[i] += bias[(i / image) * bias_stride + (i / inner) % period]
// (+ res[i]). NHWC: inner 1, period C; NCHW: inner H*W, period C. bias_stride C carries a
// per-image bias (the UNet's time embedding folded in), 0 a shared one.
extern "C" __global__ void bias_residual_f16(__half* __restrict__ y, const __half* __restrict__ bias,
                                             const __half* __restrict__ res, long n, long image,
                                             long bias_stride, long inner, long period) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  float v = __half2float(y[idx]);
  if (bias) v += __half2float(bias[(idx / image) * bias_stride + (idx / inner) % period]);
  if (res) v += __half2float(res[idx]);
  y[idx] = __float2half(v);
}

// The NHWC epilogues below take eight channels per thread (C % 8 == 0, 16-byte aligned
// operands) over grid (blocks per image, images). blockDim and per_block are multiples of C / 8,
// so a thread keeps the same eight channels for its whole loop: their bias is loaded once and
// no index is divided per vector.

// y[i] += bias[img * bias_stride + c] (+ res[i]).
extern "C" __global__ void bias_residual_nhwc_f16x8(uint4* __restrict__ y, const __half* __restrict__ bias,
                                                    const uint4* __restrict__ res, int image8, int c,
                                                    int bias_stride, int per_block) {
  LS_PDL_ENTER();
  const int v0 = blockIdx.x * per_block + threadIdx.x;
  const int v1 = min(image8, (blockIdx.x + 1) * per_block);
  if (v0 >= v1) return;
  const int c0 = (threadIdx.x % (c / 8)) * 8;
  float2 b[4] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f), make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
  if (bias) {
    const uint4 bv = *reinterpret_cast<const uint4*>(bias + (long)blockIdx.y * bias_stride + c0);
    const __half2* bh = reinterpret_cast<const __half2*>(&bv);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = __half22float2(bh[j]);
  }
  const long base = (long)blockIdx.y * image8;
  for (int v = v0; v < v1; v += blockDim.x) {
    uint4 yv = y[base + v];
    __half2* yh = reinterpret_cast<__half2*>(&yv);
    uint4 rv = make_uint4(0, 0, 0, 0);
    if (res) rv = res[base + v];
    const __half2* rh = reinterpret_cast<const __half2*>(&rv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = __half22float2(yh[j]), r = __half22float2(rh[j]);
      yh[j] = __floats2half2_rn(a.x + b[j].x + r.x, a.y + b[j].y + r.y);
    }
    y[base + v] = yv;
  }
}

// A block's per-group (sum, sum of squares) of the values its threads write, for the GroupNorm
// that reads them next: block b of image n writes partial[(n * gridDim.x + b) * groups + g].
// groups <= 64, group width >= 4, so a thread's eight channels from c0 span at most two groups;
// it sums in registers and adds to the block's shared sums once.
struct GroupSums {
  float* s_sum;
  float* s_sq;
  int g0;
  bool first[4];
  float sum0 = 0.f, sq0 = 0.f, sum1 = 0.f, sq1 = 0.f;

  // Every thread of the block constructs it (it clears the shared sums and syncs).
  __device__ GroupSums(float* sum, float* sq, int groups, int c0, int cg) : s_sum(sum), s_sq(sq), g0(c0 / cg) {
    for (int g = threadIdx.x; g < groups; g += blockDim.x) { s_sum[g] = 0.f; s_sq[g] = 0.f; }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) first[j] = (c0 + 2 * j) / cg == g0;
  }

  // Eight fp16 values as the norm will read them.
  __device__ void add(const __half2* h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 o = __half22float2(h[j]);
      if (first[j]) { sum0 += o.x + o.y; sq0 += o.x * o.x + o.y * o.y; }
      else { sum1 += o.x + o.y; sq1 += o.x * o.x + o.y * o.y; }
    }
  }

  // Every thread of the block calls it; `active`: the thread summed anything.
  __device__ void store(float2* partial, int groups, bool active) {
    if (active) {
      atomicAdd(&s_sum[g0], sum0);
      atomicAdd(&s_sq[g0], sq0);
      if (!first[3]) {
        atomicAdd(&s_sum[g0 + 1], sum1);
        atomicAdd(&s_sq[g0 + 1], sq1);
      }
    }
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += blockDim.x)
      partial[((long)blockIdx.y * gridDim.x + blockIdx.x) * groups + g] = make_float2(s_sum[g], s_sq[g]);
  }
};

// The same epilogue, also summing the result per group (GroupSums) for the GroupNorm that reads
// it next (with neither bias nor residual, the sums alone: y is read, not written).
extern "C" __global__ void bias_residual_stats_nhwc_f16x8(uint4* __restrict__ y, const __half* __restrict__ bias,
                                                          const uint4* __restrict__ res, int image8, int c,
                                                          int bias_stride, float2* __restrict__ partial, int groups,
                                                          int per_block) {
  LS_PDL_ENTER();
  __shared__ float s_sum[64], s_sq[64];
  const int v0 = blockIdx.x * per_block + threadIdx.x;
  const int v1 = min(image8, (blockIdx.x + 1) * per_block);
  const int c0 = (threadIdx.x % (c / 8)) * 8;
  GroupSums sums(s_sum, s_sq, groups, c0, c / groups);
  float2 b[4] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f), make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
  if (bias) {
    const uint4 bv = *reinterpret_cast<const uint4*>(bias + (long)blockIdx.y * bias_stride + c0);
    const __half2* bh = reinterpret_cast<const __half2*>(&bv);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = __half22float2(bh[j]);
  }
  const long base = (long)blockIdx.y * image8;
  for (int v = v0; v < v1; v += blockDim.x) {
    uint4 yv = y[base + v];
    __half2* yh = reinterpret_cast<__half2*>(&yv);
    uint4 rv = make_uint4(0, 0, 0, 0);
    if (res) rv = res[base + v];
    const __half2* rh = reinterpret_cast<const __half2*>(&rv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = __half22float2(yh[j]), r = __half22float2(rh[j]);
      yh[j] = __floats2half2_rn(a.x + b[j].x + r.x, a.y + b[j].y + r.y);
    }
    sums.add(yh);
    // Without bias and residual (cuDNN's fused call added them) only the sums are wanted.
    if (bias || res) y[base + v] = yv;
  }
  sums.store(partial, groups, v0 < v1);
}

// The second half of an upsample + 3x3 convolution run on the small image (plan.rs,
// subpixel_filters): t [n, h+1, w+1, 4c] holds the four parities' 2x2 convolutions, parity
// (py, px) at channels (2py + px) * c; output pixel (2i + py, 2j + px) is t's pixel (i + py, j + px)
// in that slice. y [n, 2h, 2w, c] gets it plus the bias, eight channels per thread over the
// epilogues' grid, and with `partial` also the group sums (GroupSums).
extern "C" __global__ void subpixel_nhwc_f16x8(const uint4* __restrict__ t, uint4* __restrict__ y,
                                               const __half* __restrict__ bias, int h, int w, int c,
                                               float2* __restrict__ partial, int groups, int per_block) {
  LS_PDL_ENTER();
  __shared__ float s_sum[64], s_sq[64];
  const int c8 = c / 8;
  const int image8 = 4 * h * w * c8;
  const int v0 = blockIdx.x * per_block + threadIdx.x;
  const int v1 = min(image8, (blockIdx.x + 1) * per_block);
  const int ch = threadIdx.x % c8;
  GroupSums sums(s_sum, s_sq, partial ? groups : 0, ch * 8, partial ? c / groups : 8);
  float2 b[4] = {make_float2(0.f, 0.f), make_float2(0.f, 0.f), make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
  if (bias) {
    const uint4 bv = *reinterpret_cast<const uint4*>(bias + ch * 8);
    const __half2* bh = reinterpret_cast<const __half2*>(&bv);
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = __half22float2(bh[j]);
  }
  const uint4* src = t + (long)blockIdx.y * (h + 1) * (w + 1) * 4 * c8;
  uint4* dst = y + (long)blockIdx.y * image8;
  for (int v = v0; v < v1; v += blockDim.x) {
    const int p = v / c8;
    const int ox = p % (2 * w), oy = p / (2 * w);
    const int py = oy & 1, px = ox & 1;
    const int pixel = ((oy >> 1) + py) * (w + 1) + (ox >> 1) + px;
    uint4 tv = src[(long)pixel * 4 * c8 + (2 * py + px) * c8 + ch];
    __half2* th = reinterpret_cast<__half2*>(&tv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = __half22float2(th[j]);
      th[j] = __floats2half2_rn(a.x + b[j].x, a.y + b[j].y);
    }
    if (partial) sums.add(th);
    dst[v] = tv;
  }
  if (partial) sums.store(partial, groups, v0 < v1);
}

// Nearest 2x upsampling of NHWC images, eight channels per thread (c8 = C / 8).
extern "C" __global__ void upsample2x_nhwc_f16x8(const uint4* __restrict__ x, uint4* __restrict__ y,
                                                 int h, int w, int c8) {
  LS_PDL_ENTER();
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  const int per_image = 4 * h * w * c8;
  if (v >= per_image) return;
  const int ch = v % c8;
  const int p = v / c8;
  const int ox = p % (2 * w), oy = p / (2 * w);
  y[(long)blockIdx.y * per_image + v] = x[((long)blockIdx.y * h * w + (oy / 2) * w + ox / 2) * c8 + ch];
}

// Nearest 2x upsampling of NHWC images: x [n, h, w, c] -> y [n, 2h, 2w, c].
extern "C" __global__ void upsample2x_nhwc_f16(const __half* __restrict__ x, __half* __restrict__ y,
                                               long n, int h, int w, int c) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n * 4 * h * w * c) return;
  long r = idx;
  const int ch = r % c; r /= c;
  const int ox = r % (2 * w); r /= 2 * w;
  const int oy = r % (2 * h); r /= 2 * h;
  y[idx] = x[((r * h + oy / 2) * w + ox / 2) * c + ch];
}
