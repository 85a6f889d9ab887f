// Data movement for the executor: generic permutes (layout changes and graph permutes), strided
// row copies (concat and slice on any axis), and asymmetric zero padding of NHWC images.
#include <cuda_fp16.h>

// y is contiguous with dims (d0, d1, d2, d3, d4) (rank padded to 5 with leading 1s); element
// (i0..i4) comes from x at i0*s0 + i1*s1 + i2*s2 + i3*s3 + i4*s4.
extern "C" __global__ void permute_f16(const __half* __restrict__ x, __half* __restrict__ y, long n,
                                       int d1, int d2, int d3, int d4,
                                       long s0, long s1, long s2, long s3, long s4) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  long r = idx;
  const long i4 = r % d4; r /= d4;
  const long i3 = r % d3; r /= d3;
  const long i2 = r % d2; r /= d2;
  const long i1 = r % d1; r /= d1;
  y[idx] = x[r * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4];
}

// The same gather eight elements at a time, when the innermost output axis is contiguous in x
// (s4 == 1) and every extent and stride keeps 16-byte alignment. Dims and strides count vectors
// on the innermost axis (d4 / 8) and elements elsewhere.
extern "C" __global__ void permute_f16x8(const __half* __restrict__ x, __half* __restrict__ y, long n8,
                                         int d1, int d2, int d3, int d4v,
                                         long s0, long s1, long s2, long s3) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n8) return;
  long r = idx;
  const long i4 = r % d4v; r /= d4v;
  const long i3 = r % d3; r /= d3;
  const long i2 = r % d2; r /= d2;
  const long i1 = r % d1; r /= d1;
  reinterpret_cast<uint4*>(y)[idx] =
      *reinterpret_cast<const uint4*>(x + r * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * 8);
}

// y[r * ys + c] = x[r * xs + c] for r < rows, c < cols (pointers already at their offsets).
extern "C" __global__ void copy_rows_f16(const __half* __restrict__ x, __half* __restrict__ y,
                                         long rows, long cols, long xs, long ys) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const long r = idx / cols, c = idx % cols;
  y[r * ys + c] = x[r * xs + c];
}

// y[b, r, c] = x[(b * t + f + r) * xs + c] for r < rows, c < cols, with f = first[b] (an fp16
// whole number, exact to 2048) rounded and clamped into [0, t - rows]: the rows whisper's last
// layer computes, chosen per window at replay. n = batch * rows * cols.
extern "C" __global__ void gather_rows_f16(const __half* __restrict__ x,
                                           const __half* __restrict__ first,
                                           __half* __restrict__ y, int t, int rows, int cols,
                                           long xs, int n) {
  LS_PDL_ENTER();
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int c = idx % cols, br = idx / cols;
  const int r = br % rows, b = br / rows;
  const float fv = __half2float(first[b]);
  int f = fv > 0.f ? __float2int_rn(fv) : 0;  // NaN and negatives start at row 0
  f = min(f, t - rows);
  y[idx] = x[((long)b * t + f + r) * xs + c];
}

// Rows of up to four inputs side by side (a concatenation on the innermost storage axis, or one
// strided copy): y[r * ys + at_i + c] = x_i[r * xs_i + c] for c < at_{i+1} - at_i, 8 halves
// (16 bytes) a thread, every width, start and stride counted in such vectors. One launch for a
// whole concatenation instead of one per input; n = rows * cols stays below 2^31 vectors.
extern "C" __global__ void concat_rows_f16x8(uint4* __restrict__ y, long ys, int rows, int cols,
                                             const uint4* __restrict__ x0, long xs0,
                                             const uint4* __restrict__ x1, long xs1, int at1,
                                             const uint4* __restrict__ x2, long xs2, int at2,
                                             const uint4* __restrict__ x3, long xs3, int at3) {
  LS_PDL_ENTER();
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const int r = idx / cols, c = idx - r * cols;
  uint4 v;
  if (c < at1) {
    v = x0[r * xs0 + c];
  } else if (c < at2) {
    v = x1[r * xs1 + (c - at1)];
  } else if (c < at3) {
    v = x2[r * xs2 + (c - at2)];
  } else {
    v = x3[r * xs3 + (c - at3)];
  }
  y[r * ys + c] = v;
}

// Zero padding of NHWC images, 8 channels (16 bytes) per thread, c8 = c / 8: block row
// blockIdx.y is one output row (image * ho + oy), so only the column needs a division.
extern "C" __global__ void pad_nhwc_f16x8(const uint4* __restrict__ x, uint4* __restrict__ y,
                                          int h, int w, int c8, int ho, int wo, int top,
                                          int left) {
  LS_PDL_ENTER();
  const int row = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= wo * c8) return;
  const int img = row / ho, oy = row - img * ho;
  const int ox = i / c8, ch = i - ox * c8;
  const int ix = ox - left, iy = oy - top;
  uint4 v = make_uint4(0, 0, 0, 0);
  if (ix >= 0 && ix < w && iy >= 0 && iy < h) v = x[(((long)img * h + iy) * w + ix) * c8 + ch];
  y[(long)row * wo * c8 + i] = v;
}

// Zero padding of NHWC images: x [n, h, w, c] -> y [n, ho, wo, c] with x placed at (top, left).
extern "C" __global__ void pad_nhwc_f16(const __half* __restrict__ x, __half* __restrict__ y,
                                        int n, int h, int w, int c, int ho, int wo, int top, int left) {
  LS_PDL_ENTER();
  long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long)n * ho * wo * c) return;
  long r = idx;
  const int ch = r % c; r /= c;
  const int ox = r % wo; r /= wo;
  const int oy = r % ho; r /= ho;
  const int ix = ox - left, iy = oy - top;
  y[idx] = (ix >= 0 && ix < w && iy >= 0 && iy < h) ? x[(((long)r * h + iy) * w + ix) * c + ch]
                                                    : __float2half(0.f);
}

// A convolution's patches as the rows of one GEMM's left operand (a convolution lowered to
// im2col + cuBLASLt): row (img, oy, ox) of `cols` holds the kh x kw window of x in the filter's
// [o, kh, kw, c] order, zeros where the window leaves the image. 8 channels (16 bytes) per
// thread, c8 = c / 8, k8 = kh * kw * c8; block row blockIdx.y is one row of cols.
extern "C" __global__ void im2col_nhwc_f16x8(const uint4* __restrict__ x, uint4* __restrict__ cols,
                                             int h, int w, int c8, int ho, int wo, int kw, int k8,
                                             int sh, int sw, int ph, int pw) {
  LS_PDL_ENTER();
  const int row = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= k8) return;
  const int hw = ho * wo, img = row / hw, r = row - img * hw;
  const int oy = r / wo, ox = r - oy * wo;
  const int tap = i / c8, ch = i - tap * c8;
  const int ky = tap / kw, kx = tap - ky * kw;
  const int iy = oy * sh - ph + ky, ix = ox * sw - pw + kx;
  uint4 v = make_uint4(0, 0, 0, 0);
  if (ix >= 0 && ix < w && iy >= 0 && iy < h) v = x[(((long)img * h + iy) * w + ix) * c8 + ch];
  cols[(long)row * k8 + i] = v;
}
