/* virtio-vsock driver: stream connections carrying text request lines (see README.md).
   The guest accepts connections on every port and can dial the host (CID 2). */
#include "kt.h"

struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
#define HDR_SIZE 44
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define HOST_CID 2

#define QSIZE 64
#define BUF_SIZE 4096
#define CONN_BUF_ALLOC (64 * 1024)
#define NCONN 16
#define LINE_MAX 2048
/* Longest reply line (the longest request line plus a prefix such as "OK " or "ERR ...: "). */
#define REPLY_MAX (LINE_MAX + 64)
#define OUT_MAX 8192

int have_vsock;
static struct vdev *vdev;
static struct virtq rxq, txq, evq;
static u8 qmem[3][VQ_MEM_SIZE] __attribute__((aligned(4096), section(".noinit")));
static u8 rxbuf[QSIZE][BUF_SIZE] __attribute__((aligned(4096), section(".noinit")));
static u8 txbuf[QSIZE][BUF_SIZE] __attribute__((aligned(4096), section(".noinit")));
static u32 evbuf[QSIZE];
/* Per-connection receive buffer: bytes the host sent that are not consumed yet. The credit we
   advertise (CONN_BUF_ALLOC, fwd_cnt = bytes consumed) bounds what it can hold. */
static u8 inbuf[NCONN][CONN_BUF_ALLOC] __attribute__((section(".noinit")));
static u64 guest_cid;
static u32 next_local_port = 49152;

enum { C_FREE, C_CONNECTING, C_OPEN };
struct conn {
    int state;
    u32 local_port, peer_port;
    u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt; /* credit towards the peer */
    u32 rx_cnt, fwd_sent;                     /* what we consumed / last told the peer */
    u32 in_head, in_len;                      /* unconsumed bytes in inbuf[] (a ring) */
    u32 line_len, out_len;
    int overflow;
    int dial_origin; /* >= 0: a DIAL connection whose first reply line goes to that connection */
    u32 origin_local, origin_peer; /* ... if it still is the one that asked (slots are reused) */
    int dial_wait;   /* a DIAL of this connection is in flight: its reply comes next */
    int shut_wr;     /* send SHUTDOWN(SEND) once `out` is sent (a DIAL after its text) */
    /* AGENT_PORT connections speak agent frames (u32 LE length, kind byte, payload): header
       bytes seen (0..5), the payload's length and the bytes of it consumed so far. */
    u32 fr_hdr, fr_len, fr_got;
    u8 fr_kind;
    char line[LINE_MAX];
    char out[OUT_MAX];
};
static struct conn conns[NCONN];

static void tx_reclaim(void) {
    u32 id, len;
    while (vq_pop(&txq, &id, &len))
        if (id < txq.size) vq_free_chain(&txq, (u16)id);
}

/* Sends one packet; spins (reclaiming) while the tx ring is full. */
static int send_pkt(u32 local_port, u32 peer_port, u16 op, u32 flags, const void *data, u32 len, struct conn *c) {
    int d;
    u64 t0 = rdtsc();
    for (;;) {
        tx_reclaim();
        d = vq_alloc(&txq);
        if (d >= 0) break;
        if (rdtsc() - t0 > 5000 * kt_tsc_per_ms) return -1;
        cpu_relax();
    }
    struct vsock_hdr *h = (struct vsock_hdr *)txbuf[d];
    if (kt_debug) kprintf("kt: vsock tx op=%u %u->%u len=%u desc=%u\n", (u64)op, (u64)local_port, (u64)peer_port, (u64)len, (u64)d);
    h->src_cid = guest_cid;
    h->dst_cid = HOST_CID;
    h->src_port = local_port;
    h->dst_port = peer_port;
    h->len = len;
    h->type = TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = CONN_BUF_ALLOC;
    h->fwd_cnt = c ? c->rx_cnt : 0;
    if (c) c->fwd_sent = c->rx_cnt;
    if (len) memcpy(txbuf[d] + HDR_SIZE, data, len);
    txq.desc[d].addr = (u64)txbuf[d];
    txq.desc[d].len = HDR_SIZE + len;
    txq.desc[d].flags = 0;
    vq_push(&txq, (u16)d);
    vq_notify(vdev, &txq, 1);
    return 0;
}

