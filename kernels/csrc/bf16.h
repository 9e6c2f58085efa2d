/*
 * bf16 <-> float32 for the scalar C kernels, and loads/stores that pick bf16 or float32
 * storage by a compile-time `is_bf16` (each kernel is instantiated once per storage type).
 * cpu_ext.py hashes the headers of csrc/ into every kernel's cache key.
 */
#pragma once
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch does; a NaN stays a (quiet) NaN: rounding its mantissa
   could otherwise carry into the exponent and sign (0x7fffffff would become -0.0). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define LD(p, i) (is_bf16 ? bf16_to_f32(((const uint16_t *)(p))[i]) : ((const float *)(p))[i])
#define ST(p, i, v)                                              \
    do {                                                         \
        if (is_bf16) ((uint16_t *)(p))[i] = f32_to_bf16(v);      \
        else ((float *)(p))[i] = (v);                            \
    } while (0)
#define ROUND(v) (is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : (v))
