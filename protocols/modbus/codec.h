/* Modbus value codec: turns registers and bits into the contract's raw values and back.
 *
 * Pure functions with no libmodbus dependency, so they can be unit-tested and fuzzed on their
 * own. Everything here deals in raw device values: scale and offset are the host's business.
 *
 * Byte orders follow Part B of the contract. The four letters name the bytes of a 32-bit value,
 * A the most significant, in the order they appear on the wire (register 0 high byte first):
 *
 *   value 0x41480000 (float32 12.5)   ABCD: 4148 0000   CDAB: 0000 4148
 *                                     BADC: 4841 0000   DCBA: 0000 4841
 *
 * For 64-bit values the letters extend: ABCD = ABCDEFGH, CDAB = GHEFCDAB (register order
 * reversed), BADC = BADCFEHG (bytes swapped inside each register), DCBA = HGFEDCBA. Strings hold
 * two characters per register, high byte first; BADC swaps each pair.
 */
#ifndef SMP_MODBUS_CODEC_H
#define SMP_MODBUS_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <simpul/plugin.h>

/* The four Modbus data tables, in the order of the `table` tag key's choices (so a resolved
 * enum param's index is the table). The order is also the planner's output order. */
typedef enum smp_mb_table {
    SMP_MB_COIL = 0,
    SMP_MB_DISCRETE_INPUT,
    SMP_MB_INPUT_REGISTER,
    SMP_MB_HOLDING_REGISTER,
    SMP_MB_NTABLES
} smp_mb_table_t;

/* Byte orders, in the order of the `order` tag key's choices. */
typedef enum smp_mb_order {
    SMP_MB_ABCD = 0,
    SMP_MB_BADC,
    SMP_MB_CDAB,
    SMP_MB_DCBA,
    SMP_MB_NORDERS
} smp_mb_order_t;

/* Maximum registers a string tag may span (one full FC3/FC4 read). */
#define SMP_MB_STRING_MAX_REGS 125

/* True for coil and discrete-input tables, whose unit is the bit, not the register. */
bool smp_mb_table_is_bits(smp_mb_table_t table);

/* Table name as used in configs ("coil", ...), or "?" for an invalid value. */
const char *smp_mb_table_name(smp_mb_table_t table);

/* Number of registers a value of `type` occupies: 1 for bool and 16-bit types, 2 for 32-bit,
 * 4 for 64-bit, `length` for strings. Returns 0 for an unknown type or a string length outside
 * 1..SMP_MB_STRING_MAX_REGS. */
unsigned smp_mb_type_regs(smp_type_t type, unsigned length);

/* Size of the text buffer smp_mb_decode_regs() needs for a string of `length` registers: every
 * byte may become a 3-byte U+FFFD, plus a terminating NUL. */
size_t smp_mb_string_bufsize(unsigned length);

/* Decodes `nregs` registers (as libmodbus returns them: host-order 16-bit words, register 0
 * first) into *out.
 *   type   any contract type; nregs must equal smp_mb_type_regs(type, nregs) for strings and
 *          smp_mb_type_regs(type, 0) otherwise.
 *   order  byte order; ignored for bool and 16-bit types; for strings only ABCD and BADC are
 *          meaningful, CDAB and DCBA are refused.
 *   bit    for bool: 0..15 selects one bit of the register; -1 means "true when non-zero".
 *          Must be -1 for every other type.
 *   strbuf for strings: where the text is written (borrowed; out->s points into it), of
 *          `strsize` >= smp_mb_string_bufsize(nregs) bytes. Trailing NULs and spaces are
 *          trimmed and invalid UTF-8 is replaced by U+FFFD, so the text is always valid UTF-8;
 *          it is NUL-terminated, and out->len excludes the NUL. May be NULL for other types.
 * Returns 0, or -EINVAL for a combination the contract does not allow. */
int smp_mb_decode_regs(const uint16_t *regs, size_t nregs, smp_type_t type, smp_mb_order_t order,
                       int bit, char *strbuf, size_t strsize, smp_value_t *out);

/* Encodes raw value *in of `type` into `nregs` registers (the inverse of smp_mb_decode_regs).
 * For bool without a bit the register becomes 1 or 0 (bit read-modify-write is
 * smp_mb_bit_apply's job). Strings are padded with NULs to nregs registers.
 * Returns 0; -ERANGE when the value does not fit the type (e.g. 70000 as uint16, a finite
 * double beyond float32's range, a string longer than 2 * nregs bytes); -EINVAL for a bad
 * combination (wrong nregs, string with CDAB/DCBA). */
int smp_mb_encode_regs(const smp_value_t *in, smp_type_t type, smp_mb_order_t order, uint16_t *regs,
                       size_t nregs);

/* Bit read-modify-write: returns `reg` with bit `bit` (0..15) set to `value`. */
uint16_t smp_mb_bit_apply(uint16_t reg, unsigned bit, bool value);

/* Writes `len` bytes of `in` to `out` as valid UTF-8, replacing each maximal ill-formed
 * subsequence by U+FFFD (the Unicode "maximal subpart" practice). `out` must hold 3 * len + 1
 * bytes; the result is NUL-terminated. Returns the output length (without the NUL). */
size_t smp_mb_utf8_sanitize(const uint8_t *in, size_t len, char *out);

#endif /* SMP_MODBUS_CODEC_H */
