// The decode weight kernel's inner loop in C, for measuring the machine rather than the
// engine: how many cycles a 16x32 Q4_1 block costs at 1, 4 and 8 activation rows with
// `vpdpbusd` (the loop of crates/engine/src/qmatmul/interleaved.rs: two chains of four per
// row and block, then a conversion, the scale product and two FMAs), and the same block on
// AMX (`tdpbsud`, with the same float epilogue, so the outputs are bit-identical).
// docs/serve/README.md quotes its figures.
//
//   gcc -O2 -march=native -mamx-tile -mamx-int8 -fopenmp weight_block.c -o weight_block
//   ./weight_block hot       # weights in cache, one core: ns and cycles a block
//   ./weight_block stream    # 100 MB of weights on every OpenMP thread's share
//   ./weight_block amx-ops   # ns per AMX operation
//
// Needs AVX-512 VNNI; the AMX parts are skipped where the kernel refuses AMX state.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BLOCKS 18                   // 32-value blocks a row: a 576-wide matrix
#define BLOCK_BYTES (16 * 20)       // 16 rows of Q4_1: f16 d and m, 16 bytes of nibbles each
#define WIDTH (BLOCKS * 32)
#define MAX_ROWS 8
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// Seconds a cycle, from a chain of dependent multiplies (3 cycles each).
static double cycle_seconds(void) {
    long x = 3, n = 50000000;
    double t0 = now();
    for (long i = 0; i < n; i++)
        __asm__ volatile("imul %0,%0\n imul %0,%0\n imul %0,%0\n imul %0,%0" : "+r"(x));
    return (now() - t0) / (12.0 * n);
}

static inline __m512i broadcast4(const int8_t *p) {
    int v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// Layout of a block: 16 f16 scales d, 16 f16 minimums m, then four 64-byte vectors whose
// low nibbles are values 0-15 and high nibbles values 16-31 of the 16 rows, four
// consecutive values per row and 32-bit lane. `acts` is [rows, WIDTH] signed; `act_d` and
// `act_s` are each activation block's scale and scale times sum, [rows, BLOCKS].
typedef void (*Kernel)(const uint8_t *w, long groups, const int8_t *acts, const float *act_d,
                       const float *act_s, float *out);

#define EPILOGUE(sum_vector)                                                          \
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_vector),                          \
                             _mm512_mul_ps(d, _mm512_set1_ps(act_d[r * BLOCKS + b])), acc[r]); \
    acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(act_s[r * BLOCKS + b]), acc[r]);

#define PREFETCH_AHEAD(blk)                                       \
    for (int c = 0; c < BLOCK_BYTES; c += 64)                     \
        _mm_prefetch((const char *)(blk) + 8192 + c, _MM_HINT_T0);

#define VNNI_KERNEL(NAME, ROWS)                                                               \
    __attribute__((noinline)) static void NAME(const uint8_t *w, long groups,                 \
                                               const int8_t *acts, const float *act_d,        \
                                               const float *act_s, float *out) {             \
        const __m512i low = _mm512_set1_epi8(15);                                             \
        for (long g = 0; g < groups; g++) {                                                   \
            __m512 acc[ROWS];                                                                 \
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();                      \
            for (int b = 0; b < BLOCKS; b++) {                                                \
                const uint8_t *blk = w + (g * BLOCKS + b) * BLOCK_BYTES;                      \
                PREFETCH_AHEAD(blk)                                                           \
                __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)blk));            \
                __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(blk + 32)));     \
                __m512i nib[8];                                                               \
                for (int j = 0; j < 4; j++) {                                                 \
                    __m512i p = _mm512_loadu_si512(blk + 64 + 64 * j);                        \
                    nib[j] = _mm512_and_si512(p, low);                                        \
                    nib[4 + j] = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);              \
                }                                                                             \
                for (int r = 0; r < ROWS; r++) {                                              \
                    const int8_t *a = acts + r * WIDTH + b * 32;                              \
                    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();         \
                    for (int j = 0; j < 4; j++) {                                             \
                        s0 = _mm512_dpbusd_epi32(s0, nib[j], broadcast4(a + 4 * j));          \
                        s1 = _mm512_dpbusd_epi32(s1, nib[4 + j], broadcast4(a + 16 + 4 * j)); \
                    }                                                                         \
                    EPILOGUE(_mm512_add_epi32(s0, s1))                                        \
                }                                                                             \
            }                                                                                 \
            for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(out + (g * MAX_ROWS + r) * 16, acc[r]); \
        }                                                                                     \
    }
VNNI_KERNEL(vnni_1, 1)
VNNI_KERNEL(vnni_4, 4)
VNNI_KERNEL(vnni_8, 8)

