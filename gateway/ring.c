/* The outbox ring: see ring.h. */
#include "ring.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#define RING_MAGIC   "SMPRING1"
#define REC_MAGIC    0x52454331u /* "REC1" */
#define HDR_BYTES    4096u
#define TMPFS_MAGIC_ 0x01021994
#define RAMFS_MAGIC_ 0x858458f6

/* The file header. Offsets are fixed: the file outlives the process that wrote it. */
struct file_hdr {
    char magic[8];
    uint32_t version;
    uint32_t active;
    uint64_t region_bytes;
    uint64_t end[2]; /* bytes of records in each region; moved only after a record is complete */
    uint64_t seq_n;  /* version 2: seq slots in use (moved only after a slot is complete) */
};

/* Version 2 adds, after the two regions, a table of each device's last staged seq: what a
 * kill -9 must resume from exactly, kept here so the database needs it only at a clean stop
 * and when a device's seq reservation moves (docs/store.md, "seq"). A version 1 file (older
 * simpul) has no table: its seqs were committed at every interval, and this run writes them
 * the same way (smp__ring_seq_slot returns -1). */
#define SEQ_MAGIC 0x51455331u /* "SEQ1" */
struct seq_slot {
    uint64_t seq;
    uint32_t magic; /* stored last when the slot is taken */
    uint16_t len;
    char name[66]; /* NUL-terminated */
};
_Static_assert(sizeof(struct seq_slot) == 80, "seq slot layout");

struct rec_hdr {
    uint32_t magic;
    uint32_t state;
    uint32_t total; /* header + strings + payload, padded to 8 */
    uint16_t dev_len, topic_len;
    int64_t id;
    uint64_t seq;
    int64_t ts_ms;
    uint32_t pay_len;
    uint32_t pad;
};

struct idx {
    int64_t id;
    uint32_t off;
};

struct smp_ring {
    int fd;
    char *path;
    unsigned char *map;
    size_t map_len;
    struct file_hdr *hdr;
    uint64_t region_bytes;
    struct idx *ix[2]; /* records of each region, in id order */
    size_t ix_n[2], ix_cap[2];
    struct seq_slot *seq; /* NULL: a version 1 file */
};

static size_t seq_bytes(void)
{
    return (size_t)SMP_RING_SEQ_SLOTS * sizeof(struct seq_slot);
}

static unsigned char *region_base(const smp_ring_t *r, int k)
{
    return r->map + HDR_BYTES + (size_t)k * r->region_bytes;
}

static uint64_t fnv64(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s != '\0'; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    }
    return h;
}

static int ix_push(smp_ring_t *r, int k, int64_t id, uint32_t off)
{
    if (r->ix_n[k] == r->ix_cap[k]) {
        size_t cap = r->ix_cap[k] ? r->ix_cap[k] * 2 : 256;
        struct idx *p = realloc(r->ix[k], cap * sizeof *p);
        if (p == NULL) {
            return -ENOMEM;
        }
        r->ix[k] = p;
        r->ix_cap[k] = cap;
    }
    r->ix[k][r->ix_n[k]++] = (struct idx){id, off};
    return 0;
}

/* Validates the record at `off` of region k; returns it or NULL (the rest is ignored). */
static struct rec_hdr *rec_at(const smp_ring_t *r, int k, uint64_t off, uint64_t end)
{
    if (off + sizeof(struct rec_hdr) > end || off % 8 != 0) {
        return NULL;
    }
    struct rec_hdr *h = (struct rec_hdr *)(region_base(r, k) + off);
    uint64_t need = sizeof *h + (uint64_t)h->dev_len + 1 + h->topic_len + 1 + h->pay_len;
    if (h->magic != REC_MAGIC || h->total < need || off + h->total > end || h->total % 8 != 0) {
        return NULL;
    }
    const char *dev = (const char *)(h + 1);
    if (dev[h->dev_len] != '\0' || dev[h->dev_len + 1 + h->topic_len] != '\0') {
        return NULL;
    }
    return h;
}

/* Rebuilds the index of region k from the file; truncates the region at the first bad record. */
static int index_region(smp_ring_t *r, int k)
{
    uint64_t end = r->hdr->end[k];
    if (end > r->region_bytes) {
        end = 0;
    }
    uint64_t off = 0;
    while (off < end) {
        struct rec_hdr *h = rec_at(r, k, off, end);
        if (h == NULL) {
            break;
        }
        int rc = ix_push(r, k, h->id, (uint32_t)off);
        if (rc != 0) {
            return rc;
        }
        off += h->total;
    }
    r->hdr->end[k] = off;
    return 0;
}

