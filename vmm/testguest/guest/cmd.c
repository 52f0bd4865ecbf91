/* The request protocol spoken over vsock (one text line in, one line out; see README.md). */
#include "kt.h"

int vsock_dial(u32 port, const char *text, int origin);

static u64 reqs;

static int num(const char *w, u64 *v) { return parse_u64(w, strlen(w), v); }

/* Validates a [start_mib, +len_mib) physical range for reading (any RAM) or writing (arena). */
static int mem_range(char **w, u64 *addr, u64 *len, int writable) {
    u64 s, l;
    if (!num(w[0], &s) || !num(w[1], &l) || s > (1UL << 24) || l > (1UL << 24)) return 0;
    *addr = s * MIB;
    *len = l * MIB;
    if (writable && *addr < ARENA_START) return 0;
    return ram_contains(*addr, *len);
}

static u64 mem_hash(u64 addr, u64 len) {
    return kt_hash_finish(kt_hash_words(KT_HASH_INIT, (const u64 *)addr, len / 8), len);
}

static u64 arena_end(void) {
    /* The arena is the RAM range that holds ARENA_START, up to its end. */
    u64 end = ARENA_START;
    while (ram_contains(end, MIB)) end += MIB;
    return end;
}

static void hex16(char *p, u64 v) {
    for (int i = 15; i >= 0; i--, v >>= 4) p[i] = "0123456789abcdef"[v & 15];
}

/* GEN: the generation-id page, generation read before and after the id so a snapshot taken
   between the loads cannot pair an old generation with a new id. */
static void gen_reply(char *out, usize cap) {
    if (mmio_read32(GENID_BASE) != GENID_MAGIC) {
        ksnprintf(out, cap, "ERR no generation-id device");
        return;
    }
    u64 g, lo, hi;
    do {
        g = mmio_read64(GENID_BASE + GENID_GENERATION);
        lo = mmio_read64(GENID_BASE + GENID_ID);
        hi = mmio_read64(GENID_BASE + GENID_ID + 8);
    } while (g != mmio_read64(GENID_BASE + GENID_GENERATION));
    char id[33];
    hex16(id, hi);
    hex16(id + 16, lo);
    id[32] = 0;
    ksnprintf(out, cap, "OK gen=%u id=%s time_ns=%u rand=0x%x", g, id, mmio_read64(GENID_BASE + GENID_HOST_TIME_NS),
              mmio_read64(GENID_BASE + GENID_RANDOM));
}

