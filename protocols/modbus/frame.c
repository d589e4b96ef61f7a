/* Modbus framing (see frame.h). Every length is checked before a byte is read. */
#include "frame.h"

#include <errno.h>
#include <string.h>

#define MAX_READ_BITS  2000u
#define MAX_READ_REGS  125u
#define MAX_WRITE_REGS 123u

static unsigned be16(const uint8_t *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

const char *smp_mb_verdict_str(smp_mb_verdict_t v)
{
    switch (v) {
    case SMP_MB_OK:
        return "ok";
    case SMP_MB_EXCEPTION:
        return "exception reply";
    case SMP_MB_BAD_PROTOCOL:
        return "MBAP protocol id is not 0";
    case SMP_MB_BAD_LENGTH:
        return "frame length does not agree with its content";
    case SMP_MB_BAD_TID:
        return "reply to another transaction";
    case SMP_MB_BAD_UNIT:
        return "reply from another unit id";
    case SMP_MB_BAD_CRC:
        return "CRC error in the reply";
    case SMP_MB_BAD_FUNCTION:
        return "reply to another function";
    case SMP_MB_BAD_COUNT:
        return "reply byte count does not match the request";
    case SMP_MB_BAD_ECHO:
        return "write reply does not echo the request";
    }
    return "unknown verdict";
}

uint16_t smp_mb_crc16(const uint8_t *p, size_t n)
{
    uint16_t crc = 0xFFFF;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int b = 0; b < 8; b++) {
            crc = (crc & 1) ? (uint16_t)((crc >> 1) ^ 0xA001) : (uint16_t)(crc >> 1);
        }
    }
    return crc;
}

/* True when rq is a request this codec builds, with a count in its function's range. */
static bool req_valid(const smp_mb_req_t *rq)
{
    switch (rq->fc) {
    case SMP_MB_FC_READ_COILS:
    case SMP_MB_FC_READ_DISCRETE_INPUTS:
        return rq->count >= 1 && rq->count <= MAX_READ_BITS &&
               (unsigned)rq->address + rq->count <= 65536u;
    case SMP_MB_FC_READ_HOLDING_REGISTERS:
    case SMP_MB_FC_READ_INPUT_REGISTERS:
        return rq->count >= 1 && rq->count <= MAX_READ_REGS &&
               (unsigned)rq->address + rq->count <= 65536u;
    case SMP_MB_FC_WRITE_SINGLE_COIL:
        return rq->value <= 1;
    case SMP_MB_FC_WRITE_SINGLE_REGISTER:
        return true;
    case SMP_MB_FC_WRITE_MULTIPLE_REGISTERS:
        return rq->regs != NULL && rq->count >= 1 && rq->count <= MAX_WRITE_REGS &&
               (unsigned)rq->address + rq->count <= 65536u;
    default:
        return false;
    }
}

int smp_mb_pdu_encode(const smp_mb_req_t *rq, uint8_t *pdu, size_t cap)
{
    if (rq == NULL || pdu == NULL || !req_valid(rq)) {
        return -EINVAL;
    }
    size_t len = rq->fc == SMP_MB_FC_WRITE_MULTIPLE_REGISTERS ? 6u + 2u * rq->count : 5u;
    if (cap < len) {
        return -ENOSPC;
    }
    pdu[0] = rq->fc;
    put16(pdu + 1, rq->address);
    switch (rq->fc) {
    case SMP_MB_FC_WRITE_SINGLE_COIL:
        put16(pdu + 3, rq->value ? 0xFF00u : 0x0000u);
        break;
    case SMP_MB_FC_WRITE_SINGLE_REGISTER:
        put16(pdu + 3, rq->value);
        break;
    case SMP_MB_FC_WRITE_MULTIPLE_REGISTERS:
        put16(pdu + 3, rq->count);
        pdu[5] = (uint8_t)(2u * rq->count);
        for (unsigned i = 0; i < rq->count; i++) {
            put16(pdu + 6 + 2 * i, rq->regs[i]);
        }
        break;
    default:
        put16(pdu + 3, rq->count);
        break;
    }
    return (int)len;
}

/* Data bytes of a normal read reply, after the byte count. */
static size_t read_bytes(const smp_mb_req_t *rq)
{
    if (rq->fc == SMP_MB_FC_READ_COILS || rq->fc == SMP_MB_FC_READ_DISCRETE_INPUTS) {
        return (rq->count + 7u) / 8u;
    }
    return 2u * rq->count;
}

size_t smp_mb_reply_pdu_len(const smp_mb_req_t *rq)
{
    if (rq == NULL || !req_valid(rq)) {
        return 0;
    }
    switch (rq->fc) {
    case SMP_MB_FC_WRITE_SINGLE_COIL:
    case SMP_MB_FC_WRITE_SINGLE_REGISTER:
    case SMP_MB_FC_WRITE_MULTIPLE_REGISTERS:
        return 5; /* function, address, value or quantity */
    default:
        return 2 + read_bytes(rq); /* function, byte count, data */
    }
}

/* A write reply echoes the address and, for FC5/6, the value; for FC16, the quantity. */
static smp_mb_verdict_t check_echo(const smp_mb_req_t *rq, const uint8_t *pdu)
{
    unsigned want = rq->count;
    if (rq->fc == SMP_MB_FC_WRITE_SINGLE_COIL) {
        want = rq->value ? 0xFF00u : 0x0000u;
    } else if (rq->fc == SMP_MB_FC_WRITE_SINGLE_REGISTER) {
        want = rq->value;
    }
    return be16(pdu + 1) == rq->address && be16(pdu + 3) == want ? SMP_MB_OK : SMP_MB_BAD_ECHO;
}

