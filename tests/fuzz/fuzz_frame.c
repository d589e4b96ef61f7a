/* libFuzzer: Modbus reply framing (protocols/modbus/frame.c). Whatever a device or a serial
 * server sends, the checks read no byte past the reply, and a reply they accept really is the
 * answer to the request: its length is the one the request implies, and it carries the
 * request's unit id (and, over TCP, protocol id 0). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t fcs[] = {1, 2, 3, 4, 5, 6, 16};

/* The first 4 bytes choose the request: function, unit id, count (reads, FC16) or value. */
static int pick_request(const uint8_t *d, smp_mb_req_t *rq, uint16_t *regs)
{
    rq->fc = fcs[d[0] % sizeof fcs];
    rq->unit = d[1];
    rq->address = 0;
    unsigned c = (unsigned)d[2] << 8 | d[3];
    switch (rq->fc) {
    case 1:
    case 2:
        rq->count = (uint16_t)(1 + c % 2000);
        break;
    case 3:
    case 4:
        rq->count = (uint16_t)(1 + c % 125);
        break;
    case 16:
        rq->count = (uint16_t)(1 + c % 123);
        rq->regs = regs;
        break;
    default:
        rq->value = (uint16_t)(rq->fc == 5 ? c & 1 : c);
        break;
    }
    return 0;
}

static void check_rtu(const smp_mb_req_t *rq, const uint8_t *reply, size_t n)
{
    uint8_t *adu = malloc(n ? n : 1); /* exact size: ASan sees any overread */
    memcpy(adu, reply, n);
    uint16_t regs[125];
    uint8_t bits[2000];
    int ex = 0;
    if (n >= SMP_MB_RTU_HEAD_LEN) {
        smp_mb_verdict_t why;
        size_t want = smp_mb_rtu_reply_len(rq, adu, &why);
        if ((want == 0) == (why == SMP_MB_OK) || want > SMP_MB_RTU_MAX_ADU) {
            abort();
        }
    }
    smp_mb_verdict_t v = smp_mb_rtu_check(rq, adu, n, regs, bits, &ex);
    if (v == SMP_MB_OK || v == SMP_MB_EXCEPTION) {
        smp_mb_verdict_t why;
        size_t want = smp_mb_rtu_reply_len(rq, adu, &why);
        if (adu[0] != rq->unit || want != n || (v == SMP_MB_EXCEPTION && (ex < 1 || ex > 255))) {
            abort();
        }
    }
    free(adu);
}

static void check_mbap(const smp_mb_req_t *rq, const uint8_t *reply, size_t n)
{
    if (n < SMP_MB_MBAP_HDR) {
        return;
    }
    uint8_t *adu = malloc(n);
    memcpy(adu, reply, n);
    uint16_t tid;
    uint8_t unit;
    size_t pdu_len;
    smp_mb_verdict_t v = smp_mb_mbap_header(adu, &tid, &unit, &pdu_len);
    if (v == SMP_MB_OK) {
        if (adu[2] != 0 || adu[3] != 0 || pdu_len < 1 || pdu_len > SMP_MB_MAX_PDU) {
            abort();
        }
        if (SMP_MB_MBAP_HDR + pdu_len <= n) {
            uint16_t regs[125];
            uint8_t bits[2000];
            int ex = 0;
            v = smp_mb_pdu_check(rq, adu + SMP_MB_MBAP_HDR, pdu_len, regs, bits, &ex);
            if (v == SMP_MB_OK && pdu_len != smp_mb_reply_pdu_len(rq)) {
                abort();
            }
        }
    }
    free(adu);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4) {
        return 0;
    }
    smp_mb_req_t rq = {0};
    uint16_t regs[125] = {0};
    pick_request(data, &rq, regs);
    uint8_t pdu[SMP_MB_MAX_PDU];
    if (smp_mb_pdu_encode(&rq, pdu, sizeof pdu) < 0) {
        abort(); /* every request picked above is valid */
    }
    check_rtu(&rq, data + 4, size - 4);
    check_mbap(&rq, data + 4, size - 4);
    return 0;
}
