/*
 * CRC32C (Castagnoli) for VolumeDriver.
 *
 * Every cluster payload and every on-disk or on-object record is protected by CRC32C, so this runs on every read and
 * write. It uses the SSE4.2 / ARMv8 CRC instructions when the CPU has them and a table-driven fallback otherwise.
 * The running value is the usual reflected, pre- and post-inverted CRC32C: vd_crc32c_update(0, data, n) of
 * "123456789" is 0xE3069283.
 */
#ifndef VD_CRC32C_H
#define VD_CRC32C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Extends `crc` (the CRC32C of the bytes before `data`, or 0 for none) with `length` bytes at `data`.
uint32_t vd_crc32c_update(uint32_t crc, const void *data, size_t length);

/// The CRC32C of A||B from crc_a = CRC32C(A), crc_b = CRC32C(B) and the length of B, without reading A or B.
uint32_t vd_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b);

/// 1 when the hardware instruction path is in use, 0 for the table fallback.
int vd_crc32c_is_hardware_accelerated(void);

#ifdef __cplusplus
}
#endif

#endif