static int map_file(smp_ring_t *r, size_t region_bytes, bool *existed)
{
    uint32_t version = 2;
    struct stat sb;
    if (fstat(r->fd, &sb) != 0) {
        return -errno;
    }
    bool fresh = (size_t)sb.st_size < HDR_BYTES;
    if (!fresh) {
        struct file_hdr h;
        if (pread(r->fd, &h, sizeof h, 0) != (ssize_t)sizeof h) {
            return -EIO;
        }
        fresh = memcmp(h.magic, RING_MAGIC, 8) != 0 || (h.version != 1 && h.version != 2) ||
                h.region_bytes < 4096 || h.region_bytes > (1ull << 30) || h.region_bytes % 8 != 0 ||
                (uint64_t)sb.st_size <
                    HDR_BYTES + 2 * h.region_bytes + (h.version == 2 ? seq_bytes() : 0);
        if (!fresh) {
            region_bytes = (size_t)h.region_bytes;
            version = h.version;
        }
    }
    *existed = !fresh;
    size_t len = HDR_BYTES + 2 * region_bytes + (version == 2 ? seq_bytes() : 0);
    if (fresh && ftruncate(r->fd, 0) != 0) {
        return -errno;
    }
    if (fresh && ftruncate(r->fd, (off_t)len) != 0) {
        return -errno;
    }
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (m == MAP_FAILED) {
        return -errno;
    }
    r->map = m;
    r->map_len = len;
    r->hdr = m;
    r->region_bytes = region_bytes;
    if (fresh) {
        memset(r->hdr, 0, sizeof *r->hdr);
        r->hdr->version = 2;
        r->hdr->region_bytes = region_bytes;
        memcpy(r->hdr->magic, RING_MAGIC, 8);
    }
    r->hdr->active &= 1u;
    if (version == 2) {
        r->seq = (struct seq_slot *)(r->map + HDR_BYTES + 2 * region_bytes);
        if (r->hdr->seq_n > SMP_RING_SEQ_SLOTS) {
            r->hdr->seq_n = SMP_RING_SEQ_SLOTS;
        }
    }
    return 0;
}

int smp__ring_open(const char *dir, const char *db_path, size_t region_bytes, bool *tmpfs,
                   bool *existed, smp_ring_t **out)
{
    *out = NULL;
    *existed = false;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        return -errno;
    }
    struct statfs fs;
    *tmpfs = statfs(dir, &fs) == 0 &&
             ((unsigned long)fs.f_type == TMPFS_MAGIC_ || (unsigned long)fs.f_type == RAMFS_MAGIC_);
    smp_ring_t *r = calloc(1, sizeof *r);
    if (r == NULL) {
        return -ENOMEM;
    }
    r->fd = -1;
    size_t n = strlen(dir) + 48;
    r->path = malloc(n);
    if (r->path == NULL) {
        free(r);
        return -ENOMEM;
    }
    /* One ring per database: gateways sharing a runtime directory never meet. */
    snprintf(r->path, n, "%s/outbox-%016" PRIx64 ".ring", dir, fnv64(db_path));
    int rc = 0;
    r->fd = open(r->path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (r->fd < 0) {
        rc = -errno;
    } else if (flock(r->fd, LOCK_EX | LOCK_NB) != 0) {
        rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
    } else {
        rc = map_file(r, (region_bytes + 7) & ~(size_t)7, existed);
    }
    for (int k = 0; k < 2 && rc == 0; k++) {
        rc = index_region(r, k);
    }
    if (rc != 0) {
        smp__ring_close(r, false);
        return rc;
    }
    *out = r;
    return 0;
}

void smp__ring_close(smp_ring_t *r, bool remove)
{
    if (r == NULL) {
        return;
    }
    if (remove && r->path != NULL) {
        unlink(r->path);
    }
    if (r->map != NULL) {
        munmap(r->map, r->map_len);
    }
    if (r->fd >= 0) {
        close(r->fd);
    }
    free(r->ix[0]);
    free(r->ix[1]);
    free(r->path);
    free(r);
}

const char *smp__ring_path(const smp_ring_t *r)
{
    return r->path;
}

static void to_rec(const smp_ring_t *r, int k, uint32_t off, smp_ring_rec_t *out)
{
    const struct rec_hdr *h = (const struct rec_hdr *)(region_base(r, k) + off);
    const char *dev = (const char *)(h + 1);
    *out = (smp_ring_rec_t){
        .id = h->id,
        .seq = h->seq,
        .ts_ms = h->ts_ms,
        .device = dev,
        .topic = dev + h->dev_len + 1,
        .payload = dev + h->dev_len + 1 + h->topic_len + 1,
        .len = h->pay_len,
        .state = (int)h->state,
        .region = k,
    };
}

void smp__ring_scan(smp_ring_t *r, int region, smp_ring_cb cb, void *arg)
{
    int active = (int)r->hdr->active;
    int order[2] = {1 - active, active};
    for (int j = 0; j < 2; j++) {
        int k = order[j];
        if (region >= 0 && k != region) {
            continue;
        }
        for (size_t i = 0; i < r->ix_n[k]; i++) {
            smp_ring_rec_t rec;
            to_rec(r, k, r->ix[k][i].off, &rec);
            cb(arg, &rec);
        }
    }
}

