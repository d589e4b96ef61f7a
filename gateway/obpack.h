/* Outbox packs: an interval's backlog in one compressed row (docs/store.md, "Outbox packs").
 *
 * During a broker outage every interval commit moves the interval's unacknowledged messages
 * from the ring into the database. One row per message cost ~250 bytes each, written twice
 * (WAL, then checkpoint), with a B-tree page rewritten for every few rows. A pack is one row
 * of `outbox_pack` holding all of them, deflated: the messages of one interval share their
 * JSON keys, topics and device names, which deflate's window finds.
 *
 * This module is the pack's format and the in-memory index of the packs in the database:
 * which of their members are still unacknowledged. The store's writer thread owns both.
 * Nothing here is thread-safe. */
#ifndef SMP_OBPACK_H
#define SMP_OBPACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ring.h"

/* A pack holds at most this many messages and this many bytes before compression. */
enum { SMP_OBPACK_MAX_MSGS = 4096, SMP_OBPACK_MAX_RAW = 1 << 20 };

/* Encodes and deflates recs[0..n) (ids increasing). *blob is malloc'ed; *raw_len is the size
 * before compression, which decoding needs. Returns 0 or a negative errno. */
int smp__obpack_encode(const smp_ring_rec_t *recs, size_t n, uint8_t **blob, size_t *blob_len,
                       size_t *raw_len);

/* Inflates a pack and calls cb for each message, oldest first (state SMP_RING_LIVE; strings
 * and payload point into a buffer freed when this returns). Returns the number of messages, or
 * -EBADMSG for a pack that does not decode exactly (nothing is passed on then). */
typedef void (*smp_obpack_cb)(void *arg, const smp_ring_rec_t *rec);
int smp__obpack_decode(const void *blob, size_t blob_len, size_t raw_len, smp_obpack_cb cb,
                       void *arg);

/* Members of a pack: a bitmap over ids first..last, a set bit for each unacknowledged one. */
size_t smp__obpack_members_bytes(int64_t first, int64_t last);
void smp__obpack_members_set(uint8_t *members, int64_t first, int64_t id);
bool smp__obpack_members_has(const uint8_t *members, size_t bytes, int64_t first, int64_t id);

typedef struct smp_obpack {
    int64_t first, last; /* ids of its first and last message */
    uint32_t live;       /* members not acknowledged yet */
    uint32_t blob_len;   /* bytes of its row's data */
    bool acked_some;     /* members acknowledged since its row's bitmap was written */
    uint8_t *members;    /* bitmap, smp__obpack_members_bytes(first, last) */
} smp_obpack_t;

/* The packs of the database, by first id. */
typedef struct smp_obpack_index {
    smp_obpack_t *v;
    size_t n, cap;
} smp_obpack_index_t;

/* Adds a pack (first above every pack's last); takes `members`. 0 or -ENOMEM. */
int smp__obpack_index_add(smp_obpack_index_t *x, int64_t first, int64_t last, uint32_t live,
                          uint32_t blob_len, uint8_t *members);
/* The pack whose range holds id, or NULL. */
smp_obpack_t *smp__obpack_index_find(smp_obpack_index_t *x, int64_t id);
/* Acknowledges id: true when it was an unacknowledged member (its pack's live is then one
 * less). */
bool smp__obpack_ack(smp_obpack_index_t *x, int64_t id, smp_obpack_t **pack);
/* Removes the pack at position k (0 is the oldest). */
void smp__obpack_index_remove(smp_obpack_index_t *x, size_t k);
void smp__obpack_index_free(smp_obpack_index_t *x);

#endif