// Tiles: 0 and 1 hold two blocks' sums [rows, 16] (int32), 2 and 3 their activations
// [rows, 32 bytes], 4 and 5 their unpacked weights [8, 64 bytes] (four values of each of the
// 16 rows per 64-byte row, the layout `vpdpbusd` reads). Tile numbers must be constants.
static void configure_tiles(int rows) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((packed)) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 2; t++) cfg.rows[t] = rows, cfg.colsb[t] = 64;
    for (int t = 2; t < 4; t++) cfg.rows[t] = rows, cfg.colsb[t] = 32;
    for (int t = 4; t < 6; t++) cfg.rows[t] = 8, cfg.colsb[t] = 64;
    // The intrinsic does not tell the compiler that it reads `cfg`: keep the stores.
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

// Unpacks block `b`'s nibbles to bytes and leaves its sums in `sums[b & 1]`.
#define AMX_ISSUE(b)                                                                        \
    do {                                                                                    \
        const uint8_t *blk_ = w + (g * BLOCKS + (b)) * BLOCK_BYTES;                         \
        PREFETCH_AHEAD(blk_)                                                                \
        uint8_t *bytes = unpacked[(b) & 1];                                                 \
        for (int j = 0; j < 4; j++) {                                                       \
            __m512i p = _mm512_loadu_si512(blk_ + 64 + 64 * j);                             \
            _mm512_store_si512(bytes + 64 * j, _mm512_and_si512(p, low));                   \
            _mm512_store_si512(bytes + 256 + 64 * j,                                        \
                               _mm512_and_si512(_mm512_srli_epi16(p, 4), low));             \
        }                                                                                   \
        if (((b) & 1) == 0) {                                                               \
            _tile_zero(0);                                                                  \
            _tile_loadd(2, acts + (b) * 32, WIDTH);                                         \
            _tile_loadd(4, unpacked[0], 64);                                                \
            _tile_dpbsud(0, 2, 4);                                                          \
            _tile_stored(0, sums[0], 64);                                                   \
        } else {                                                                            \
            _tile_zero(1);                                                                  \
            _tile_loadd(3, acts + (b) * 32, WIDTH);                                         \
            _tile_loadd(5, unpacked[1], 64);                                                \
            _tile_dpbsud(1, 3, 5);                                                          \
            _tile_stored(1, sums[1], 64);                                                   \
        }                                                                                   \
    } while (0)

// The next block's tile work is issued before this block's float epilogue.
#define AMX_KERNEL(NAME, ROWS)                                                                \
    __attribute__((noinline)) static void NAME(const uint8_t *w, long groups,                 \
                                               const int8_t *acts, const float *act_d,        \
                                               const float *act_s, float *out) {             \
        const __m512i low = _mm512_set1_epi8(15);                                             \
        __attribute__((aligned(64))) uint8_t unpacked[2][512];                                \
        __attribute__((aligned(64))) int32_t sums[2][MAX_ROWS * 16];                          \
        for (long g = 0; g < groups; g++) {                                                   \
            __m512 acc[ROWS];                                                                 \
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();                      \
            AMX_ISSUE(0);                                                                     \
            for (int b = 0; b < BLOCKS; b++) {                                                \
                const uint8_t *blk = w + (g * BLOCKS + b) * BLOCK_BYTES;                      \
                if (b + 1 < BLOCKS) AMX_ISSUE(b + 1);                                         \
                __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)blk));            \
                __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(blk + 32)));     \
                for (int r = 0; r < ROWS; r++) {                                              \
                    EPILOGUE(_mm512_load_si512(sums[b & 1] + 16 * r))                         \
                }                                                                             \
            }                                                                                 \
            for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(out + (g * MAX_ROWS + r) * 16, acc[r]); \
        }                                                                                     \
    }
AMX_KERNEL(amx_1, 1)
AMX_KERNEL(amx_4, 4)
AMX_KERNEL(amx_8, 8)

