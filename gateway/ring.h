/* The outbox ring: messages staged in a file on tmpfs (docs/store.md, "The outbox ring").
 *
 * A file that outlives the process but not the power, mapped with MAP_SHARED: what is written
 * into the mapping is in the kernel's page cache at once, so a kill -9, an OOM kill or a
 * watchdog restart loses nothing, and nothing reaches the disk. Two regions: the loop appends
 * to the active one; at each commit interval the store switches regions and writes the
 * still-unacknowledged records of the retired one to SQLite, then resets it.
 *
 * A record becomes visible only when the region's end offset moves past it (one aligned 8-byte
 * store after the record was written), so a process killed in the middle of an append leaves
 * no half record. Records carry a state (live, acked) changed in place.
 *
 * Not thread-safe: the store serialises every call with its ring mutex. */
#ifndef SMP_RING_H
#define SMP_RING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct smp_ring smp_ring_t;

enum { SMP_RING_LIVE = 1, SMP_RING_ACKED = 2 };

typedef struct smp_ring_rec {
    int64_t id;
    uint64_t seq;
    int64_t ts_ms; /* when the message was staged */
    const char *device;
    const char *topic;
    const void *payload;
    size_t len;
    int state;
    int region;
} smp_ring_rec_t;

/* Opens (creating if needed) the ring file for the database `db_path` in `dir` (created 0700
 * if missing): "<dir>/outbox-<hash of db_path>.ring", locked with flock so two gateways never
 * share one. An existing file keeps its records (see smp__ring_scan). `region_bytes` applies to
 * a new file. *tmpfs tells whether the directory is on tmpfs/ramfs, *existed whether a valid
 * ring file was already there (a previous run did not stop cleanly). Returns 0 or a negative
 * errno (-EBUSY: locked by another process). */
int smp__ring_open(const char *dir, const char *db_path, size_t region_bytes, bool *tmpfs,
                   bool *existed, smp_ring_t **out);
/* Unmaps and closes; with `remove` the file is deleted first. NULL is a no-op. */
void smp__ring_close(smp_ring_t *r, bool remove);
const char *smp__ring_path(const smp_ring_t *r);

/* Calls cb for every record of `region` (0, 1, or -1 for both, active last), oldest first.
 * Strings and payload point into the mapping and stay valid until that region is reset. */
typedef void (*smp_ring_cb)(void *arg, const smp_ring_rec_t *rec);
void smp__ring_scan(smp_ring_t *r, int region, smp_ring_cb cb, void *arg);

/* Appends a live record to the active region. -ENOSPC when it does not fit. */
int smp__ring_append(smp_ring_t *r, int64_t id, const char *device, uint64_t seq, const char *topic,
                     const void *payload, size_t len, int64_t ts_ms);
/* Sets the state of record `id` if it is in the ring. Returns its previous state, or -ENOENT. */
int smp__ring_set_state(smp_ring_t *r, int64_t id, int state);

int smp__ring_active(const smp_ring_t *r);
bool smp__ring_empty(const smp_ring_t *r, int region);
/* Makes the other region active. It must be empty (reset). */
void smp__ring_switch(smp_ring_t *r);
/* Forgets every record of `region`. */
void smp__ring_reset(smp_ring_t *r, int region);
/* Bytes used by records in `region`. */
size_t smp__ring_used(const smp_ring_t *r, int region);

/* Each device's last staged seq, in the same file (it outlives a kill -9 like the records, and
 * a power cut takes it with them). A slot per device name, taken once and set at every staged
 * seq; a name longer than 65 bytes, a full table or a file of an older simpul gets -1. */
enum { SMP_RING_SEQ_SLOTS = 16384 };
int smp__ring_seq_slot(smp_ring_t *r, const char *device);
void smp__ring_seq_set(smp_ring_t *r, int slot, uint64_t seq);
typedef void (*smp_ring_seq_cb)(void *arg, const char *device, uint64_t seq);
/* Calls cb for every slot, in the order they were taken (a name may appear twice). */
void smp__ring_seq_scan(smp_ring_t *r, smp_ring_seq_cb cb, void *arg);
/* Forgets every slot (once the database holds what they said). */
void smp__ring_seq_clear(smp_ring_t *r);
/* Whether the file has the seq table (false: a file of an older simpul). */
bool smp__ring_has_seq(const smp_ring_t *r);

#endif