static void conn_free(struct conn *c) { c->state = C_FREE; }

static void conn_reset(struct conn *c) {
    send_pkt(c->local_port, c->peer_port, OP_RST, 0, NULL, 0, c);
    conn_free(c);
}

static void conn_flush(struct conn *c) {
    while (c->out_len && c->state == C_OPEN) {
        u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;
        u32 credit = c->peer_buf_alloc > in_flight ? c->peer_buf_alloc - in_flight : 0;
        if (!credit) return; /* resumed by the peer's next CREDIT_UPDATE */
        u32 n = c->out_len;
        if (n > credit) n = credit;
        if (n > BUF_SIZE - HDR_SIZE) n = BUF_SIZE - HDR_SIZE;
        if (send_pkt(c->local_port, c->peer_port, OP_RW, 0, c->out, n, c)) return;
        c->tx_cnt += n;
        memcpy(c->out, c->out + n, c->out_len - n);
        c->out_len -= n;
    }
    if (!c->out_len && c->shut_wr && c->state == C_OPEN && !send_pkt(c->local_port, c->peer_port, OP_SHUTDOWN, 2, NULL, 0, c))
        c->shut_wr = 0;
}

/* Queues reply bytes. Callers make room first (conn_process takes a request line only when a
   whole reply fits), so a full buffer is a bug here: the stream is reset, never cut. */
