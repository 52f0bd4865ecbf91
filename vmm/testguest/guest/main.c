/* kiln test guest: boot, memory map, own page tables, command line, devices, main loop. */
#include "kt.h"

extern char __bss_start[], __bss_end[], __image_end[];

volatile u64 kt_counter;
u64 kt_debug;
u64 kt_tsc_per_ms = 3000000; /* rough default (3 GHz) for timeouts; kt.tsc_khz= overrides */
u64 ram_end_below_4g, ram_end_total;

#define MAX_E820 32
static struct { u64 addr, size; } ram[MAX_E820];
static int nram;

/* 2 MiB identity mappings of the first 64 GiB: the VMM's boot page tables only have to cover
   where the image lives; MMIO (virtio-mmio at 3-4 GiB) and large RAM need more. */
#define MAX_GIB 64
static u64 pml4[512] __attribute__((aligned(4096), section(".noinit")));
static u64 pdpt[512] __attribute__((aligned(4096), section(".noinit")));
static u64 pds[MAX_GIB][512] __attribute__((aligned(4096), section(".noinit")));

static struct vdev devs[8];
static int ndevs;

struct opts {
    const char *mode;
    u64 disk, bs, qd, n, span, write, exit_after, own_paging_off, idle_spins;
    int random;
} opt = {"serve", 0, 4096, 32, 100000, 0, 0, 0, 0, 2000, 1};

void kt_reset(void) {
    for (;;) outb(0x64, 0xfe);
}

int ram_contains(u64 addr, u64 len) {
    if (addr + len < addr) return 0;
    for (int i = 0; i < nram; i++)
        if (addr >= ram[i].addr && addr + len <= ram[i].addr + ram[i].size) return 1;
    return 0;
}

static void parse_e820(const u8 *bp) {
    u8 n = bp[0x1e8];
    const u8 *e = bp + 0x2d0;
    if (n > 128) n = 128; /* boot_params holds at most 128 entries */
    for (int i = 0; i < n; i++, e += 20) {
        u64 addr = *(const u64 *)e, size = *(const u64 *)(e + 8);
        u32 type = *(const u32 *)(e + 16);
        if (type != 1 || nram == MAX_E820) continue;
        ram[nram].addr = addr;
        ram[nram].size = size;
        nram++;
        u64 end = addr + size;
        if (end > ram_end_total) ram_end_total = end;
        if (addr < (4UL << 30) && end > ram_end_below_4g) ram_end_below_4g = end;
    }
}

static void setup_paging(void) {
    /* Entered at CPL 3 (kiln's EntryMode::User, the fast path on PVM hosts): loading CR3 is
     * privileged there; the VMM's identity map (0..4 GiB, user-accessible) stays in use. */
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    if ((cs & 3) == 3) return;
    u64 gib = (ram_end_total + (1UL << 30) - 1) >> 30;
    if (gib < 4) gib = 4; /* always cover the 32-bit MMIO hole */
    if (gib > MAX_GIB) {
        kprintf("kt: warning: RAM above %u GiB is not mapped\n", (u64)MAX_GIB);
        gib = MAX_GIB;
    }
    memset(pml4, 0, sizeof pml4);
    memset(pdpt, 0, sizeof pdpt);
    for (u64 g = 0; g < gib; g++) {
        /* P|RW|US|A|D|PS: accessed/dirty preset so a shadow MMU never has to emulate setting them,
           and user-accessible in case the VMM enters the guest at CPL 3 (an option under PVM). */
        for (u64 j = 0; j < 512; j++) pds[g][j] = (g << 30) | (j << 21) | 0xe7;
        pdpt[g] = (u64)pds[g] | 0x27;
    }
    pml4[0] = (u64)pdpt | 0x27;
    __asm__ volatile("mov %0, %%cr3" ::"r"((u64)pml4) : "memory");
}

static int word_is(const char *w, usize len, const char *key) {
    usize k = strlen(key);
    return len > k && memcmp(w, key, k) == 0;
}

static void parse_num_opt(const char *w, usize len, const char *key, u64 *dst) {
    usize k = strlen(key);
    if (!parse_u64(w + k, len - k, dst)) kprintf("kt: bad value in option %s\n", key);
}