static void unpack(const smp_mb_req_t *rq, const uint8_t *data, uint16_t *regs, uint8_t *bits)
{
    if (rq->fc == SMP_MB_FC_READ_COILS || rq->fc == SMP_MB_FC_READ_DISCRETE_INPUTS) {
        for (unsigned i = 0; bits != NULL && i < rq->count; i++) {
            bits[i] = (uint8_t)((data[i / 8] >> (i % 8)) & 1u);
        }
    } else {
        for (unsigned i = 0; regs != NULL && i < rq->count; i++) {
            regs[i] = (uint16_t)be16(data + 2 * i);
        }
    }
}

smp_mb_verdict_t smp_mb_pdu_check(const smp_mb_req_t *rq, const uint8_t *pdu, size_t len,
                                  uint16_t *regs, uint8_t *bits, int *exception)
{
    size_t want = smp_mb_reply_pdu_len(rq);
    if (want == 0 || pdu == NULL || len == 0) {
        return SMP_MB_BAD_LENGTH;
    }
    if (pdu[0] == (rq->fc | 0x80u)) {
        if (len != 2) {
            return SMP_MB_BAD_LENGTH;
        }
        if (exception != NULL) {
            *exception = pdu[1];
        }
        return pdu[1] != 0 ? SMP_MB_EXCEPTION : SMP_MB_BAD_COUNT;
    }
    if (pdu[0] != rq->fc) {
        return SMP_MB_BAD_FUNCTION;
    }
    if (len != want) {
        return SMP_MB_BAD_COUNT;
    }
    if (want == 5 && rq->fc >= SMP_MB_FC_WRITE_SINGLE_COIL) {
        return check_echo(rq, pdu);
    }
    if (pdu[1] != read_bytes(rq)) {
        return SMP_MB_BAD_COUNT;
    }
    unpack(rq, pdu + 2, regs, bits);
    return SMP_MB_OK;
}

int smp_mb_mbap_encode(uint16_t tid, uint8_t unit, const uint8_t *pdu, size_t pdu_len, uint8_t *out,
                       size_t cap)
{
    if (pdu == NULL || out == NULL || pdu_len == 0 || pdu_len > SMP_MB_MAX_PDU) {
        return -EINVAL;
    }
    if (cap < SMP_MB_MBAP_HDR + pdu_len) {
        return -ENOSPC;
    }
    put16(out, tid);
    put16(out + 2, 0);
    put16(out + 4, (unsigned)(pdu_len + 1));
    out[6] = unit;
    memcpy(out + SMP_MB_MBAP_HDR, pdu, pdu_len);
    return (int)(SMP_MB_MBAP_HDR + pdu_len);
}

smp_mb_verdict_t smp_mb_mbap_header(const uint8_t hdr[SMP_MB_MBAP_HDR], uint16_t *tid,
                                    uint8_t *unit, size_t *pdu_len)
{
    unsigned len = be16(hdr + 4);
    *tid = (uint16_t)be16(hdr);
    *unit = hdr[6];
    *pdu_len = 0;
    /* Length first: with a sane length the caller can skip this frame and stay in step. */
    if (len < 2 || len > 1 + SMP_MB_MAX_PDU) {
        return SMP_MB_BAD_LENGTH;
    }
    *pdu_len = len - 1;
    return be16(hdr + 2) == 0 ? SMP_MB_OK : SMP_MB_BAD_PROTOCOL;
}

int smp_mb_rtu_encode(uint8_t unit, const uint8_t *pdu, size_t pdu_len, uint8_t *out, size_t cap)
{
    if (pdu == NULL || out == NULL || pdu_len == 0 || pdu_len > SMP_MB_MAX_PDU) {
        return -EINVAL;
    }
    if (cap < pdu_len + 3) {
        return -ENOSPC;
    }
    out[0] = unit;
    memcpy(out + 1, pdu, pdu_len);
    uint16_t crc = smp_mb_crc16(out, pdu_len + 1);
    out[pdu_len + 1] = (uint8_t)(crc & 0xFF);
    out[pdu_len + 2] = (uint8_t)(crc >> 8);
    return (int)(pdu_len + 3);
}

size_t smp_mb_rtu_reply_len(const smp_mb_req_t *rq, const uint8_t head[SMP_MB_RTU_HEAD_LEN],
                            smp_mb_verdict_t *why)
{
    size_t pdu = smp_mb_reply_pdu_len(rq);
    smp_mb_verdict_t v = SMP_MB_OK;
    size_t len = 0;
    if (pdu == 0) {
        v = SMP_MB_BAD_LENGTH;
    } else if (head[0] != rq->unit) {
        v = SMP_MB_BAD_UNIT;
    } else if (head[1] == (rq->fc | 0x80u)) {
        len = SMP_MB_RTU_EXC_LEN;
    } else if (head[1] == rq->fc) {
        len = 1 + pdu + 2;
    } else {
        v = SMP_MB_BAD_FUNCTION;
    }
    if (why != NULL) {
        *why = v;
    }
    return len;
}

smp_mb_verdict_t smp_mb_rtu_check(const smp_mb_req_t *rq, const uint8_t *adu, size_t len,
                                  uint16_t *regs, uint8_t *bits, int *exception)
{
    if (adu == NULL || len < SMP_MB_RTU_EXC_LEN || len > SMP_MB_RTU_MAX_ADU) {
        return SMP_MB_BAD_LENGTH;
    }
    uint16_t crc = smp_mb_crc16(adu, len - 2);
    if (adu[len - 2] != (crc & 0xFF) || adu[len - 1] != (crc >> 8)) {
        return SMP_MB_BAD_CRC;
    }
    if (adu[0] != rq->unit) {
        return SMP_MB_BAD_UNIT;
    }
    return smp_mb_pdu_check(rq, adu + 1, len - 3, regs, bits, exception);
}
