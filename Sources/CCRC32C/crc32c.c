/*
 * CRC32C (Castagnoli, reflected polynomial 0x82F63B78). Hardware path: SSE4.2 crc32 on x86-64, the CRC extension on
 * AArch64, chosen once at first use. Fallback: slicing-by-8 tables built at first use.
 */
#include "vd_crc32c.h"

#include <string.h>

#define VD_CRC32C_POLY 0x82F63B78u

static uint32_t vd_table[8][256];
static int vd_table_ready = 0;

static void vd_build_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c & 1u) ? (c >> 1) ^ VD_CRC32C_POLY : (c >> 1);
        }
        vd_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            vd_table[t][i] = (vd_table[t - 1][i] >> 8) ^ vd_table[0][vd_table[t - 1][i] & 0xFFu];
        }
    }
    __atomic_store_n(&vd_table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t vd_crc32c_software(uint32_t crc, const unsigned char *p, size_t n) {
    if (!__atomic_load_n(&vd_table_ready, __ATOMIC_ACQUIRE)) {
        vd_build_tables();
    }
    while (n > 0 && ((uintptr_t)p & 7u) != 0) {
        crc = (crc >> 8) ^ vd_table[0][(crc ^ *p++) & 0xFFu];
        n--;
    }
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        uint32_t lo = (uint32_t)word ^ crc;
        uint32_t hi = (uint32_t)(word >> 32);
        crc = vd_table[7][lo & 0xFFu] ^ vd_table[6][(lo >> 8) & 0xFFu] ^ vd_table[5][(lo >> 16) & 0xFFu] ^
              vd_table[4][lo >> 24] ^ vd_table[3][hi & 0xFFu] ^ vd_table[2][(hi >> 8) & 0xFFu] ^
              vd_table[1][(hi >> 16) & 0xFFu] ^ vd_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0) {
        crc = (crc >> 8) ^ vd_table[0][(crc ^ *p++) & 0xFFu];
    }
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t vd_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    while (n > 0 && ((uintptr_t)p & 7u) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 32) {
        uint64_t w0, w1, w2, w3;
        memcpy(&w0, p, 8);
        memcpy(&w1, p + 8, 8);
        memcpy(&w2, p + 16, 8);
        memcpy(&w3, p + 24, 8);
        c = _mm_crc32_u64(c, w0);
        c = _mm_crc32_u64(c, w1);
        c = _mm_crc32_u64(c, w2);
        c = _mm_crc32_u64(c, w3);
        p += 32;
        n -= 32;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    while (n-- > 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
    }
    return (uint32_t)c;
}

/*
 * Three independent streams. The crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle, so one
 * dependency chain runs at a third of what the unit can do. A block of 3 * VD_STRIPE bytes is split into three
 * stripes whose CRC registers run side by side (the first continuing the running register, the other two from 0);
 * then, because the register is linear in its input, register(s0 s1 s2) = shift(shift(r0) ^ r1) ^ r2, where shift
 * is "feed VD_STRIPE zero bytes": a linear map of the 32-bit register, applied through four 256-entry tables (one
 * per register byte) built at first use from the single-stream path.
 */
#define VD_STRIPE 1360 /* 170 words: 3 stripes cover 4080 of a 4096-byte cluster */

static uint32_t vd_shift_table[4][256];
static int vd_shift_ready = 0;

static void vd_build_shift_table(void) {
    static const unsigned char zeroes[VD_STRIPE];
    for (int k = 0; k < 4; k++) {
        for (uint32_t b = 0; b < 256; b++) {
            vd_shift_table[k][b] = vd_crc32c_hardware(b << (8 * k), zeroes, VD_STRIPE);
        }
    }
    __atomic_store_n(&vd_shift_ready, 1, __ATOMIC_RELEASE);
}

static inline uint32_t vd_shift(uint32_t c) {
    return vd_shift_table[0][c & 0xFFu] ^ vd_shift_table[1][(c >> 8) & 0xFFu] ^ vd_shift_table[2][(c >> 16) & 0xFFu] ^
           vd_shift_table[3][c >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t vd_crc32c_hardware3(uint32_t crc, const unsigned char *p, size_t n) {
    if (n < 3 * VD_STRIPE) {
        return vd_crc32c_hardware(crc, p, n);
    }
    if (!__atomic_load_n(&vd_shift_ready, __ATOMIC_ACQUIRE)) {
        vd_build_shift_table();
    }
    uint64_t c0 = crc;
    while (n >= 3 * VD_STRIPE) {
        uint64_t c1 = 0, c2 = 0;
        const unsigned char *p1 = p + VD_STRIPE, *p2 = p + 2 * VD_STRIPE;
        for (size_t i = 0; i < VD_STRIPE; i += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, p + i, 8);
            memcpy(&w1, p1 + i, 8);
            memcpy(&w2, p2 + i, 8);
            c0 = _mm_crc32_u64(c0, w0);
            c1 = _mm_crc32_u64(c1, w1);
            c2 = _mm_crc32_u64(c2, w2);
        }
        c0 = vd_shift(vd_shift((uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
        p += 3 * VD_STRIPE;
        n -= 3 * VD_STRIPE;
    }
    return vd_crc32c_hardware((uint32_t)c0, p, n);
}

static int vd_detect_hardware(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>

static uint32_t vd_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
    while (n > 0 && ((uintptr_t)p & 7u) != 0) {
        crc = __crc32cb(crc, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        crc = __crc32cd(crc, w);
        p += 8;
        n -= 8;
    }
    while (n-- > 0) {
        crc = __crc32cb(crc, *p++);
    }
    return crc;
}

static int vd_detect_hardware(void) { return 1; }
#else
static uint32_t vd_crc32c_hardware(uint32_t crc, const unsigned char *p, size_t n) {
    return vd_crc32c_software(crc, p, n);
}

static int vd_detect_hardware(void) { return 0; }
#endif

/* -1 unknown, 0 software, 1 hardware */
static int vd_mode = -1;

int vd_crc32c_is_hardware_accelerated(void) {
    int mode = __atomic_load_n(&vd_mode, __ATOMIC_ACQUIRE);
    if (mode < 0) {
        mode = vd_detect_hardware();
        __atomic_store_n(&vd_mode, mode, __ATOMIC_RELEASE);
    }
    return mode;
}

uint32_t vd_crc32c_update(uint32_t crc, const void *data, size_t length) {
    const unsigned char *p = (const unsigned char *)data;
    uint32_t c = ~crc;
    if (vd_crc32c_is_hardware_accelerated()) {
#if defined(__x86_64__)
        c = vd_crc32c_hardware3(c, p, length);
#else
        c = vd_crc32c_hardware(c, p, length);
#endif
    } else {
        c = vd_crc32c_software(c, p, length);
    }
    return ~c;
}

/*
 * CRC combination. Appending n zero bytes to a message multiplies its (reflected) CRC register by x^(8n) modulo the
 * polynomial, so CRC(A||B) = CRC(A) * x^(8*len(B)) mod P  XOR  CRC(B) (the pre- and post-inversions cancel out).
 * Polynomials are 32-bit values in reflected order: bit 31 is x^0.
 */
static uint32_t vd_gf2_multiply_mod(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
        if (a & bit) {
            product ^= b;
        }
        b = (b & 1u) ? (b >> 1) ^ VD_CRC32C_POLY : (b >> 1);
    }
    return product;
}

/* x^(2^k) mod P for k = 0..63, built at first use. */
static uint32_t vd_x_power_table[64];
static int vd_x_power_ready = 0;

static void vd_build_x_powers(void) {
    uint32_t p = 1u << 30; /* x^1 */
    for (int k = 0; k < 64; k++) {
        vd_x_power_table[k] = p;
        p = vd_gf2_multiply_mod(p, p);
    }
    __atomic_store_n(&vd_x_power_ready, 1, __ATOMIC_RELEASE);
}

uint32_t vd_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) {
    if (!__atomic_load_n(&vd_x_power_ready, __ATOMIC_ACQUIRE)) {
        vd_build_x_powers();
    }
    /* x^(8 * length_b) mod P, by squaring: bit i of length_b contributes x^(2^(i+3)). */
    uint32_t shift = 1u << 31; /* x^0 */
    int k = 3;
    for (uint64_t n = length_b; n != 0 && k < 64; n >>= 1, k++) {
        if (n & 1u) {
            shift = vd_gf2_multiply_mod(vd_x_power_table[k], shift);
        }
    }
    return vd_gf2_multiply_mod(shift, crc_a) ^ crc_b;
}