int smp__ring_append(smp_ring_t *r, int64_t id, const char *device, uint64_t seq, const char *topic,
                     const void *payload, size_t len, int64_t ts_ms)
{
    int k = (int)r->hdr->active;
    size_t dl = strlen(device), tl = strlen(topic);
    if (dl > UINT16_MAX || tl > UINT16_MAX || len > UINT32_MAX) {
        return -EMSGSIZE;
    }
    uint64_t total = (sizeof(struct rec_hdr) + dl + 1 + tl + 1 + len + 7) & ~(uint64_t)7;
    uint64_t off = r->hdr->end[k];
    if (off + total > r->region_bytes) {
        return -ENOSPC;
    }
    int rc = ix_push(r, k, id, (uint32_t)off);
    if (rc != 0) {
        return rc;
    }
    struct rec_hdr *h = (struct rec_hdr *)(region_base(r, k) + off);
    *h = (struct rec_hdr){
        .magic = REC_MAGIC,
        .state = SMP_RING_LIVE,
        .total = (uint32_t)total,
        .dev_len = (uint16_t)dl,
        .topic_len = (uint16_t)tl,
        .id = id,
        .seq = seq,
        .ts_ms = ts_ms,
        .pay_len = (uint32_t)len,
    };
    char *p = (char *)(h + 1);
    memcpy(p, device, dl + 1);
    memcpy(p + dl + 1, topic, tl + 1);
    if (len > 0) {
        memcpy(p + dl + 1 + tl + 1, payload, len);
    }
    /* Published last: a process killed before this store leaves the record invisible. */
    __atomic_store_n(&r->hdr->end[k], off + total, __ATOMIC_RELEASE);
    return 0;
}

static struct idx *find(smp_ring_t *r, int k, int64_t id)
{
    size_t lo = 0, hi = r->ix_n[k];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->ix[k][mid].id < id) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < r->ix_n[k] && r->ix[k][lo].id == id ? &r->ix[k][lo] : NULL;
}

int smp__ring_set_state(smp_ring_t *r, int64_t id, int state)
{
    for (int k = 0; k < 2; k++) {
        struct idx *x = find(r, k, id);
        if (x != NULL) {
            struct rec_hdr *h = (struct rec_hdr *)(region_base(r, k) + x->off);
            int old = (int)h->state;
            h->state = (uint32_t)state;
            return old;
        }
    }
    return -ENOENT;
}

int smp__ring_active(const smp_ring_t *r)
{
    return (int)r->hdr->active;
}

bool smp__ring_empty(const smp_ring_t *r, int region)
{
    return r->ix_n[region] == 0;
}

void smp__ring_switch(smp_ring_t *r)
{
    r->hdr->active = 1u - r->hdr->active;
}

void smp__ring_reset(smp_ring_t *r, int region)
{
    __atomic_store_n(&r->hdr->end[region], 0, __ATOMIC_RELEASE);
    r->ix_n[region] = 0;
    /* Shrink a region index that a burst grew: the steady state needs little. */
    if (r->ix_cap[region] > 4096) {
        free(r->ix[region]);
        r->ix[region] = NULL;
        r->ix_cap[region] = 0;
    }
}

size_t smp__ring_used(const smp_ring_t *r, int region)
{
    return (size_t)r->hdr->end[region];
}

int smp__ring_seq_slot(smp_ring_t *r, const char *device)
{
    size_t len = strlen(device);
    uint64_t n = r->hdr->seq_n;
    if (r->seq == NULL || n >= SMP_RING_SEQ_SLOTS || len >= sizeof r->seq[0].name) {
        return -1;
    }
    struct seq_slot *s = &r->seq[n];
    s->seq = 0;
    s->len = (uint16_t)len;
    memcpy(s->name, device, len + 1);
    __atomic_store_n(&s->magic, SEQ_MAGIC, __ATOMIC_RELEASE);
    __atomic_store_n(&r->hdr->seq_n, n + 1, __ATOMIC_RELEASE);
    return (int)n;
}

void smp__ring_seq_set(smp_ring_t *r, int slot, uint64_t seq)
{
    if (r->seq != NULL && slot >= 0 && (uint64_t)slot < r->hdr->seq_n) {
        __atomic_store_n(&r->seq[slot].seq, seq, __ATOMIC_RELEASE);
    }
}

void smp__ring_seq_scan(smp_ring_t *r, smp_ring_seq_cb cb, void *arg)
{
    for (uint64_t i = 0; r->seq != NULL && i < r->hdr->seq_n; i++) {
        const struct seq_slot *s = &r->seq[i];
        if (s->magic == SEQ_MAGIC && s->len < sizeof s->name && s->name[s->len] == '\0' &&
            strlen(s->name) == s->len) {
            cb(arg, s->name, s->seq);
        }
    }
}

void smp__ring_seq_clear(smp_ring_t *r)
{
    if (r->seq != NULL) {
        __atomic_store_n(&r->hdr->seq_n, 0, __ATOMIC_RELEASE);
    }
}

bool smp__ring_has_seq(const smp_ring_t *r)
{
    return r->seq != NULL;
}
