/* Modbus framing: requests built and replies checked by the driver itself, for Modbus TCP
 * (MBAP header) and for RTU frames (unit id + PDU + CRC16), whether they travel over a serial
 * line or a TCP socket to a serial server.
 *
 * Pure functions with no I/O and no allocation, so the unit tests and the fuzzer reach every
 * branch. A reply is taken only if it answers exactly the request that was sent: MBAP protocol
 * id 0, a length that agrees with the bytes, the request's transaction and unit id, the
 * request's function, the byte count a read of that size must have, and for writes the echo of
 * what was written. Anything else is a named verdict, never a value.
 *
 * References: Modbus Application Protocol v1.1b3 (PDUs), Modbus Messaging on TCP/IP v1.0b
 * (MBAP), Modbus over Serial Line v1.02 (RTU, CRC16).
 */
#ifndef SMP_MB_FRAME_H
#define SMP_MB_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SMP_MB_MAX_PDU      253u /* function code + data */
#define SMP_MB_MBAP_HDR     7u   /* transaction id, protocol id, length, unit id */
#define SMP_MB_TCP_MAX_ADU  (SMP_MB_MBAP_HDR - 1u + 1u + SMP_MB_MAX_PDU) /* 260 */
#define SMP_MB_RTU_MAX_ADU  (1u + SMP_MB_MAX_PDU + 2u)                   /* 256 */
#define SMP_MB_RTU_EXC_LEN  5u /* unit, function | 0x80, exception code, CRC */
#define SMP_MB_RTU_HEAD_LEN 2u /* bytes that tell a reply's length: unit, function */

/* Function codes the driver issues. */
enum {
    SMP_MB_FC_READ_COILS = 1,
    SMP_MB_FC_READ_DISCRETE_INPUTS = 2,
    SMP_MB_FC_READ_HOLDING_REGISTERS = 3,
    SMP_MB_FC_READ_INPUT_REGISTERS = 4,
    SMP_MB_FC_WRITE_SINGLE_COIL = 5,
    SMP_MB_FC_WRITE_SINGLE_REGISTER = 6,
    SMP_MB_FC_WRITE_MULTIPLE_REGISTERS = 16,
};

/* One request. For reads, count is the number of bits (FC1/2, 1..2000) or registers (FC3/4,
 * 1..125). FC5 writes `value` 0 or 1; FC6 writes `value`; FC16 writes regs[0..count), 1..123.
 * regs is borrowed. */
typedef struct smp_mb_req {
    uint8_t unit;
    uint8_t fc;
    uint16_t address;
    uint16_t count;
    uint16_t value;
    const uint16_t *regs;
} smp_mb_req_t;

/* Why a reply was not taken (SMP_MB_OK: it was, SMP_MB_EXCEPTION: the device refused). */
typedef enum smp_mb_verdict {
    SMP_MB_OK = 0,
    SMP_MB_EXCEPTION,    /* a well-formed exception reply; *exception holds its code */
    SMP_MB_BAD_PROTOCOL, /* MBAP protocol id is not 0 */
    SMP_MB_BAD_LENGTH,   /* MBAP length out of range, or disagrees with the PDU */
    SMP_MB_BAD_TID,      /* transaction id is not the request's */
    SMP_MB_BAD_UNIT,     /* unit id is not the request's */
    SMP_MB_BAD_CRC,      /* RTU CRC16 does not match */
    SMP_MB_BAD_FUNCTION, /* function code is neither the request's nor its exception */
    SMP_MB_BAD_COUNT,    /* byte count or reply length is not what the request implies */
    SMP_MB_BAD_ECHO,     /* a write reply does not echo the address/value/quantity written */
} smp_mb_verdict_t;

/* Static text for a verdict, e.g. "MBAP protocol id is not 0". */
const char *smp_mb_verdict_str(smp_mb_verdict_t v);

/* CRC16 of Modbus RTU (polynomial 0xA001 reflected, initial 0xFFFF). The frame carries it
 * low byte first. */
uint16_t smp_mb_crc16(const uint8_t *p, size_t n);

/* Builds the request PDU into pdu (cap bytes). Returns its length, or -EINVAL for a function
 * this codec does not build or a count outside the function's range, or -ENOSPC. */
int smp_mb_pdu_encode(const smp_mb_req_t *rq, uint8_t *pdu, size_t cap);

/* Length of the normal (non-exception) reply PDU to rq, function code included; 0 for a
 * request smp_mb_pdu_encode refuses. */
size_t smp_mb_reply_pdu_len(const smp_mb_req_t *rq);

/* Checks a reply PDU against rq. On SMP_MB_OK, reads fill regs[0..count) (FC3/4) or
 * bits[0..count) with 0/1 (FC1/2) when the pointer is not NULL; on SMP_MB_EXCEPTION,
 * *exception is the device's exception code (1..255). */
smp_mb_verdict_t smp_mb_pdu_check(const smp_mb_req_t *rq, const uint8_t *pdu, size_t len,
                                  uint16_t *regs, uint8_t *bits, int *exception);

/* Writes the MBAP header + PDU into out (cap >= 7 + pdu_len). Returns the ADU length or
 * -ENOSPC / -EINVAL (pdu_len 0 or above SMP_MB_MAX_PDU). */
int smp_mb_mbap_encode(uint16_t tid, uint8_t unit, const uint8_t *pdu, size_t pdu_len, uint8_t *out,
                       size_t cap);

/* Checks the 7-byte MBAP header of a reply: protocol id 0 and a length of 2..254 (unit id +
 * a PDU of 1..253 bytes). Fills *tid, *unit and *pdu_len (the bytes that follow the header).
 * The caller then compares tid and unit with its request: a stale transaction id (a reply that
 * came after its request timed out) is skipped, not taken. */
smp_mb_verdict_t smp_mb_mbap_header(const uint8_t hdr[SMP_MB_MBAP_HDR], uint16_t *tid,
                                    uint8_t *unit, size_t *pdu_len);

/* Writes unit + PDU + CRC into out (cap >= pdu_len + 3). Returns the ADU length or -ENOSPC /
 * -EINVAL. */
int smp_mb_rtu_encode(uint8_t unit, const uint8_t *pdu, size_t pdu_len, uint8_t *out, size_t cap);

/* From the first SMP_MB_RTU_HEAD_LEN bytes of an RTU reply, the length the whole reply must
 * have: 5 for an exception to rq, 1 + smp_mb_reply_pdu_len(rq) + 2 for a normal reply, and 0
 * when the head cannot start a reply to rq (wrong unit or function: *why says which). */
size_t smp_mb_rtu_reply_len(const smp_mb_req_t *rq, const uint8_t head[SMP_MB_RTU_HEAD_LEN],
                            smp_mb_verdict_t *why);

/* Checks a whole RTU reply (adu, len bytes) against rq: its CRC, its unit id, then its PDU as
 * smp_mb_pdu_check does. */
smp_mb_verdict_t smp_mb_rtu_check(const smp_mb_req_t *rq, const uint8_t *adu, size_t len,
                                  uint16_t *regs, uint8_t *bits, int *exception);

#endif