static int amx_allowed(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static void amx_ops(void) {
    __attribute__((aligned(64))) static int8_t acts[4 * WIDTH];
    __attribute__((aligned(64))) static uint8_t bytes[4][512];
    __attribute__((aligned(64))) static int32_t sums[4][64];
    const long n = 100000;
    double t0;
    configure_tiles(4);
    t0 = now();
    for (long i = 0; i < n; i++) {
        _tile_dpbsud(0, 2, 4);
        _tile_dpbsud(1, 3, 5);
    }
    printf("tdpbsud, independent tiles:        %5.2f ns\n", (now() - t0) * 1e9 / n / 2);
    t0 = now();
    for (long i = 0; i < n; i++) {
        _tile_loadd(2, acts + (i & 15) * 32, WIDTH);
        _tile_loadd(3, acts + ((i + 1) & 15) * 32, WIDTH);
    }
    printf("tileloadd, activations (4 x 32 B): %5.2f ns\n", (now() - t0) * 1e9 / n / 2);
    t0 = now();
    for (long i = 0; i < n; i++) {
        _tile_loadd(4, bytes[i & 3], 64);
        _tile_loadd(5, bytes[(i + 1) & 3], 64);
    }
    printf("tileloadd, weights (8 x 64 B):     %5.2f ns\n", (now() - t0) * 1e9 / n / 2);
    t0 = now();
    for (long i = 0; i < n; i++) {
        _tile_stored(0, sums[i & 3], 64);
        _tile_stored(1, sums[(i + 2) & 3], 64);
    }
    printf("tilestored, sums (4 x 64 B):       %5.2f ns\n", (now() - t0) * 1e9 / n / 2);
    t0 = now();
    for (long i = 0; i < n; i++) {
        _tile_zero(0);
        _tile_loadd(2, acts + (i & 15) * 32, WIDTH);
        _tile_loadd(4, bytes[i & 3], 64);
        _tile_dpbsud(0, 2, 4);
        _tile_stored(0, sums[i & 3], 64);
        _tile_zero(1);
        _tile_loadd(3, acts + ((i + 3) & 15) * 32, WIDTH);
        _tile_loadd(5, bytes[(i + 1) & 3], 64);
        _tile_dpbsud(1, 3, 5);
        _tile_stored(1, sums[(i + 1) & 3], 64);
    }
    printf("a whole block (zero, loads, product, store): %5.2f ns\n", (now() - t0) * 1e9 / n / 2);
    _tile_release();
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "hot";
    int amx = amx_allowed();
    if (!strcmp(mode, "amx-ops")) {
        if (!amx) return fprintf(stderr, "AMX state refused\n"), 1;
        amx_ops();
        return 0;
    }
    int hot = !strcmp(mode, "hot");
    if (!hot && strcmp(mode, "stream")) return fprintf(stderr, "modes: hot, stream, amx-ops\n"), 2;
    // hot: 96 groups of 16 rows (553 KB, in L2); stream: 100 MB.
    long groups = hot ? 96 : 17476;
    size_t bytes = (size_t)groups * BLOCKS * BLOCK_BYTES;
    uint8_t *w = aligned_alloc(64, bytes + 16384);
    for (size_t i = 0; i < bytes + 16384; i++) w[i] = (i * 7) & 0x3f;  // small f16 scales
    static int8_t acts[MAX_ROWS * WIDTH];
    static float act_d[MAX_ROWS * BLOCKS], act_s[MAX_ROWS * BLOCKS];
    for (int i = 0; i < MAX_ROWS * WIDTH; i++) acts[i] = i % 50 - 25;
    for (int i = 0; i < MAX_ROWS * BLOCKS; i++) act_d[i] = 0.01f * (i % 5 + 1), act_s[i] = 0.02f;
    size_t out_floats = (size_t)groups * MAX_ROWS * 16;
    float *out_vnni = aligned_alloc(64, out_floats * 4), *out_amx = aligned_alloc(64, out_floats * 4);
    Kernel kernels[6] = {vnni_1, amx_1, vnni_4, amx_4, vnni_8, amx_8};
    const char *names[6] = {"1 row, vpdpbusd", "1 row, AMX", "4 rows, vpdpbusd", "4 rows, AMX",
                            "8 rows, vpdpbusd", "8 rows, AMX"};
    int rows[6] = {1, 1, 4, 4, 8, 8};
    int threads = hot ? 1 : omp_get_max_threads();
    double cycle = hot ? cycle_seconds() : 0;
    for (int k = 0; k < 6; k++) {
        int is_amx = k & 1;
        if (is_amx && !amx) continue;
        float *out = is_amx ? out_amx : out_vnni;
        double best = 1e9;
        for (int it = 0; it < (hot ? 200 : 5); it++) {
            double t0 = now();
#pragma omp parallel num_threads(threads)
            {
                if (is_amx) configure_tiles(rows[k]);
                long share = groups / threads, t = omp_get_thread_num();
                kernels[k](w + (size_t)t * share * BLOCKS * BLOCK_BYTES, share, acts, act_d, act_s,
                           out + t * share * MAX_ROWS * 16);
                if (is_amx) _tile_release();
            }
            double s = now() - t0;
            if (s < best) best = s;
        }
        double per_block = best / ((double)groups / threads * BLOCKS);
        if (hot)
            printf("%-17s %6.2f ns %6.1f cycles a block\n", names[k], per_block * 1e9, per_block / cycle);
        else
            printf("%-17s %6.2f ms (%.1f GB/s)\n", names[k], best * 1e3, bytes / best / 1e9);
        if (is_amx) {
            long differ = 0;
            for (size_t i = 0; i < out_floats; i++)
                if ((i / 16) % MAX_ROWS < (size_t)rows[k] && out_vnni[i] != out_amx[i]) differ++;
            if (differ) printf("  %ld outputs differ from vpdpbusd's\n", differ);
        }
    }
    return 0;
}
