/* virtio-mmio (version 2) device setup and split virtqueues, polled (no interrupts). */
#include "kt.h"

static u32 rd(struct vdev *d, u32 off) { return mmio_read32(d->base + off); }
static void wr(struct vdev *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

u32 vdev_status(struct vdev *d) { return rd(d, VIRTIO_MMIO_STATUS); }

void vdev_reset(struct vdev *d) {
    wr(d, VIRTIO_MMIO_STATUS, 0);
    /* The device finishes the reset before the register reads back 0 (spec 4.2.2.1). */
    for (u64 i = 0; i < 1000000 && rd(d, VIRTIO_MMIO_STATUS) != 0; i++) cpu_relax();
}

int vdev_init(struct vdev *d, u32 want_low) {
    d->ok = 0;
    if (rd(d, VIRTIO_MMIO_MAGIC) != 0x74726976 || rd(d, VIRTIO_MMIO_VERSION) != 2) {
        kprintf("kt: virtio at 0x%x: not a modern virtio-mmio device\n", d->base);
        return -1;
    }
    vdev_reset(d);
    wr(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACK);
    wr(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
    wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u32 lo = rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
    wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u32 hi = rd(d, VIRTIO_MMIO_DEVICE_FEATURES);
    if (!(hi & 1)) { /* VIRTIO_F_VERSION_1 */
        kprintf("kt: virtio at 0x%x: no VERSION_1\n", d->base);
        wr(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
        return -1;
    }
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, lo & want_low);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(rd(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        kprintf("kt: virtio at 0x%x: features rejected\n", d->base);
        wr(d, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_FAILED);
        return -1;
    }
    return 0;
}

int vq_setup(struct vdev *d, struct virtq *q, u32 qi, void *mem, u16 max_size) {
    wr(d, VIRTIO_MMIO_QUEUE_SEL, qi);
    u32 max = rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0) {
        kprintf("kt: virtio at 0x%x: queue %u unavailable\n", d->base, (u64)qi);
        return -1;
    }
    u32 size = VQ_MAX;
    if (size > max_size) size = max_size;
    while (size > max) size >>= 1; /* split rings: keep a power of two */
    memset(mem, 0, VQ_MEM_SIZE);
    q->size = (u16)size;
    q->desc = (struct vring_desc *)mem;
    q->avail = (struct vring_avail *)((u8 *)mem + 4096);
    q->used = (struct vring_used *)((u8 *)mem + 8192);
    q->last_used = 0;
    q->avail_shadow = 0;
    q->event_idx = 0;
    q->kicked = 0;
    for (u32 i = 0; i < size; i++) q->desc[i].next = (u16)(i + 1);
    q->free_head = 0;
    q->num_free = (u16)size;
    /* Polled driver: ask the device not to interrupt (it may still do so). */
    q->avail->flags = 1;
    wr(d, VIRTIO_MMIO_QUEUE_NUM, size);
    u64 da = (u64)q->desc, aa = (u64)q->avail, ua = (u64)q->used;
    wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)da);
    wr(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(da >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)aa);
    wr(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)(aa >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)ua);
    wr(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)(ua >> 32));
    wr(d, VIRTIO_MMIO_QUEUE_READY, 1);
    return 0;
}

void vdev_driver_ok(struct vdev *d) {
    wr(d, VIRTIO_MMIO_STATUS,
       VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
    d->ok = 1;
}

int vq_alloc(struct virtq *q) {
    if (!q->num_free) return -1;
    u16 i = q->free_head;
    q->free_head = q->desc[i].next;
    q->num_free--;
    q->desc[i].flags = 0;
    q->desc[i].next = 0;
    return i;
}

void vq_free_chain(struct virtq *q, u16 head) {
    u16 i = head;
    for (u32 guard = 0; guard < q->size; guard++) {
        u16 next = q->desc[i].next;
        int more = q->desc[i].flags & VRING_DESC_F_NEXT;
        q->desc[i].next = q->free_head;
        q->desc[i].flags = 0;
        q->free_head = i;
        q->num_free++;
        if (!more) break;
        i = next;
    }
}

void vq_push(struct virtq *q, u16 head) {
    q->avail->ring[q->avail_shadow % q->size] = head;
    barrier(); /* x86 keeps stores in order: the ring entry is visible before the index */
    q->avail_shadow++;
    *(volatile u16 *)&q->avail->idx = q->avail_shadow;
}

/* With EVENT_IDX the device publishes avail_event after the used ring: kick only when the
   chains published since the last kick pass it (the device is otherwise still working through
   the ring and will see them). Every kick is a VM exit, which is expensive on PVM hosts. */
void vq_notify(struct vdev *d, struct virtq *q, u32 qi) {
    mb();
    if (q->event_idx) {
        u16 ev = *(volatile u16 *)((u8 *)q->used + 4 + 8 * (u64)q->size);
        u16 old = q->kicked, now = q->avail_shadow;
        q->kicked = now;
        if ((u16)(now - ev - 1) >= (u16)(now - old)) return;
    } else if (*(volatile u16 *)&q->used->flags & 1) return; /* VRING_USED_F_NO_NOTIFY */
    wr(d, VIRTIO_MMIO_QUEUE_NOTIFY, qi);
}

void vq_set_used_event(struct virtq *q, u16 idx) {
    *(volatile u16 *)((u8 *)q->avail + 4 + 2 * (u64)q->size) = idx;
}

int vq_pop(struct virtq *q, u32 *id, u32 *len) {
    u16 idx = *(volatile u16 *)&q->used->idx;
    if (idx == q->last_used) return 0;
    barrier();
    struct vring_used_elem *e = &q->used->ring[q->last_used % q->size];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}