int handle_command(char *line, char *out, usize cap, int conn) {
    reqs++;
    if (starts_with(line, "ECHO ")) {
        ksnprintf(out, cap, "%s", line + 5);
        return 1;
    }
    if (starts_with(line, "DIAL ")) {
        /* DIAL <port> <text...>: the text keeps its spaces. */
        char *p = line + 5, *t = p;
        while (*t && *t != ' ') t++;
        u64 port;
        if (*t != ' ' || !parse_u64(p, (usize)(t - p), &port) || port > 0xffffffffUL) {
            ksnprintf(out, cap, "ERR usage: DIAL <port> <text>");
            return 1;
        }
        if (vsock_dial((u32)port, t + 1, conn) == 0) return 0; /* answered by dial_done() */
        ksnprintf(out, cap, "ERR dial: no free connection");
        return 1;
    }
    char *w[8];
    int n = split_words(line, w, 8);
    if (n == 0) {
        ksnprintf(out, cap, "ERR empty request");
        return 1;
    }
    const char *c = w[0];
    u64 a, b, s, d, x;
    if (str_eq(c, "PING")) {
        ksnprintf(out, cap, "PONG");
    } else if (str_eq(c, "COUNTER")) {
        ksnprintf(out, cap, "OK %u", kt_counter);
    } else if (str_eq(c, "GEN")) {
        gen_reply(out, cap);
    } else if (str_eq(c, "REQUESTS")) {
        ksnprintf(out, cap, "OK %u", reqs);
    } else if (str_eq(c, "MEMINFO")) {
        ksnprintf(out, cap, "OK ram_end_mib=%u arena_start_mib=%u arena_end_mib=%u", ram_end_total / MIB,
                  ARENA_START / MIB, arena_end() / MIB);
    } else if (str_eq(c, "FILL") && n == 4 && mem_range(w + 1, &a, &b, 1) && num(w[3], &s)) {
        u64 *p = (u64 *)a;
        for (u64 i = 0; i < b / 8; i++) p[i] = pattern_word(s, a / 8 + i);
        ksnprintf(out, cap, "OK 0x%x", mem_hash(a, b));
    } else if (str_eq(c, "CHECK") && n == 4 && mem_range(w + 1, &a, &b, 0) && num(w[3], &s)) {
        const u64 *p = (const u64 *)a;
        u64 i = 0;
        while (i < b / 8 && p[i] == pattern_word(s, a / 8 + i)) i++;
        if (i == b / 8) ksnprintf(out, cap, "OK");
        else ksnprintf(out, cap, "BAD 0x%x", a + i * 8);
    } else if (str_eq(c, "TOUCH") && n == 3 && mem_range(w + 1, &a, &b, 0)) {
        u64 acc = 0;
        for (u64 off = 0; off < b; off += PAGE) acc ^= *(volatile u64 *)(a + off);
        ksnprintf(out, cap, "OK pages=%u xor=0x%x", b / PAGE, acc);
    } else if (str_eq(c, "MEMSUM") && n == 3 && mem_range(w + 1, &a, &b, 0)) {
        ksnprintf(out, cap, "OK 0x%x", mem_hash(a, b));
    } else if (str_eq(c, "BLKINFO")) {
        usize k = ksnprintf(out, cap, "OK %u", (u64)nblk);
        for (int i = 0; i < nblk && k < cap; i++) k += ksnprintf(out + k, cap - k, " %u", blk_capacity(i));
    } else if (str_eq(c, "BLKWRITE") && n == 5 && num(w[1], &d) && num(w[2], &a) && num(w[3], &b) && num(w[4], &s)) {
        int st = blk_write_pattern((int)d, a, b, s);
        if (st) ksnprintf(out, cap, "ERR status %x", (u64)(i64)st);
        else ksnprintf(out, cap, "OK");
    } else if (str_eq(c, "BLKCHECK") && n == 5 && num(w[1], &d) && num(w[2], &a) && num(w[3], &b) && num(w[4], &s)) {
        x = 0;
        int st = blk_check_pattern((int)d, a, b, s, &x);
        if (st == 1000) ksnprintf(out, cap, "BAD %u", x);
        else if (st) ksnprintf(out, cap, "ERR status %x", (u64)(i64)st);
        else ksnprintf(out, cap, "OK");
    } else if (str_eq(c, "BLKHASH") && n == 4 && num(w[1], &d) && num(w[2], &a) && num(w[3], &b)) {
        int st = blk_hash((int)d, a, b, &x);
        if (st) ksnprintf(out, cap, "ERR status %x", (u64)(i64)st);
        else ksnprintf(out, cap, "OK 0x%x", x);
    } else if (str_eq(c, "BLKFLUSH") && n == 2 && num(w[1], &d)) {
        int st = blk_flush((int)d);
        if (st) ksnprintf(out, cap, "ERR status %x", (u64)(i64)st);
        else ksnprintf(out, cap, "OK");
    } else if (str_eq(c, "BENCH") && n >= 6 && num(w[1], &d) && num(w[3], &a) && num(w[4], &b) && num(w[5], &s)) {
        u64 t0 = rdtsc();
        blk_bench((int)d, !str_eq(w[2], "seq"), (u32)a, (u32)b, s, 0, n > 6 && str_eq(w[6], "write"));
        ksnprintf(out, cap, "OK tsc_cycles=%u", rdtsc() - t0);
    } else if (str_eq(c, "RESET")) {
        kprintf("kt: reset requested\n");
        kt_reset();
    } else {
        ksnprintf(out, cap, "ERR bad request: %s", c);
    }
    return 1;
}
