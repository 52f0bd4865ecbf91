/* kiln test guest: shared declarations. Freestanding, integer-only code (PVM cannot emulate
   cmpxchg16b, xrstor, int3: no SSE/AVX state, no atomics wider than 8 bytes, no breakpoints). */
#ifndef KT_H
#define KT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long usize;
#define NULL ((void *)0)

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL
/* Everything from here up is free RAM for FILL/TOUCH; the image, stack, page tables and DMA
   buffers all live below it (checked at boot against __image_end). */
#define ARENA_START (16UL * MIB)

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline u64 mmio_read64(u64 addr) { return *(volatile u64 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
/* Full fence: orders our ring stores before the loads that decide whether to notify. */
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* kiln's paravirtual idle port (vmm/src/devices/idle.rs): a 4-byte write of the longest sleep
   in microseconds (0 = the VMM's default, ~10 ms) parks the vCPU until a device has news; a
   1-byte read returns IDLE_PORT_SIG when the port exists. */
#define IDLE_PORT 0x500
#define IDLE_PORT_SIG 0x4b
/* kiln's generation-id page (vmm/src/devices/genid.rs). */
#define GENID_BASE 0xcffff000UL
#define GENID_MAGIC 0x4e45474bU
#define GENID_GENERATION 0x08
#define GENID_ID 0x10
#define GENID_HOST_TIME_NS 0x20
#define GENID_RANDOM 0x28

/* lib.c */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int str_eq(const char *a, const char *b);
int starts_with(const char *s, const char *prefix);
void putc_serial(char c);
void puts_serial(const char *s);
void print_u64(u64 v);
void print_hex(u64 v);
/* Tiny printf: %s %u %x (u64 args only: %u and %x consume a u64), %c, %%. */
void kprintf(const char *fmt, ...);
/* Formats into buf (same directives as kprintf); returns length, always NUL-terminates. */
usize ksnprintf(char *buf, usize cap, const char *fmt, ...);
/* Parses a decimal or 0x-hex number with optional K/M/G suffix. Returns 0 on error. */
int parse_u64(const char *s, usize len, u64 *out);
/* Splits `line` in place on spaces into at most `max` words; returns the count. */
int split_words(char *line, char **words, int max);

/* Hashing and patterns (the host side mirrors these exactly in the kiln-testguest crate). */
u64 splitmix64(u64 x);
static inline u64 pattern_word(u64 seed, u64 word_index) { return splitmix64(seed ^ (word_index * 0x9E3779B97F4A7C15UL)); }
#define KT_HASH_INIT 0xcbf29ce484222325UL
u64 kt_hash_words(u64 h, const u64 *p, usize nwords);
static inline u64 kt_hash_finish(u64 h, u64 len) { return splitmix64(h ^ len); }

/* main.c */
extern volatile u64 kt_counter;
extern u64 kt_debug;
extern u64 kt_tsc_per_ms;
extern u64 ram_end_below_4g, ram_end_total;
int ram_contains(u64 addr, u64 len);
void kt_reset(void) __attribute__((noreturn));

/* virtio.c: split virtqueues over virtio-mmio version 2. */
#define VQ_MAX 256
struct vring_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vring_avail { u16 flags; u16 idx; u16 ring[VQ_MAX]; u16 used_event; };
struct vring_used_elem { u32 id; u32 len; };
struct vring_used { u16 flags; u16 idx; struct vring_used_elem ring[VQ_MAX]; u16 avail_event; };
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4

struct virtq {
    u16 size, free_head, num_free, last_used;
    u16 avail_shadow; /* our copy of avail->idx */
    u16 event_idx;    /* VIRTIO_RING_F_EVENT_IDX negotiated (set by the driver after vq_setup) */
    u16 kicked;       /* avail_shadow at the last notify (EVENT_IDX kick suppression) */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
};

struct vdev {
    u64 base;
    u32 irq;
    u32 device_id;
    int ok;
};

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_STATUS_ACK 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG 0x100

/* Resets and negotiates VERSION_1 (plus `want` low feature bits the device offers); returns 0 ok. */
int vdev_init(struct vdev *d, u32 want_low);
/* Sets up queue `qi` with memory at `mem` (one 16 KiB-aligned area of vq_mem_size()). */
int vq_setup(struct vdev *d, struct virtq *q, u32 qi, void *mem, u16 max_size);
void vdev_driver_ok(struct vdev *d);
void vdev_reset(struct vdev *d);
u32 vdev_status(struct vdev *d);
#define VQ_MEM_SIZE (3 * PAGE + 4 * PAGE) /* desc 4K + avail + used, with slack */
int vq_alloc(struct virtq *q);         /* one descriptor index, -1 if none */
void vq_free_chain(struct virtq *q, u16 head);
void vq_push(struct virtq *q, u16 head); /* publish head in the avail ring (no notify) */
void vq_notify(struct vdev *d, struct virtq *q, u32 qi);
/* Pops one used element; returns 1 and fills id/len, 0 if none. */
int vq_pop(struct virtq *q, u32 *id, u32 *len);
/* EVENT_IDX: ask for an interrupt once the used ring passes idx (used_event). */
void vq_set_used_event(struct virtq *q, u16 idx);

/* blk.c */
extern u64 blk_idle_us; /* kt.blkidle=: bench wakes this many us before an expected completion (0: never idles) */
#define MAX_BLK 4
extern int nblk;
u64 blk_capacity(int i);
/* Synchronous single request; returns virtio status (0 ok) or -1 on timeout/bad args. */
int blk_rw(int disk, int write, u64 sector, void *buf, u32 len);
int blk_flush(int disk);
void blk_probe(struct vdev *d);
/* Write/verify/hash a sector range with the shared pattern. */
int blk_write_pattern(int disk, u64 sector, u64 count, u64 seed);
int blk_check_pattern(int disk, u64 sector, u64 count, u64 seed, u64 *bad_sector);
int blk_hash(int disk, u64 sector, u64 count, u64 *out);
/* Random or sequential read benchmark. */
void blk_bench(int disk, int random, u32 bs, u32 qd, u64 nreq, u64 span_sectors, int write);
void blk_selftest(int disk);
void blk_misbehave(int disk);

/* vsock.c */
void vsock_probe(struct vdev *d);
/* Returns 1 if it found anything to do. */
int vsock_poll(void);
extern int have_vsock;

/* net.c: virtio-net answering ARP, ICMP echo and UDP echo for kt.ip= */
extern int have_net;
extern u8 net_ip[4], net_mac_opt[6];
extern int net_ip_set, net_mac_set;
int net_parse_ip(const char *s, usize len, u8 *out);
int net_parse_mac(const char *s, usize len, u8 *out);
void net_probe(struct vdev *d);
/* Returns 1 if it found anything to do. */
int net_poll(void);
void net_misbehave(void);
void net_report(void);

/* cmd.c: one request line in, reply written into out (NUL-terminated, no newline). Returns 1 if a
   reply is ready; 0 if the reply comes later (DIAL). */
int handle_command(char *line, char *out, usize cap, int conn);

#endif
