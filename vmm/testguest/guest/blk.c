/* virtio-blk driver: synchronous requests for tests, a queue-depth benchmark, and a
   "misbehave" suite that feeds the device malformed requests. Everything is polled. */
#include "kt.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_F_SIZE_MAX (1u << 1)
#define BLK_F_SEG_MAX (1u << 2)
#define BLK_F_RO (1u << 5)
#define BLK_F_FLUSH (1u << 9)
#define RING_F_EVENT_IDX (1u << 29)

struct blk_hdr { u32 type, reserved; u64 sector; };
struct blk {
    struct vdev *v;
    struct virtq q;
    u64 cap; /* sectors */
    u32 size_max;
    int has_flush;
};

int nblk;
static struct blk blks[MAX_BLK];
static u8 qmem[MAX_BLK][VQ_MEM_SIZE] __attribute__((aligned(4096), section(".noinit")));
static struct blk_hdr hdrs[MAX_BLK][VQ_MAX];
static u8 stat[MAX_BLK][VQ_MAX];
#define IOBUF_SIZE (1UL * MIB)
static u8 iobuf[IOBUF_SIZE] __attribute__((aligned(4096), section(".noinit")));
#define BENCHBUF_SIZE (8UL * MIB)
static u8 benchbuf[BENCHBUF_SIZE] __attribute__((aligned(4096), section(".noinit")));
static u16 slot_of[VQ_MAX];

static const u64 SYNC_TIMEOUT_MS = 30000;
u64 blk_idle_us = 150;