static void conn_write(struct conn *c, const char *s, usize n) {
    if (c->state != C_OPEN) return;
    if (c->out_len + n > OUT_MAX) {
        kprintf("kt: BUG: vsock reply does not fit (port %u); resetting the connection\n", (u64)c->local_port);
        conn_reset(c);
        return;
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += (u32)n;
    conn_flush(c);
}

static struct conn *find(u32 local, u32 peer) {
    for (int i = 0; i < NCONN; i++)
        if (conns[i].state != C_FREE && conns[i].local_port == local && conns[i].peer_port == peer) return &conns[i];
    return NULL;
}

static struct conn *alloc_conn(u32 local, u32 peer) {
    for (int i = 0; i < NCONN; i++)
        if (conns[i].state == C_FREE) {
            struct conn *c = &conns[i];
            memset(c, 0, sizeof(*c) - LINE_MAX - OUT_MAX);
            c->local_port = local;
            c->peer_port = peer;
            c->dial_origin = -1;
            return c;
        }
    return NULL;
}

static void reply_line(struct conn *c, const char *s) {
    conn_write(c, s, strlen(s));
    conn_write(c, "\n", 1);
}

/* The reply to the DIAL request that opened `dc` (once); the origin connection takes its next
   request after it. */
static void dial_done(struct conn *dc, const char *result) {
    int o = dc->dial_origin;
    if (o < 0 || o >= NCONN) return;
    dc->dial_origin = -1;
    struct conn *oc = &conns[o];
    if (oc->state != C_OPEN || oc->local_port != dc->origin_local || oc->peer_port != dc->origin_peer) return;
    oc->dial_wait = 0;
    reply_line(oc, result);
}

static char reply[REPLY_MAX];

static void on_line(struct conn *c) {
    c->line[c->line_len] = 0;
    if (c->line_len && c->line[c->line_len - 1] == '\r') c->line[c->line_len - 1] = 0;
    if (c->dial_origin >= 0) {
        /* Reply from the host to a DIAL: hand it back, then close this connection. */
        ksnprintf(reply, sizeof reply, "OK %s", c->line);
        dial_done(c, reply);
        send_pkt(c->local_port, c->peer_port, OP_SHUTDOWN, 3, NULL, 0, c);
        conn_free(c);
        return;
    }
    if (c->overflow) {
        reply_line(c, "ERR line too long");
        return;
    }
    int idx = (int)(c - conns);
    int r = handle_command(c->line, reply, sizeof reply, idx);
    if (r) reply_line(c, reply);
    else c->dial_wait = 1; /* answered by dial_done() */
}

/* The smallest part of the kiln agent's protocol (agent/src/protocol.rs), on AGENT_PORT:
   `Health` gets an `Ok` frame with a HealthInfo JSON (the host's readiness probe), any other
   request an `Error` frame. */
#define AGENT_PORT 10000
#define FRAME_REPLY_MAX 256

static void agent_frame(struct conn *c, u8 kind, const char *json) {
    u32 n = (u32)strlen(json);
    char hdr[5] = {(char)(n & 0xff), (char)((n >> 8) & 0xff), (char)((n >> 16) & 0xff), (char)(n >> 24), (char)kind};
    conn_write(c, hdr, 5);
    conn_write(c, json, n);
}

static void on_agent_request(struct conn *c) {
    if (c->fr_kind == 'H') {
        u64 g = 0;
        if (mmio_read32(GENID_BASE) == GENID_MAGIC) g = mmio_read64(GENID_BASE + GENID_GENERATION);
        ksnprintf(reply, sizeof reply, "{\"version\":\"kiln-testguest\",\"protocol\":2,\"generation\":%u,\"uptime_ms\":0}", g);
        agent_frame(c, 'K', reply);
    } else {
        agent_frame(c, '!', "{\"kind\":\"invalid\",\"message\":\"the kiln test guest answers only health requests\"}");
    }
}

static void agent_process(struct conn *c) {
    u8 *in = inbuf[c - conns];
    while (c->in_len && c->state == C_OPEN) {
        int last = (c->fr_hdr == 4 && c->fr_len == 0) || (c->fr_hdr == 5 && c->fr_got + 1 == c->fr_len);
        if (last && OUT_MAX - c->out_len < FRAME_REPLY_MAX) break; /* resumed by conn_flush */
        u8 b = in[c->in_head];
        c->in_head = (c->in_head + 1) % CONN_BUF_ALLOC;
        c->in_len--;
        c->rx_cnt++;
        if (c->fr_hdr < 4) {
            c->fr_len |= (u32)b << (8 * c->fr_hdr);
            c->fr_hdr++;
            continue;
        }
        if (c->fr_hdr == 4) {
            c->fr_kind = b;
            c->fr_hdr = 5;
            c->fr_got = 0;
        } else {
            c->fr_got++;
        }
        if (c->fr_got == c->fr_len) {
            on_agent_request(c);
            c->fr_hdr = c->fr_len = c->fr_got = 0;
        }
    }
    if (c->state == C_OPEN && c->rx_cnt - c->fwd_sent > CONN_BUF_ALLOC / 2)
        send_pkt(c->local_port, c->peer_port, OP_CREDIT_UPDATE, 0, NULL, 0, c);
}

/* Consumes received bytes up to the first request whose reply has no room yet. What stays in
   inbuf[] is not counted in fwd_cnt, so once it fills the host stops sending: a peer that does
   not read our replies stalls its own requests instead of losing replies. */
static void conn_process(struct conn *c) {
    if (c->local_port == AGENT_PORT && c->dial_origin < 0) {
        agent_process(c);
        return;
    }
    u8 *in = inbuf[c - conns];
    while (c->in_len && c->state == C_OPEN && !c->dial_wait) {
        u8 b = in[c->in_head];
        if (b == '\n' && OUT_MAX - c->out_len < REPLY_MAX + 1) break; /* resumed by conn_flush */
        c->in_head = (c->in_head + 1) % CONN_BUF_ALLOC;
        c->in_len--;
        c->rx_cnt++;
        if (b == '\n') {
            on_line(c);
            c->line_len = 0;
            c->overflow = 0;
        } else if (c->line_len < LINE_MAX - 1) {
            c->line[c->line_len++] = (char)b;
        } else {
            c->overflow = 1;
        }
    }
    /* The window reopened by half: tell the peer before it stalls. */
    if (c->state == C_OPEN && c->rx_cnt - c->fwd_sent > CONN_BUF_ALLOC / 2)
        send_pkt(c->local_port, c->peer_port, OP_CREDIT_UPDATE, 0, NULL, 0, c);
}

static void on_data(struct conn *c, const u8 *p, u32 n) {
    if (n > CONN_BUF_ALLOC - c->in_len) {
        /* More than the credit we gave: the stream cannot be kept whole, so end it. */
        kprintf("kt: vsock peer overran its credit (port %u); resetting the connection\n", (u64)c->local_port);
        dial_done(c, "ERR dial: protocol error");
        conn_reset(c);
        return;
    }
    u8 *in = inbuf[c - conns];
    for (u32 i = 0; i < n; i++) in[(c->in_head + c->in_len + i) % CONN_BUF_ALLOC] = p[i];
    c->in_len += n;
    conn_process(c);
}

static void on_packet(const u8 *buf, u32 len) {
    if (len < HDR_SIZE) return;
    const struct vsock_hdr *h = (const struct vsock_hdr *)buf;
    if (kt_debug)
        kprintf("kt: vsock rx op=%u %u->%u len=%u\n", (u64)h->op, (u64)h->src_port, (u64)h->dst_port, (u64)h->len);
    if (h->type != TYPE_STREAM || h->dst_cid != guest_cid) return;
    u32 plen = h->len;
    if (plen > len - HDR_SIZE) plen = len - HDR_SIZE;
    struct conn *c = find(h->dst_port, h->src_port);
    if (c) {
        c->peer_buf_alloc = h->buf_alloc;
        c->peer_fwd_cnt = h->fwd_cnt;
    }
    switch (h->op) {
    case OP_REQUEST:
        if (c) return; /* duplicate */
        c = alloc_conn(h->dst_port, h->src_port);
        if (!c) {
            send_pkt(h->dst_port, h->src_port, OP_RST, 0, NULL, 0, NULL);
            return;
        }
        c->peer_buf_alloc = h->buf_alloc;
        c->peer_fwd_cnt = h->fwd_cnt;
        c->state = C_OPEN;
        send_pkt(c->local_port, c->peer_port, OP_RESPONSE, 0, NULL, 0, c);
        return;
    case OP_RESPONSE:
        if (!c || c->state != C_CONNECTING) {
            send_pkt(h->dst_port, h->src_port, OP_RST, 0, NULL, 0, NULL);
            return;
        }
        c->state = C_OPEN;
        conn_flush(c); /* the DIAL text queued while connecting */
        return;
    case OP_RW:
        if (!c || c->state != C_OPEN) {
            send_pkt(h->dst_port, h->src_port, OP_RST, 0, NULL, 0, NULL);
            return;
        }
        on_data(c, buf + HDR_SIZE, plen);
        return;
    case OP_CREDIT_UPDATE:
        if (c) conn_flush(c);
        return;
    case OP_CREDIT_REQUEST:
        if (c) send_pkt(c->local_port, c->peer_port, OP_CREDIT_UPDATE, 0, NULL, 0, c);
        return;
    case OP_SHUTDOWN:
        if (!c) return;
        send_pkt(c->local_port, c->peer_port, OP_RST, 0, NULL, 0, c);
        dial_done(c, "ERR dial: closed by host");
        conn_free(c);
        return;
    case OP_RST:
        if (!c) return;
        dial_done(c, "ERR dial: refused");
        conn_free(c);
        return;
    default:
        if (c) {
            dial_done(c, "ERR dial: protocol error");
            conn_reset(c);
        }
    }
}

int vsock_dial(u32 port, const char *text, int origin) {
    struct conn *c = alloc_conn(next_local_port++, port);
    if (next_local_port == 0) next_local_port = 49152;
    if (!c) return -1;
    c->state = C_CONNECTING;
    c->dial_origin = origin;
    c->origin_local = conns[origin].local_port;
    c->origin_peer = conns[origin].peer_port;
    usize n = strlen(text);
    if (n > OUT_MAX - 1) n = OUT_MAX - 1;
    memcpy(c->out, text, n);
    c->out[n] = '\n';
    c->out_len = (u32)n + 1;
    c->shut_wr = 1; /* the host reads the text to its end, then answers */
    if (send_pkt(c->local_port, c->peer_port, OP_REQUEST, 0, NULL, 0, c)) {
        conn_free(c);
        return -1;
    }
    return 0;
}

static void post_rx(u16 i) {
    rxq.desc[i].addr = (u64)rxbuf[i];
    rxq.desc[i].len = BUF_SIZE;
    rxq.desc[i].flags = VRING_DESC_F_WRITE;
    vq_push(&rxq, i);
}

static void post_ev(u16 i) {
    evq.desc[i].addr = (u64)&evbuf[i];
    evq.desc[i].len = 4;
    evq.desc[i].flags = VRING_DESC_F_WRITE;
    vq_push(&evq, i);
}

static void read_cid(void) {
    u64 cfg = vdev->base + VIRTIO_MMIO_CONFIG;
    guest_cid = (u64)mmio_read32(cfg) | ((u64)mmio_read32(cfg + 4) << 32);
}

void vsock_probe(struct vdev *d) {
    if (have_vsock) return;
    vdev = d;
    if (vdev_init(d, 0) || vq_setup(d, &rxq, 0, qmem[0], QSIZE) || vq_setup(d, &txq, 1, qmem[1], QSIZE) ||
        vq_setup(d, &evq, 2, qmem[2], QSIZE))
        return;
    read_cid();
    /* rx and event buffers are pre-posted; descriptor i always owns buffer i. */
    for (u16 i = 0; i < rxq.size; i++) post_rx((u16)vq_alloc(&rxq));
    for (u16 i = 0; i < evq.size && i < 4; i++) post_ev((u16)vq_alloc(&evq));
    vdev_driver_ok(d);
    vq_notify(d, &rxq, 0);
    vq_notify(d, &evq, 2);
    have_vsock = 1;
    kprintf("kt: virtio-vsock at 0x%x: cid %u\n", d->base, guest_cid);
}

int vsock_poll(void) {
    u32 id, len;
    int reposted = 0, progress = 0;
    while (vq_pop(&rxq, &id, &len)) {
        if (id >= rxq.size) continue; /* a device bug; never index out of bounds */
        if (len > BUF_SIZE) len = BUF_SIZE;
        on_packet(rxbuf[id], len);
        post_rx((u16)id);
        reposted = 1;
    }
    if (reposted) vq_notify(vdev, &rxq, 0);
    /* Credit may have come with any packet (not only CREDIT_UPDATE): send what it allows, then
       take the requests that were waiting for room for their replies. */
    for (int i = 0; i < NCONN; i++) {
        struct conn *c = &conns[i];
        if (c->state != C_OPEN) continue;
        u32 out = c->out_len, in = c->in_len;
        if (out || c->shut_wr) conn_flush(c);
        if (c->in_len) conn_process(c);
        if (c->out_len != out || c->in_len != in) progress = 1;
    }
    int ev = 0, reset = 0;
    while (vq_pop(&evq, &id, &len)) {
        if (id >= evq.size) continue;
        if (evbuf[id] == 0) { /* VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, e.g. after a snapshot restore */
            for (int i = 0; i < NCONN; i++) conns[i].state = C_FREE;
            read_cid();
            reset = 1;
        }
        post_ev((u16)id);
        ev = 1;
    }
    if (ev) vq_notify(vdev, &evq, 2);
    /* After the repost: the host holds new connections until it sees it, and a serial line
       costs an exit per byte. */
    if (reset) kprintf("kt: vsock transport reset, cid %u\n", guest_cid);
    tx_reclaim();
    return reposted || ev || progress;
}