/* virtio_mmio.device=<size>@<base>:<irq>, as Linux parses it. */
static void parse_mmio_dev(const char *s, usize len) {
    usize at = 0, colon = 0;
    for (usize i = 0; i < len; i++) {
        if (s[i] == '@' && !at) at = i;
        if (s[i] == ':') colon = i;
    }
    u64 size, base, irq;
    if (!at || colon <= at || !parse_u64(s, at, &size) || !parse_u64(s + at + 1, colon - at - 1, &base) ||
        !parse_u64(s + colon + 1, len - colon - 1, &irq)) {
        kprintf("kt: bad virtio_mmio.device=%s\n", s);
        return;
    }
    if (ndevs == 8 || base + size > (4UL << 30) || size < 0x200) {
        kprintf("kt: ignoring virtio-mmio device at 0x%x\n", base);
        return;
    }
    devs[ndevs].base = base;
    devs[ndevs].irq = (u32)irq;
    ndevs++;
}

static char cmdline[4096];

static void parse_cmdline(const u8 *bp) {
    u32 ptr = *(const u32 *)(bp + 0x228);
    u32 size = *(const u32 *)(bp + 0x238); /* cmdline_size: the max the kernel accepts; bound only */
    (void)size;
    if (!ptr) return;
    const char *src = (const char *)(u64)ptr;
    usize n = 0;
    while (n < sizeof cmdline - 1 && src[n]) {
        cmdline[n] = src[n];
        n++;
    }
    cmdline[n] = 0;
    kprintf("kt: cmdline: %s\n", cmdline);
    char *p = cmdline;
    while (*p) {
        while (*p == ' ') p++;
        char *w = p;
        while (*p && *p != ' ') p++;
        usize len = (usize)(p - w);
        if (!len) continue;
        if (word_is(w, len, "virtio_mmio.device=")) parse_mmio_dev(w + 19, len - 19);
        else if (word_is(w, len, "kt.mode=")) {
            if (*p) *p++ = 0;
            opt.mode = w + 8;
            continue;
        } else if (word_is(w, len, "kt.bench=")) opt.random = !(len - 9 == 3 && memcmp(w + 9, "seq", 3) == 0);
        else if (word_is(w, len, "kt.disk=")) parse_num_opt(w, len, "kt.disk=", &opt.disk);
        else if (word_is(w, len, "kt.bs=")) parse_num_opt(w, len, "kt.bs=", &opt.bs);
        else if (word_is(w, len, "kt.qd=")) parse_num_opt(w, len, "kt.qd=", &opt.qd);
        else if (word_is(w, len, "kt.n=")) parse_num_opt(w, len, "kt.n=", &opt.n);
        else if (word_is(w, len, "kt.span=")) parse_num_opt(w, len, "kt.span=", &opt.span);
        else if (word_is(w, len, "kt.write=")) parse_num_opt(w, len, "kt.write=", &opt.write);
        else if (word_is(w, len, "kt.debug=")) parse_num_opt(w, len, "kt.debug=", &kt_debug);
        else if (word_is(w, len, "kt.vmm_paging=")) parse_num_opt(w, len, "kt.vmm_paging=", &opt.own_paging_off);
        else if (word_is(w, len, "kt.exit=")) parse_num_opt(w, len, "kt.exit=", &opt.exit_after);
        else if (word_is(w, len, "kt.idle=")) parse_num_opt(w, len, "kt.idle=", &opt.idle_spins);
        else if (word_is(w, len, "kt.blkidle=")) parse_num_opt(w, len, "kt.blkidle=", &blk_idle_us);
        else if (word_is(w, len, "kt.ip=")) {
            net_ip_set = net_parse_ip(w + 6, len - 6, net_ip);
            if (!net_ip_set) kprintf("kt: bad value in option kt.ip=\n");
        } else if (word_is(w, len, "kt.mac=")) {
            net_mac_set = net_parse_mac(w + 7, len - 7, net_mac_opt);
            if (!net_mac_set) kprintf("kt: bad value in option kt.mac=\n");
        } else if (word_is(w, len, "kt.tsc_khz=")) {
            u64 khz = 0;
            parse_num_opt(w, len, "kt.tsc_khz=", &khz);
            if (khz) kt_tsc_per_ms = khz;
        }
    }
}

