/* Freestanding runtime: memory/string helpers, serial output, formatting, hashing. */
#include "kt.h"

void *memset(void *d, int c, usize n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}
void *memcpy(void *d, const void *s, usize n) {
    u8 *a = d;
    const u8 *b = s;
    while (n--) *a++ = *b++;
    return d;
}
int memcmp(const void *x, const void *y, usize n) {
    const u8 *a = x, *b = y;
    for (usize i = 0; i < n; i++)
        if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
    return 0;
}
usize strlen(const char *s) {
    usize n = 0;
    while (s[n]) n++;
    return n;
}
int str_eq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}
int starts_with(const char *s, const char *p) {
    while (*p)
        if (*s++ != *p++) return 0;
    return 1;
}

/* The VMM's 8250 always accepts bytes, so the line status register is not polled: each poll
   would be one more VM exit per character. */
void putc_serial(char c) { outb(0x3f8, (u8)c); }
void puts_serial(const char *s) {
    while (*s) putc_serial(*s++);
}

static usize fmt_u64(char *tmp, u64 v, int base) {
    usize n = 0;
    do {
        u64 d = v % base;
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    return n;
}

struct sink { char *buf; usize cap, len; int serial; };
static void sink_put(struct sink *s, char c) {
    if (s->serial) {
        putc_serial(c);
        return;
    }
    if (s->len + 1 < s->cap) s->buf[s->len] = c;
    s->len++;
}

static void vformat(struct sink *s, const char *fmt, __builtin_va_list ap) {
    char tmp[24];
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            sink_put(s, *fmt);
            continue;
        }
        fmt++;
        switch (*fmt) {
        case 's': {
            const char *str = __builtin_va_arg(ap, const char *);
            while (*str) sink_put(s, *str++);
            break;
        }
        case 'u':
        case 'x': {
            u64 v = __builtin_va_arg(ap, u64);
            usize n = fmt_u64(tmp, v, *fmt == 'u' ? 10 : 16);
            while (n) sink_put(s, tmp[--n]);
            break;
        }
        case 'c': sink_put(s, (char)__builtin_va_arg(ap, int)); break;
        case '%': sink_put(s, '%'); break;
        case 0: return;
        default: sink_put(s, '?');
        }
    }
}

void kprintf(const char *fmt, ...) {
    struct sink s = {0, 0, 0, 1};
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vformat(&s, fmt, ap);
    __builtin_va_end(ap);
}

usize ksnprintf(char *buf, usize cap, const char *fmt, ...) {
    struct sink s = {buf, cap, 0, 0};
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vformat(&s, fmt, ap);
    __builtin_va_end(ap);
    if (cap) buf[s.len < cap ? s.len : cap - 1] = 0;
    return s.len < cap ? s.len : cap - 1;
}

void print_u64(u64 v) { kprintf("%u", v); }
void print_hex(u64 v) { kprintf("0x%x", v); }

int parse_u64(const char *s, usize len, u64 *out) {
    u64 v = 0;
    usize i = 0;
    int base = 10, digits = 0;
    if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        i = 2;
    }
    for (; i < len; i++) {
        char c = s[i];
        u64 d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (base == 16 && c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (base == 16 && c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else break;
        if (v > (~0UL - d) / base) return 0; /* overflow */
        v = v * base + d;
        digits++;
    }
    if (!digits) return 0;
    if (i < len) {
        u64 mul;
        switch (s[i]) {
        case 'k': case 'K': mul = 1UL << 10; break;
        case 'm': case 'M': mul = 1UL << 20; break;
        case 'g': case 'G': mul = 1UL << 30; break;
        default: return 0;
        }
        if (i + 1 != len || v > ~0UL / mul) return 0;
        v *= mul;
    }
    *out = v;
    return 1;
}

int split_words(char *line, char **words, int max) {
    int n = 0;
    char *p = line;
    while (*p && n < max) {
        while (*p == ' ' || *p == '\t') *p++ = 0;
        if (!*p) break;
        words[n++] = p;
        while (*p && *p != ' ' && *p != '\t') p++;
    }
    while (*p) { /* NUL-terminate the last word even when max was reached */
        if (*p == ' ' || *p == '\t') { *p = 0; break; }
        p++;
    }
    return n;
}

u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15UL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
    return x ^ (x >> 31);
}

/* A fast word-wise hash (one rotate, xor and multiply per 8 bytes). Not cryptographic: it only
   has to catch corruption, and be cheap enough to hash gigabytes of guest memory. */
u64 kt_hash_words(u64 h, const u64 *p, usize n) {
    for (usize i = 0; i < n; i++) {
        h = ((h << 5) | (h >> 59)) ^ p[i];
        h *= 0x100000001b3UL;
    }
    return h;
}