static int blk_setup(struct blk *b, int idx) {
    u32 feats = BLK_F_SIZE_MAX | BLK_F_SEG_MAX | BLK_F_RO | BLK_F_FLUSH | RING_F_EVENT_IDX;
    if (vdev_init(b->v, feats)) return -1;
    mmio_write32(b->v->base + VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    u32 dev_feats;
    mmio_write32(b->v->base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    dev_feats = mmio_read32(b->v->base + VIRTIO_MMIO_DEVICE_FEATURES);
    u64 cfg = b->v->base + VIRTIO_MMIO_CONFIG;
    b->cap = (u64)mmio_read32(cfg) | ((u64)mmio_read32(cfg + 4) << 32);
    b->size_max = (dev_feats & BLK_F_SIZE_MAX) ? mmio_read32(cfg + 8) : 0;
    b->has_flush = !!(dev_feats & BLK_F_FLUSH);
    if (vq_setup(b->v, &b->q, 0, qmem[idx], VQ_MAX)) return -1;
    b->q.event_idx = !!(dev_feats & RING_F_EVENT_IDX);
    /* Polling driver: no interrupts until the bench asks for one before idling. */
    if (b->q.event_idx) vq_set_used_event(&b->q, 0xffff);
    vdev_driver_ok(b->v);
    return 0;
}

void blk_probe(struct vdev *d) {
    if (nblk == MAX_BLK) return;
    struct blk *b = &blks[nblk];
    b->v = d;
    if (blk_setup(b, nblk)) return;
    kprintf("kt: virtio-blk %u at 0x%x: %u sectors, queue %u\n", (u64)nblk, d->base, b->cap, (u64)b->q.size);
    nblk++;
}

u64 blk_capacity(int i) { return i >= 0 && i < nblk ? blks[i].cap : 0; }

static int disk_ok(int disk) { return disk >= 0 && disk < nblk && blks[disk].v->ok; }

/* Builds header / data / status descriptors for one request and publishes it. Returns the head. */
static int submit(int disk, u32 type, u64 sector, void *buf, u32 len) {
    struct blk *b = &blks[disk];
    struct virtq *q = &b->q;
    if (q->num_free < 3) return -1;
    int h = vq_alloc(q), s;
    int dd = len ? vq_alloc(q) : -1;
    s = vq_alloc(q);
    hdrs[disk][h].type = type;
    hdrs[disk][h].reserved = 0;
    hdrs[disk][h].sector = sector;
    stat[disk][h] = 0xff;
    q->desc[h].addr = (u64)&hdrs[disk][h];
    q->desc[h].len = sizeof(struct blk_hdr);
    q->desc[h].flags = VRING_DESC_F_NEXT;
    q->desc[h].next = (u16)(dd >= 0 ? dd : s);
    if (dd >= 0) {
        q->desc[dd].addr = (u64)buf;
        q->desc[dd].len = len;
        q->desc[dd].flags = VRING_DESC_F_NEXT | (type == BLK_T_IN ? VRING_DESC_F_WRITE : 0);
        q->desc[dd].next = (u16)s;
    }
    q->desc[s].addr = (u64)&stat[disk][h];
    q->desc[s].len = 1;
    q->desc[s].flags = VRING_DESC_F_WRITE;
    q->desc[s].next = 0;
    vq_push(q, (u16)h);
    return h;
}

/* Waits for the one request in flight. Returns its status, or -1 on timeout. */
static int wait_one(int disk, u64 timeout_ms) {
    struct blk *b = &blks[disk];
    u64 t0 = rdtsc(), limit = timeout_ms * kt_tsc_per_ms;
    u32 id, len;
    for (;;) {
        if (vq_pop(&b->q, &id, &len)) {
            if (id >= b->q.size) return -1;
            int st = stat[disk][id];
            vq_free_chain(&b->q, (u16)id);
            return st;
        }
        if (rdtsc() - t0 > limit) {
            kprintf("kt: virtio-blk %u: request timed out (avail %u, used %u, device status 0x%x)\n", (u64)disk,
                    (u64)b->q.avail_shadow, (u64)*(volatile u16 *)&b->q.used->idx, (u64)vdev_status(b->v));
            return -1;
        }
        cpu_relax();
    }
}

int blk_rw(int disk, int write, u64 sector, void *buf, u32 len) {
    if (!disk_ok(disk)) return -1;
    if (kt_debug) kprintf("kt: blk %u %s sector %u len %u\n", (u64)disk, write ? "write" : "read", sector, (u64)len);
    int h = submit(disk, write ? BLK_T_OUT : BLK_T_IN, sector, buf, len);
    if (h < 0) return -1;
    if (kt_debug) kprintf("kt: submitted head %u\n", (u64)h);
    vq_notify(blks[disk].v, &blks[disk].q, 0);
    if (kt_debug) kprintf("kt: notified\n");
    int st = wait_one(disk, SYNC_TIMEOUT_MS);
    if (kt_debug) kprintf("kt: status %u\n", (u64)(i64)st);
    return st;
}

int blk_flush(int disk) {
    if (!disk_ok(disk)) return -1;
    int h = submit(disk, BLK_T_FLUSH, 0, NULL, 0);
    if (h < 0) return -1;
    vq_notify(blks[disk].v, &blks[disk].q, 0);
    return wait_one(disk, SYNC_TIMEOUT_MS);
}

static u32 chunk_bytes(int disk) {
    u32 c = IOBUF_SIZE;
    if (blks[disk].size_max && blks[disk].size_max < c) c = blks[disk].size_max & ~511u;
    return c ? c : 512;
}

static int range_ok(int disk, u64 sector, u64 count) {
    return disk_ok(disk) && sector + count >= sector && sector + count <= blks[disk].cap;
}

int blk_write_pattern(int disk, u64 sector, u64 count, u64 seed) {
    if (!range_ok(disk, sector, count)) return -1;
    u64 per = chunk_bytes(disk) / 512;
    while (count) {
        u64 n = count < per ? count : per;
        u64 *w = (u64 *)iobuf, base = sector * 64; /* 64 words per sector */
        for (u64 i = 0; i < n * 64; i++) w[i] = pattern_word(seed, base + i);
        int st = blk_rw(disk, 1, sector, iobuf, (u32)(n * 512));
        if (st) return st;
        sector += n;
        count -= n;
    }
    return 0;
}

int blk_check_pattern(int disk, u64 sector, u64 count, u64 seed, u64 *bad) {
    if (!range_ok(disk, sector, count)) return -1;
    u64 per = chunk_bytes(disk) / 512;
    while (count) {
        u64 n = count < per ? count : per;
        int st = blk_rw(disk, 0, sector, iobuf, (u32)(n * 512));
        if (st) return st;
        u64 *w = (u64 *)iobuf, base = sector * 64;
        for (u64 i = 0; i < n * 64; i++)
            if (w[i] != pattern_word(seed, base + i)) {
                *bad = sector + i / 64;
                return 1000;
            }
        sector += n;
        count -= n;
    }
    return 0;
}

int blk_hash(int disk, u64 sector, u64 count, u64 *out) {
    if (!range_ok(disk, sector, count)) return -1;
    u64 per = chunk_bytes(disk) / 512, h = KT_HASH_INIT, total = count * 512;
    while (count) {
        u64 n = count < per ? count : per;
        int st = blk_rw(disk, 0, sector, iobuf, (u32)(n * 512));
        if (st) return st;
        h = kt_hash_words(h, (const u64 *)iobuf, n * 64);
        sector += n;
        count -= n;
    }
    *out = kt_hash_finish(h, total);
    return 0;
}

void blk_selftest(int disk) {
    if (!disk_ok(disk)) {
        kprintf("kt: blktest FAILED: no disk %u\n", (u64)disk);
        return;
    }
    u64 n = blks[disk].cap < 16384 ? blks[disk].cap : 16384; /* up to 8 MiB */
    u64 bad = 0, h = 0;
    int st = blk_write_pattern(disk, 0, n, 42);
    if (!st && blks[disk].has_flush) st = blk_flush(disk);
    if (!st) st = blk_check_pattern(disk, 0, n, 42, &bad);
    if (!st) st = blk_hash(disk, 0, n, &h);
    if (st) kprintf("kt: blktest FAILED status=%u bad_sector=%u\n", (u64)st, bad);
    else kprintf("kt: blktest ok sectors=%u hash=0x%x\n", n, h);
}

void blk_bench(int disk, int random, u32 bs, u32 qd, u64 n, u64 span, int write) {
    if (!disk_ok(disk)) {
        kprintf("kt: bench FAILED: no disk %u\n", (u64)disk);
        return;
    }
    struct blk *b = &blks[disk];
    if (!span || span > b->cap) span = b->cap;
    if (!bs || bs % 512 || (u64)bs * qd > BENCHBUF_SIZE || !qd || qd * 3 > b->q.size || span < bs / 512 ||
        (b->size_max && bs > b->size_max)) {
        kprintf("kt: bench FAILED: bad parameters bs=%u qd=%u\n", (u64)bs, (u64)qd);
        return;
    }
    u64 nblocks = span * 512 / bs, rng = 0x2545F4914F6CDD1DUL, next = 0;
    u64 issued = 0, done = 0, errors = 0, idles = 0;
    /* While the disk works on a burst the vCPU sleeps on the idle port instead of spinning: a
       spinning vCPU thread is runnable all the time, and a loaded host then runs it (and the
       device thread) late. It sleeps until blk_idle_us before the completion it expects (a low
       estimate of the waits it saw while spinning), then spins, so it sees the completion at
       once; an early completion wakes it through used_event (EVENT_IDX). Waits shorter than
       that are spun through. */
    int can_idle = b->q.event_idx && blk_idle_us && inb(IDLE_PORT) == IDLE_PORT_SIG;
    u64 per_us = kt_tsc_per_ms / 1000 ? kt_tsc_per_ms / 1000 : 1;
    u64 margin = blk_idle_us * per_us, expect = 0;
    int overslept = 0;
    kprintf("kt: bench start\n");
    u64 t0 = rdtsc(), last_progress = t0;
    for (u32 i = 0; i < qd && issued < n; i++, issued++) {
        u64 blk;
        if (random) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            blk = rng % nblocks;
        } else blk = next++ % nblocks;
        int h = submit(disk, write ? BLK_T_OUT : BLK_T_IN, blk * (bs / 512), benchbuf + (u64)i * bs, bs);
        slot_of[h] = (u16)i;
    }
    vq_notify(b->v, &b->q, 0);
    while (done < n) {
        u32 id, len, got = 0;
        while (vq_pop(&b->q, &id, &len)) {
            if (id >= b->q.size) {
                errors++;
                continue;
            }
            if (stat[disk][id]) errors++;
            u16 slot = slot_of[id];
            vq_free_chain(&b->q, (u16)id);
            done++;
            got++;
            if (issued < n) {
                u64 blk;
                if (random) {
                    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
                    blk = rng % nblocks;
                } else blk = next++ % nblocks;
                int h = submit(disk, write ? BLK_T_OUT : BLK_T_IN, blk * (bs / 512), benchbuf + (u64)slot * bs, bs);
                slot_of[h] = slot;
                issued++;
            }
        }
        u64 now = rdtsc();
        if (got) {
            u64 waited = now - last_progress;
            /* A low estimate (down at once, up slowly): a wait stretched by the host
               preempting this vCPU must not teach it to sleep longer. */
            if (overslept) expect -= expect / 16;
            else if (waited > margin) expect = waited < expect ? waited : expect + (waited - expect) / 32;
            overslept = 0;
            vq_notify(b->v, &b->q, 0);
            last_progress = now;
        } else if (now - last_progress > SYNC_TIMEOUT_MS * kt_tsc_per_ms) {
            kprintf("kt: bench FAILED: stalled after %u requests\n", done);
            return;
        } else if (can_idle && expect > now - last_progress + margin + 20 * per_us) {
            u64 us = (expect - (now - last_progress) - margin) / per_us;
            vq_set_used_event(&b->q, b->q.last_used);
            mb();
            if (*(volatile u16 *)&b->q.used->idx == b->q.last_used) {
                outl(IDLE_PORT, (u32)us);
                idles++;
                /* Completions waiting already: we slept too long (or were woken for them). */
                if (*(volatile u16 *)&b->q.used->idx != b->q.last_used) overslept = 1;
            }
        } else cpu_relax();
    }
    u64 cycles = rdtsc() - t0;
    kprintf("kt: bench done {\"pattern\":\"%s\",\"write\":%u,\"bs\":%u,\"qd\":%u,\"requests\":%u,\"errors\":%u,"
            "\"tsc_cycles\":%u,\"tsc_khz\":%u,\"idles\":%u,\"expect_us\":%u}\n",
            random ? "rand" : "seq", (u64)write, (u64)bs, (u64)qd, done, errors, cycles, kt_tsc_per_ms, idles,
            expect / per_us);
}

/* ---- misbehave: malformed requests; the device must answer, or need a reset, never wedge ---- */

static u64 bad_addr(void) { return ram_end_total + (1UL << 30); }

/* Resets the device and sets it up again. */
static int reinit(int disk) { return blk_setup(&blks[disk], disk); }

/* Valid write + read-back of 8 sectors on the (scratch) disk. */
static int alive(int disk) {
    u64 bad;
    if (blk_write_pattern(disk, 0, 8, 7)) return 0;
    return blk_check_pattern(disk, 0, 8, 7, &bad) == 0;
}

static void forget_inflight(struct virtq *q) {
    for (u32 i = 0; i < q->size; i++) q->desc[i].next = (u16)(i + 1), q->desc[i].flags = 0;
    q->free_head = 0;
    q->num_free = q->size;
}

#define NCASES 20
static const char *case_names[NCASES] = {
    "data-out-of-ram", "hdr-out-of-ram", "status-out-of-ram", "looping-chain", "oversize-request",
    "sector-past-end", "sector-overflow", "read-into-readonly-buffer", "write-from-writeonly-buffer",
    "no-status-descriptor", "short-header", "readonly-status", "unknown-type", "head-index-out-of-range",
    "avail-idx-jump", "indirect-not-negotiated", "next-out-of-range", "zero-length-data", "unaligned-length",
    "garbage-table",
};

/* Publishes one malformed request for case `c`. Returns the number of heads published. */
static int publish_case(int disk, int c) {
    struct blk *b = &blks[disk];
    struct virtq *q = &b->q;
    u8 *buf = iobuf;
    int h;
    switch (c) {
    case 0: h = submit(disk, BLK_T_IN, 0, (void *)bad_addr(), 4096); break;
    case 1: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[h].addr = bad_addr(); break;
    case 2: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[q->desc[q->desc[h].next].next].addr = bad_addr(); break;
    case 3: h = submit(disk, BLK_T_IN, 0, buf, 4096); {
            u16 d = q->desc[h].next; /* data -> back to head: a cycle with no end */
            q->desc[d].next = (u16)h;
        }
        break;
    case 4: h = submit(disk, BLK_T_IN, 0, (void *)ARENA_START, 0xfffff000u); break;
    case 5: h = submit(disk, BLK_T_IN, b->cap, buf, 4096); break;
    case 6: h = submit(disk, BLK_T_IN, ~0UL - 3, buf, 4096); break;
    case 7: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[q->desc[h].next].flags &= ~VRING_DESC_F_WRITE; break;
    case 8: h = submit(disk, BLK_T_OUT, 0, buf, 4096); q->desc[q->desc[h].next].flags |= VRING_DESC_F_WRITE; break;
    case 9: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[q->desc[h].next].flags = VRING_DESC_F_WRITE; break;
    case 10: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[h].len = 8; break;
    case 11: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[q->desc[q->desc[h].next].next].flags = 0; break;
    case 12: h = submit(disk, 0x55, 0, buf, 4096); break;
    case 13:
        q->avail->ring[q->avail_shadow % q->size] = 0xfff0;
        q->avail_shadow++;
        *(volatile u16 *)&q->avail->idx = q->avail_shadow;
        return 1;
    case 14:
        q->avail_shadow += q->size + 5;
        *(volatile u16 *)&q->avail->idx = q->avail_shadow;
        return 1;
    case 15: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[h].flags |= VRING_DESC_F_INDIRECT; break;
    case 16: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[q->desc[h].next].next = 0x7fff; break;
    case 17: h = submit(disk, BLK_T_IN, 0, buf, 4096); q->desc[q->desc[h].next].len = 0; break;
    case 18: h = submit(disk, BLK_T_IN, 0, buf, 1000); break;
    default: { /* random bytes over the whole descriptor table, then eight random heads */
        u64 r = 0x9E3779B97F4A7C15UL;
        u64 *w = (u64 *)q->desc;
        for (u32 i = 0; i < q->size * 2; i++) w[i] = r = splitmix64(r);
        for (int i = 0; i < 8; i++) {
            q->avail->ring[q->avail_shadow % q->size] = (u16)(splitmix64(r + i) % q->size);
            q->avail_shadow++;
        }
        *(volatile u16 *)&q->avail->idx = q->avail_shadow;
        return 8;
    }
    }
    return h >= 0 ? 1 : 0;
}

void blk_misbehave(int disk) {
    if (!disk_ok(disk)) {
        kprintf("kt: misbehave FAILED: no disk %u\n", (u64)disk);
        return;
    }
    int passed = 0;
    if (!alive(disk)) kprintf("kt: misbehave: disk not working before the first case\n");
    for (int c = 0; c < NCASES; c++) {
        struct blk *b = &blks[disk];
        int heads = publish_case(disk, c);
        vq_notify(b->v, &b->q, 0);
        /* Collect replies for up to 300 ms: a device rejecting garbage does so at once. */
        u64 t0 = rdtsc(), limit = 300 * kt_tsc_per_ms;
        int replies = 0, first_status = -1;
        u32 id, len;
        while (replies < heads && rdtsc() - t0 < limit) {
            if (vq_pop(&b->q, &id, &len)) {
                if (replies++ == 0 && id < b->q.size) first_status = stat[disk][id];
            } else cpu_relax();
        }
        u32 dstatus = vdev_status(b->v);
        int needs_reset = !!(dstatus & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED));
        int reset = 0, ok;
        if (replies == heads && !needs_reset) {
            /* The device answered without wedging: it must keep serving the same queue. */
            forget_inflight(&b->q);
            ok = alive(disk);
        } else {
            ok = 0;
        }
        if (!ok) {
            reset = 1;
            ok = reinit(disk) == 0 && alive(disk);
        }
        if (ok) passed++;
        kprintf("kt: misbehave %s: replies=%u/%u status=%s%u%s%s -> %s\n", case_names[c], (u64)replies, (u64)heads,
                first_status < 0 ? "none:" : "", (u64)(first_status < 0 ? 0 : first_status),
                needs_reset ? " needs-reset" : "", reset ? " reset" : "", ok ? "recovered" : "FAILED");
    }
    kprintf("kt: misbehave done passed=%u failed=%u\n", (u64)passed, (u64)(NCASES - passed));
}