void kmain(const u8 *boot_params) {
    /* First line out, before any other work: the boot benchmark measures time to it. */
    puts_serial("kiln-testguest ready\n");
    /* Mask both 8259 PICs. The guest polls and never enables interrupts, but an unmasked PIC
       leaves device interrupts (virtio, serial, PIT) pending forever, and a hypervisor waiting
       for an interrupt window can slow a CPU with IF=0 to a crawl (PVM does). */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    memset(__bss_start, 0, (usize)(__bss_end - __bss_start));
    parse_e820(boot_params);
    parse_cmdline(boot_params);
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    /* At CPL 3 (the VMM's "user" entry, which PVM runs natively instead of emulating) CR3 is out
       of reach: the VMM's identity map of 0..4 GiB is used as is. */
    if (!opt.own_paging_off && !(cs & 3)) setup_paging();
    u64 total = 0;
    for (int i = 0; i < nram; i++) total += ram[i].size;
    kprintf("kt: ram %u MiB in %u ranges, image ends at 0x%x, %u virtio-mmio devices, cpl %u\n", total / MIB,
            (u64)nram, (u64)__image_end, (u64)ndevs, (u64)(cs & 3));
    if ((cs & 3) && ram_end_total > (4UL << 30)) kprintf("kt: warning: RAM above 4 GiB is not mapped at CPL 3\n");
    if ((u64)__image_end > ARENA_START) kprintf("kt: BUG: image overlaps the arena\n");
    if (!ram_contains(ARENA_START - 8 * MIB, 8 * MIB)) kprintf("kt: warning: less than 16 MiB of RAM\n");

    for (int i = 0; i < ndevs; i++) {
        struct vdev *d = &devs[i];
        if (mmio_read32(d->base + VIRTIO_MMIO_MAGIC) != 0x74726976) {
            kprintf("kt: no virtio-mmio device at 0x%x\n", d->base);
            continue;
        }
        d->device_id = mmio_read32(d->base + VIRTIO_MMIO_DEVICE_ID);
        if (d->device_id == VIRTIO_ID_BLOCK) blk_probe(d);
        else if (d->device_id == VIRTIO_ID_VSOCK) vsock_probe(d);
        else if (d->device_id == VIRTIO_ID_NET) net_probe(d);
        else kprintf("kt: ignoring virtio device id %u at 0x%x\n", (u64)d->device_id, d->base);
    }

    int disk = (int)opt.disk;
    if (str_eq(opt.mode, "blktest")) {
        blk_selftest(disk);
    } else if (str_eq(opt.mode, "bench")) {
        blk_bench(disk, opt.random, (u32)opt.bs, (u32)opt.qd, opt.n, opt.span / 512, (int)opt.write);
    } else if (str_eq(opt.mode, "misbehave")) {
        blk_misbehave(disk);
    } else if (str_eq(opt.mode, "netmisbehave")) {
        net_misbehave();
    } else if (!str_eq(opt.mode, "serve")) {
        kprintf("kt: unknown kt.mode=%s\n", opt.mode);
    }
    if (opt.exit_after) {
        kprintf("kt: exit\n");
        kt_reset();
    }
    /* Idle through the VMM's idle port (hlt does not work at CPL 3 under PVM) once the queues
       have been empty for kt.idle= polls; the spins keep the reply latency of a busy
       connection at polling speed. kt.idle=0 polls forever. */
    int can_idle = opt.idle_spins && inb(IDLE_PORT) == IDLE_PORT_SIG;
    kprintf("kt: serving (idle %s)\n", can_idle ? "port" : "off");
    u64 empty = 0;
    for (;;) {
        kt_counter++;
        int busy = have_vsock && vsock_poll();
        if (have_net && net_poll()) busy = 1;
        if (busy) empty = 0;
        else if (can_idle && ++empty > opt.idle_spins) outl(IDLE_PORT, 0);
        cpu_relax();
    }
}
