/* Peak fp32 multiply-add throughput of this CPU: every core runs 12 independent chains of vector FMAs
   (enough to cover the FMA latency on two ports), with the widest vectors the compiler targets.
   Built and run by bench/machine.py (for bench/extract.py and bench/heads.py), which reads the one number it
   prints, GFLOP/s over N threads:  cc -O2 -march=native -pthread fma_peak.c -o fma_peak && ./fma_peak N */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* One vector register of the target: the asm barrier below keeps each chain in one register, so a vector
   wider than the registers (16 floats on an AVX2 machine) is an impossible constraint. */
#if defined(__AVX512F__)
#define WIDTH 16
#elif defined(__AVX__)
#define WIDTH 8
#else
#define WIDTH 4
#endif
typedef float vec __attribute__((vector_size(4 * WIDTH)));
#define ITERS 50000000L
#define MAX_THREADS 256

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static volatile float sink;

static void *run(void *arg) {
  (void)arg;
  volatile float b0 = 0.9999f, c0 = 1e-6f;
  vec b = {0}, c = {0};
  b += b0;
  c += c0;
  vec a0 = b, a1 = c, a2 = b, a3 = c, a4 = b, a5 = c, a6 = b, a7 = c, a8 = b, a9 = c, a10 = b, a11 = c;
  for (long n = 0; n < ITERS; n++) {
#define FMA(x) x = x * b + c;
    FMA(a0) FMA(a1) FMA(a2) FMA(a3) FMA(a4) FMA(a5) FMA(a6) FMA(a7) FMA(a8) FMA(a9) FMA(a10) FMA(a11)
    /* the chains stay in registers and are not folded away */
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7),
                     "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
  }
  sink = (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11)[0];
  return NULL;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1 || threads > MAX_THREADS) {
    fprintf(stderr, "fma_peak: threads=%s must be 1 to %d\n", argv[1], MAX_THREADS);
    return 2;
  }
  pthread_t tid[MAX_THREADS];
  double best = 0;
  for (int rep = 0; rep < 3; rep++) {
    double start = now();
    for (int t = 0; t < threads; t++) pthread_create(&tid[t], NULL, run, NULL);
    for (int t = 0; t < threads; t++) pthread_join(tid[t], NULL);
    double flops = 2.0 * WIDTH * 12 * ITERS * threads / (now() - start);
    if (flops > best) best = flops;
  }
  printf("%.1f\n", best / 1e9);
  return 0;
}
