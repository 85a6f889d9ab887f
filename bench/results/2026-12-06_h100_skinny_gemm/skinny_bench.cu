// Standalone timing of skinny_gemm kernels (nvcc on the GPU machine).
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#include <cublas_v2.h>
#define LS_PDL_ENTER()
#include SK_SRC
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1);} } while (0)
typedef void (*K)(const __half*, const __half*, const __half*, const __half*, __half*, float*, unsigned*, int, int, int, int, int, int, int, int, int, int, int, int, int, int, int, int, int, int);
int main() {
  const size_t big = 256u << 20;
  __half *a, *w, *d, *bias; float* acc; unsigned* cnt; char* flush;
  CK(cudaMalloc(&a, 64 << 20)); CK(cudaMalloc(&w, big)); CK(cudaMalloc(&d, 64 << 20)); CK(cudaMalloc(&bias, 1 << 20));
  CK(cudaMalloc(&acc, 16 << 20)); CK(cudaMalloc(&cnt, 1 << 16)); CK(cudaMalloc(&flush, 256 << 20));
  CK(cudaMemset(a, 0, 64 << 20)); CK(cudaMemset(w, 0, big)); CK(cudaMemset(acc, 0, 16 << 20)); CK(cudaMemset(cnt, 0, 1 << 16)); CK(cudaMemset(bias, 0, 1<<20));
  struct Case { const char* name; int m, n, k, conv, h, c; };
  Case cases[] = {
    {"lin 16x1280x1280", 16, 1280, 1280, 0, 0, 0},
    {"lin 64x1280x1280", 64, 1280, 1280, 0, 0, 0},
    {"lin 64x1280->10240", 64, 10240, 1280, 0, 0, 0},
    {"lin 64x5120->1280", 64, 1280, 5120, 0, 0, 0},
    {"conv 4x4 1280", 16, 1280, 11520, 1, 4, 1280},
    {"conv 8x8 1280", 64, 1280, 11520, 1, 8, 1280},
    {"conv 4x4 2560", 16, 1280, 23040, 1, 4, 2560},
    {"lin 64x1280->3840", 64, 3840, 1280, 0, 0, 0},
  };
  int splits[] = {1, 2, 4, 7, 10, 14, 20, 28, 40};
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  cudaStream_t st; cudaStreamCreate(&st);
  cublasHandle_t hb; cublasCreate(&hb); cublasSetStream(hb, st);
  void* cws; CK(cudaMalloc(&cws, 32 << 20)); cublasSetWorkspace(hb, cws, 32 << 20);
  for (auto& cs : cases) {
    K f = cs.m <= 16 ? skinny_gemm_m16 : cs.m <= 32 ? skinny_gemm_m32 : skinny_gemm_m64;
    int threads = cs.m > 32 ? 256 : 128;
    cudaFuncAttributes at; cudaFuncGetAttributes(&at, (const void*)f);
    printf("%-20s regs %d local %zu | W %.1f MB\n", cs.name, at.numRegs, at.localSizeBytes, cs.n * (double)cs.k * 2 / 1e6);
    {
      size_t wbytes = (size_t)cs.n * cs.k * 2; int copies = (int)(big / wbytes); if (copies > 64) copies = 64; if (copies < 1) copies = 1;
      float one = 1.f, zero = 0.f;
      auto run = [&](int i) {
        const __half* wi = w + (size_t)(i % copies) * cs.n * cs.k;
        cublasGemmEx(hb, CUBLAS_OP_T, CUBLAS_OP_N, cs.n, cs.m, cs.k, &one, wi, CUDA_R_16F, cs.k, a, CUDA_R_16F, cs.k,
                     &zero, d, CUDA_R_16F, cs.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      };
      for (int i = 0; i < 5; ++i) run(i);
      cudaGraph_t g; cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      for (int i = 0; i < 20; ++i) run(i);
      CK(cudaStreamEndCapture(st, &g)); CK(cudaGraphInstantiate(&ge, g, 0));
      CK(cudaGraphLaunch(ge, st));
      cudaEventRecord(e0, st);
      for (int r = 0; r < 5; ++r) CK(cudaGraphLaunch(ge, st));
      cudaEventRecord(e1, st); CK(cudaEventSynchronize(e1));
      float ms; cudaEventElapsedTime(&ms, e0, e1);
      double us = ms * 1000 / 100;
      printf("   cuBLAS (no im2col)      : %7.2f us  %6.0f GB/s\n", us, wbytes / us / 1e3);
      cudaGraphExecDestroy(ge); cudaGraphDestroy(g);
    }
    struct V { const char* name; K f; int threads; int smem; int align; };
    K reg = cs.m <= 16 ? skinny_gemm_m16 : cs.m <= 32 ? skinny_gemm_m32 : skinny_gemm_m64;
    int rows = cs.m <= 16 ? 16 : cs.m <= 32 ? 32 : 64;
#ifdef STAGED
    K stg = cs.m <= 16 ? skinny_staged_m16 : cs.m <= 32 ? skinny_staged_m32 : skinny_staged_m64;
    int ssm = 4 * (64 + rows) * 144;
    CK(cudaFuncSetAttribute((const void*)stg, cudaFuncAttributeMaxDynamicSharedMemorySize, ssm));
    V vs[] = {{"reg", reg, cs.m > 32 ? 256 : 128, 0, 32}, {"staged", stg, 128, ssm, 64}};
#else
    V vs[] = {{"reg", reg, cs.m > 32 ? 256 : 128, 0, 32}};
#endif
    for (auto& v : vs) {
    for (int S : splits) {
      int ks = ((cs.k + S - 1) / S + v.align - 1) / v.align * v.align; int s = (cs.k + ks - 1) / ks;
      if (ks < 128 && s > 1) continue;
      dim3 grid(cs.n / 64, s);
      size_t wbytes = (size_t)cs.n * cs.k * 2; int copies = (int)(big / wbytes); if (copies > 64) copies = 64; if (copies < 1) copies = 1;
      auto launch = [&](int i) {
        const __half* wi = w + (size_t)(i % copies) * cs.n * cs.k;
        v.f<<<grid, v.threads, v.smem, st>>>(a, wi, bias, nullptr, d, acc, cnt, cs.m, cs.n, cs.k, ks, cs.k, cs.k, cs.n, cs.conv,
                                    cs.h, cs.h, cs.c, cs.h, cs.h, 3, 1, 1, 1, 1);
      };
      for (int i = 0; i < 5; ++i) launch(i);
      CK(cudaGetLastError());
      cudaGraph_t g; cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
      for (int i = 0; i < 20; ++i) launch(i);
      CK(cudaStreamEndCapture(st, &g)); CK(cudaGraphInstantiate(&ge, g, 0));
      CK(cudaGraphLaunch(ge, st));
      cudaEventRecord(e0, st);
      for (int r = 0; r < 5; ++r) CK(cudaGraphLaunch(ge, st));
      cudaEventRecord(e1, st); CK(cudaEventSynchronize(e1));
      float ms; cudaEventElapsedTime(&ms, e0, e1);
      double us = ms * 1000 / 100;
      printf("   %-6s S=%2d ks=%5d blocks %4d: %7.2f us  %6.0f GB/s\n", v.name, s, ks, grid.x * grid.y, us, wbytes / us / 1e3);
      cudaGraphExecDestroy(ge); cudaGraphDestroy(g);
    }
    }
  }
  CK(cudaGetLastError());
  return 0;
}
