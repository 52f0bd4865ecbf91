/* virtio-net driver: answers ARP requests for kt.ip, ICMP echo requests and UDP datagrams (echoed
   to the sender, any port), polled from the main loop. kt.mode=netmisbehave first feeds the device
   malformed chains (see README.md), then serves. */
#include "kt.h"

#define QSIZE 64
#define NET_BUF 2048
#define VNET_HDR 12
#define ETH_HDR 14

int have_net;
u8 net_ip[4];
int net_ip_set;
u8 net_mac_opt[6];
int net_mac_set;

static struct vdev *vdev;
static struct virtq rxq, txq;
static u8 mac[6];
static u8 qmem[2][VQ_MEM_SIZE] __attribute__((aligned(4096), section(".noinit")));
static u8 rxbuf[QSIZE][NET_BUF] __attribute__((aligned(4096), section(".noinit")));
static u8 txbuf[QSIZE][NET_BUF] __attribute__((aligned(4096), section(".noinit")));
static u64 n_rx, n_tx, n_arp, n_icmp, n_udp, n_rx_empty, n_tx_full;
static int tx_pending; /* frames pushed since the last TX notify */
static int misbehave_rx_wait; /* bad RX buffers posted by netmisbehave not yet returned */

static u16 be16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }

/* Internet checksum (RFC 1071) over len bytes. */
static u16 csum(const u8 *p, u32 len) {
    u64 s = 0;
    for (u32 i = 0; i + 1 < len; i += 2) s += (u32)be16(p + i);
    if (len & 1) s += (u32)p[len - 1] << 8;
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

/* "A.B.C.D" -> 4 bytes. Returns 1 on success. */
int net_parse_ip(const char *s, usize len, u8 *out) {
    int part = 0;
    u64 v = 0, digits = 0;
    for (usize i = 0; i <= len; i++) {
        if (i == len || s[i] == '.') {
            if (!digits || v > 255 || part > 3) return 0;
            out[part++] = (u8)v;
            v = 0;
            digits = 0;
        } else if (s[i] >= '0' && s[i] <= '9') {
            v = v * 10 + (u64)(s[i] - '0');
            digits++;
        } else return 0;
    }
    return part == 4;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* "xx:xx:xx:xx:xx:xx" -> 6 bytes. Returns 1 on success. */
int net_parse_mac(const char *s, usize len, u8 *out) {
    if (len != 17) return 0;
    for (int i = 0; i < 6; i++) {
        int h = hexval(s[3 * i]), l = hexval(s[3 * i + 1]);
        if (h < 0 || l < 0 || (i < 5 && s[3 * i + 2] != ':')) return 0;
        out[i] = (u8)(h * 16 + l);
    }
    return 1;
}

static void rx_post(u16 i, u64 addr, u32 len, u16 flags) {
    rxq.desc[i].addr = addr;
    rxq.desc[i].len = len;
    rxq.desc[i].flags = flags;
    rxq.desc[i].next = 0;
    vq_push(&rxq, i);
}

/* Resets the device and sets both queues up; with bad_rx the first three RX buffers are
   malformed (outside RAM, 16 bytes, device-readable), for netmisbehave. */
static int net_setup(int bad_rx) {
    if (vdev_init(vdev, 1u << 5 /* VIRTIO_NET_F_MAC */)) return -1;
    if (vq_setup(vdev, &rxq, 0, qmem[0], QSIZE) || vq_setup(vdev, &txq, 1, qmem[1], QSIZE)) {
        vdev_reset(vdev);
        return -1;
    }
    /* RX used entries wake the idle vCPU: keep interrupts on; TX completions are polled. */
    rxq.avail->flags = 0;
    for (u16 i = 0; i < rxq.size; i++) {
        if (bad_rx && i == 0) rx_post(i, ram_end_total + (1UL << 30), NET_BUF, VRING_DESC_F_WRITE);
        else if (bad_rx && i == 1) rx_post(i, (u64)rxbuf[i], 16, VRING_DESC_F_WRITE);
        else if (bad_rx && i == 2) rx_post(i, (u64)rxbuf[i], NET_BUF, 0);
        else rx_post(i, (u64)rxbuf[i], NET_BUF, VRING_DESC_F_WRITE);
    }
    misbehave_rx_wait = bad_rx ? 3 : 0;
    rxq.num_free = 0; /* RX descriptors are fixed: descriptor i is buffer i */
    tx_pending = 0;
    vdev_driver_ok(vdev);
    vq_notify(vdev, &rxq, 0);
    return 0;
}

void net_probe(struct vdev *d) {
    if (have_net) {
        kprintf("kt: ignoring a second virtio-net device at 0x%x\n", d->base);
        return;
    }
    vdev = d;
    if (net_setup(0)) {
        kprintf("kt: virtio-net at 0x%x: setup failed\n", d->base);
        return;
    }
    mmio_write32(d->base + VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    int has_mac = (mmio_read32(d->base + VIRTIO_MMIO_DEVICE_FEATURES) >> 5) & 1;
    for (int i = 0; i < 6; i++)
        mac[i] = net_mac_set ? net_mac_opt[i] : has_mac ? mmio_read8(d->base + VIRTIO_MMIO_CONFIG + (u64)i) : (u8)(i == 0 ? 2 : i);
    have_net = 1;
    kprintf("kt: virtio-net at 0x%x: mac %x:%x:%x:%x:%x:%x ip %u.%u.%u.%u queues %u/%u\n", d->base, (u64)mac[0],
            (u64)mac[1], (u64)mac[2], (u64)mac[3], (u64)mac[4], (u64)mac[5], (u64)net_ip[0], (u64)net_ip[1],
            (u64)net_ip[2], (u64)net_ip[3], (u64)rxq.size, (u64)txq.size);
    if (!net_ip_set) kprintf("kt: virtio-net: no kt.ip=, answering nothing\n");
}

static void tx_reclaim(void) {
    u32 id, len;
    while (vq_pop(&txq, &id, &len))
        if (id < txq.size) vq_free_chain(&txq, (u16)id);
}

static void tx_flush(void) {
    if (tx_pending) vq_notify(vdev, &txq, 1);
    tx_pending = 0;
}

/* Queues one frame (Ethernet header on) behind a zero virtio-net header; notified by tx_flush. */
static int send_frame(const u8 *frame, u32 len) {
    if (len + VNET_HDR > NET_BUF) return -1;
    int d;
    u64 t0 = rdtsc();
    for (;;) {
        tx_reclaim();
        d = vq_alloc(&txq);
        if (d >= 0) break;
        tx_flush();
        if (rdtsc() - t0 > 100 * kt_tsc_per_ms) {
            n_tx_full++;
            return -1;
        }
        cpu_relax();
    }
    memset(txbuf[d], 0, VNET_HDR);
    memcpy(txbuf[d] + VNET_HDR, frame, len);
    txq.desc[d].addr = (u64)txbuf[d];
    txq.desc[d].len = VNET_HDR + len;
    txq.desc[d].flags = 0;
    vq_push(&txq, (u16)d);
    tx_pending++;
    n_tx++;
    return 0;
}

static u8 reply[NET_BUF];

static void eth_reply_header(const u8 *req) {
    memcpy(reply, req + 6, 6); /* to the sender */
    memcpy(reply + 6, mac, 6);
    memcpy(reply + 12, req + 12, 2);
}

static void handle_arp(const u8 *f, u32 len) {
    const u8 *a = f + ETH_HDR;
    if (len < ETH_HDR + 28 || be16(a) != 1 || be16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4 || be16(a + 6) != 1)
        return;
    if (memcmp(a + 24, net_ip, 4)) return; /* not asking for us */
    eth_reply_header(f);
    u8 *r = reply + ETH_HDR;
    memcpy(r, a, 6); /* htype, ptype, hlen, plen */
    put16(r + 6, 2); /* reply */
    memcpy(r + 8, mac, 6);
    memcpy(r + 14, net_ip, 4);
    memcpy(r + 18, a + 8, 10); /* requester's MAC and IP */
    n_arp++;
    send_frame(reply, ETH_HDR + 28);
}

static void handle_ipv4(const u8 *f, u32 len) {
    const u8 *ip = f + ETH_HDR;
    if (len < ETH_HDR + 20 || (ip[0] >> 4) != 4) return;
    u32 ihl = (u32)(ip[0] & 15) * 4, total = be16(ip + 2);
    if (ihl < 20 || total < ihl || ETH_HDR + total > len || csum(ip, ihl) != 0) return;
    if (memcmp(ip + 16, net_ip, 4)) return;
    if (be16(ip + 6) & 0x3fff) return; /* fragments: not handled */
    const u8 *l4 = ip + ihl;
    u32 l4len = total - ihl;
    u8 proto = ip[9];
    eth_reply_header(f);
    u8 *rip = reply + ETH_HDR;
    memset(rip, 0, 20);
    rip[0] = 0x45;
    put16(rip + 2, (u16)(20 + l4len));
    rip[8] = 64;
    rip[9] = proto;
    memcpy(rip + 12, net_ip, 4);
    memcpy(rip + 16, ip + 12, 4);
    put16(rip + 10, csum(rip, 20));
    u8 *r4 = rip + 20;
    if (proto == 1) { /* ICMP echo request -> reply */
        if (l4len < 8 || l4[0] != 8 || csum(l4, l4len) != 0) return;
        memcpy(r4, l4, l4len);
        r4[0] = 0;
        r4[2] = r4[3] = 0;
        put16(r4 + 2, csum(r4, l4len));
        n_icmp++;
    } else if (proto == 17) { /* UDP: the payload back to the sender's port */
        if (l4len < 8 || be16(l4 + 4) < 8 || be16(l4 + 4) > l4len) return;
        u32 ulen = be16(l4 + 4);
        memcpy(r4, l4 + 2, 2); /* source port = their destination port */
        memcpy(r4 + 2, l4, 2);
        memcpy(r4 + 4, l4 + 4, 2);
        r4[6] = r4[7] = 0; /* no checksum (allowed over IPv4) */
        memcpy(r4 + 8, l4 + 8, ulen - 8);
        l4len = ulen;
        put16(rip + 2, (u16)(20 + l4len));
        rip[10] = rip[11] = 0;
        put16(rip + 10, csum(rip, 20));
        n_udp++;
    } else return;
    send_frame(reply, ETH_HDR + 20 + l4len);
}

static void handle_frame(const u8 *f, u32 len) {
    if (len < ETH_HDR || !net_ip_set) return;
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    if (memcmp(f, mac, 6) && memcmp(f, bcast, 6)) return;
    u16 type = be16(f + 12);
    if (kt_debug) kprintf("kt: net rx type=0x%x len=%u\n", (u64)type, (u64)len);
    if (type == 0x0806) handle_arp(f, len);
    else if (type == 0x0800) handle_ipv4(f, len);
}

int net_poll(void) {
    u32 id, len;
    int got = 0;
    tx_reclaim();
    while (vq_pop(&rxq, &id, &len)) {
        got = 1;
        if (id >= rxq.size) continue;
        if (len == 0) n_rx_empty++;
        else if (len > VNET_HDR && len <= NET_BUF) {
            n_rx++;
            handle_frame(rxbuf[id] + VNET_HDR, len - VNET_HDR);
        }
        rx_post((u16)id, (u64)rxbuf[id], NET_BUF, VRING_DESC_F_WRITE);
        if (misbehave_rx_wait && id < 3 && --misbehave_rx_wait == 0)
            kprintf("kt: netmisbehave rx-bad-buffers: returned=3/3 empty=%u -> ok\n", n_rx_empty);
    }
    if (got) vq_notify(vdev, &rxq, 0);
    tx_flush();
    return got;
}

/* ---- netmisbehave: malformed TX chains; the device must return them and keep working ---- */

static u64 bad_addr(void) { return ram_end_total + (1UL << 30); }

#define NCASES 10
static const char *case_names[NCASES] = {
    "oversized-frame", "zero-length", "header-only", "outside-ram", "device-writable",
    "looping-chain", "next-out-of-range", "head-out-of-range", "garbage-vnet-header", "avail-idx-jump",
};

/* Publishes the case's chain(s); returns how many used entries a working device gives back. */
static int publish_case(int c) {
    struct virtq *q = &txq;
    tx_reclaim();
    int d = vq_alloc(q), e = vq_alloc(q);
    if (d < 0 || e < 0) return -1;
    u8 *buf = txbuf[d];
    memset(buf, 0, VNET_HDR + 60);
    memset(buf + VNET_HDR, 0xff, 6); /* broadcast, to nobody's protocol (type 0x88b5: local experimental) */
    memcpy(buf + VNET_HDR + 6, mac, 6);
    put16(buf + VNET_HDR + 12, 0x88b5);
    q->desc[d].addr = (u64)buf;
    q->desc[d].len = VNET_HDR + 60;
    q->desc[d].flags = 0;
    q->desc[e].addr = (u64)txbuf[e];
    q->desc[e].len = 100;
    q->desc[e].flags = 0;
    int heads = 1;
    switch (c) {
    case 0: /* 128 KiB from the arena after the header: more than any frame */
        q->desc[d].flags = VRING_DESC_F_NEXT;
        q->desc[d].next = (u16)e;
        q->desc[e].addr = ARENA_START;
        q->desc[e].len = 128 * 1024;
        break;
    case 1: q->desc[d].len = 0; break;
    case 2: q->desc[d].len = VNET_HDR; break;
    case 3: q->desc[d].addr = bad_addr(); break;
    case 4: q->desc[d].flags = VRING_DESC_F_WRITE; break;
    case 5: q->desc[d].flags = VRING_DESC_F_NEXT; q->desc[d].next = (u16)d; break;
    case 6: q->desc[d].flags = VRING_DESC_F_NEXT; q->desc[d].next = 0x7fff; break;
    case 7:
        q->avail->ring[q->avail_shadow % q->size] = 0xfff0;
        q->avail_shadow++;
        *(volatile u16 *)&q->avail->idx = q->avail_shadow;
        return 0; /* nothing can come back for a head the ring cannot hold */
    case 8: /* valid frame, but the header asks for offloads that were never negotiated */
        buf[0] = 1;    /* NEEDS_CSUM */
        buf[1] = 0x81; /* GSO TCPV4 | ECN */
        put16(buf + 2, 0xffff);
        put16(buf + 4, 40000);
        break;
    default:
        q->avail_shadow += q->size + 5;
        *(volatile u16 *)&q->avail->idx = q->avail_shadow;
        return 0;
    }
    vq_push(q, (u16)d);
    return heads;
}

void net_misbehave(void) {
    if (!have_net) {
        kprintf("kt: netmisbehave FAILED: no virtio-net device\n");
        return;
    }
    int passed = 0;
    for (int c = 0; c < NCASES; c++) {
        u16 used0 = *(volatile u16 *)&txq.used->idx;
        int want = publish_case(c);
        vq_notify(vdev, &txq, 1);
        u64 t0 = rdtsc(), limit = (want ? 300 : 100) * kt_tsc_per_ms;
        while ((u16)(*(volatile u16 *)&txq.used->idx - used0) < (u16)(want < 0 ? 0 : want) && rdtsc() - t0 < limit)
            cpu_relax();
        if (!want) /* give the device time to look at it */
            while (rdtsc() - t0 < limit) cpu_relax();
        u16 got = (u16)(*(volatile u16 *)&txq.used->idx - used0);
        u32 status = vdev_status(vdev);
        int needs_reset = !!(status & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED));
        /* Every descriptor is free again (the cases use fresh ones; nothing else is in flight). */
        txq.last_used = *(volatile u16 *)&txq.used->idx;
        for (u32 i = 0; i < txq.size; i++) txq.desc[i].next = (u16)(i + 1), txq.desc[i].flags = 0;
        txq.free_head = 0;
        txq.num_free = txq.size;
        int reset = 0;
        /* A corrupt ring (the last two cases) may stop the queue until a reset: do one. */
        if (c >= 7 || needs_reset) {
            reset = 1;
            if (net_setup(0)) {
                kprintf("kt: netmisbehave %s: re-initialising the device FAILED\n", case_names[c]);
                continue;
            }
        }
        /* The device still sends: one valid frame comes back as used. */
        u16 before = *(volatile u16 *)&txq.used->idx;
        u8 probe[60];
        memset(probe, 0, sizeof probe);
        memset(probe, 0xff, 6);
        memcpy(probe + 6, mac, 6);
        put16(probe + 12, 0x88b5);
        send_frame(probe, sizeof probe);
        tx_flush();
        t0 = rdtsc();
        while (*(volatile u16 *)&txq.used->idx == before && rdtsc() - t0 < 300 * kt_tsc_per_ms) cpu_relax();
        int ok = *(volatile u16 *)&txq.used->idx != before && (want < 0 || got >= want);
        tx_reclaim();
        if (ok) passed++;
        kprintf("kt: netmisbehave %s: used=%u/%u status=0x%x%s%s -> %s\n", case_names[c], (u64)got,
                (u64)(want < 0 ? 0 : want), (u64)status, needs_reset ? " needs-reset" : "", reset ? " reset" : "",
                ok ? "ok" : "FAILED");
    }
    kprintf("kt: netmisbehave tx done passed=%u failed=%u\n", (u64)passed, (u64)(NCASES - passed));
    /* RX: the first three buffers are malformed; the next frames from the host hit them. */
    if (net_setup(1)) kprintf("kt: netmisbehave: re-initialising the device FAILED\n");
    else kprintf("kt: netmisbehave rx-bad-buffers posted\n");
}

void net_report(void) {
    kprintf("kt: net rx=%u tx=%u arp=%u icmp=%u udp=%u rx_empty=%u tx_full=%u\n", n_rx, n_tx, n_arp, n_icmp, n_udp,
            n_rx_empty, n_tx_full);
}
