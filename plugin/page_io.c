/*
 * Page reads and hashes of a whole slice of pages per call, for plugin/native_pages.py.
 *
 * Called through ctypes, which releases the GIL for the call: a copy thread reads and checks
 * its whole slice of a chunk without handing the GIL back and forth twice per page. xxh3 is
 * the one python-xxhash was built with (its exported XXH3_128bits, passed in as a function
 * pointer), so digests are the store's by construction and no hash code is compiled here.
 * Plain C and libc only: no Python headers, so any C compiler builds it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define PF_STREAMING_STORES 1
#endif

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14; older kernels answer EINVAL */
#endif

typedef struct {
    uint64_t low64;
    uint64_t high64;
} pf_hash128;

typedef pf_hash128 (*pf_xxh3_128)(const void *data, size_t len);
/* xxh3-128's streaming API (python-xxhash exports it beside the one-shot function). */
typedef void *(*pf_state_new)(void);
typedef int (*pf_state_free)(void *state);
typedef int (*pf_state_reset)(void *state);
typedef int (*pf_state_update)(void *state, const void *data, size_t len);
typedef pf_hash128 (*pf_state_digest)(const void *state);

enum { PF_OK = 0, PF_NOT_READ = 1, PF_MISMATCH = 2 };

/* The canonical (big-endian) form python-xxhash's xxh3_128_digest returns. */
static void pf_canonical(pf_hash128 h, uint8_t out[16]) {
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(h.high64 >> (56 - 8 * i));
        out[8 + i] = (uint8_t)(h.low64 >> (56 - 8 * i));
    }
}

static int pf_read_full(int fd, uint8_t *dest, uint64_t nbytes, int64_t offset) {
    uint64_t done = 0;
    while (done < nbytes) {
        ssize_t got = pread(fd, dest + done, (size_t)(nbytes - done), (off_t)(offset + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return 0; /* an error, or the file ends before the page does */
        done += (uint64_t)got;
    }
    return 1;
}

/*
 * Read page i (page_bytes at offsets[i] of fd) into dests[i], for i < n. With expected (16
 * bytes per page, canonical xxh3-128), hash each page while it is still in the core's caches
 * and compare. status[i]: PF_OK; PF_NOT_READ (a negative offset, a short read or an error: the
 * caller copies that page another way); PF_MISMATCH (read, but not the page it should be).
 * Returns how many pages are not PF_OK.
 */
int64_t pf_read_pages(int fd, int64_t n, const int64_t *offsets, uint8_t *const *dests,
                      uint64_t page_bytes, const uint8_t *expected, pf_xxh3_128 hash,
                      uint8_t *status) {
    int64_t left = 0;
    for (int64_t i = 0; i < n; i++) {
        status[i] = PF_OK;
        if (offsets[i] < 0 || !pf_read_full(fd, dests[i], page_bytes, offsets[i])) {
            status[i] = PF_NOT_READ;
            left++;
            continue;
        }
        if (expected) {
            uint8_t digest[16];
            pf_canonical(hash(dests[i], (size_t)page_bytes), digest);
            if (memcmp(digest, expected + 16 * i, 16) != 0) {
                status[i] = PF_MISMATCH;
                left++;
            }
        }
    }
    return left;
}

/* The canonical xxh3-128 of pages[i] (page_bytes each) into out[16 * i ...], for i < n. */
void pf_hash_pages(int64_t n, const uint8_t *const *pages, uint64_t page_bytes,
                   pf_xxh3_128 hash, uint8_t *out) {
    for (int64_t i = 0; i < n; i++)
        pf_canonical(hash(pages[i], (size_t)page_bytes), out + 16 * i);
}

/* Bytes of a page hashed, then copied, at a time: small enough to stay in the core's L1/L2
 * between the two, large enough that the hash's per-call cost does not show. */
#define PF_PIECE (32u << 10)

/*
 * Copy n bytes with non-temporal stores where the CPU has them: the destination (pinned
 * staging memory the GPU reads by DMA) is not read by this core again, so the stores go
 * straight to memory, without first reading each destination line into the cache (a plain
 * memcpy's read-for-ownership: a third of a copy's memory traffic).
 */
static void pf_copy_out(uint8_t *dest, const uint8_t *src, size_t n, int stream) {
#ifdef PF_STREAMING_STORES
    if (stream && ((uintptr_t)dest & 15u) == 0) {
        size_t i = 0;
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dest + i), a);
            _mm_stream_si128((__m128i *)(dest + i + 16), b);
            _mm_stream_si128((__m128i *)(dest + i + 32), c);
            _mm_stream_si128((__m128i *)(dest + i + 48), d);
        }
        memcpy(dest + i, src + i, n - i);
        return;
    }
#endif
    memcpy(dest, src, n);
}

/* Map a page's part of the store's memory map in one call instead of a fault every few 4 KiB
 * pages (a fresh worker has never touched the map). Returns 0 once the kernel says it cannot
 * (before 5.14), and the caller stops asking; a page it cannot map faults in as it is read. */
static int pf_populate(const uint8_t *src, uint64_t nbytes, uintptr_t os_page) {
    uintptr_t lo = (uintptr_t)src & ~(os_page - 1);
    uintptr_t hi = ((uintptr_t)src + (uintptr_t)nbytes + os_page - 1) & ~(os_page - 1);
    if (madvise((void *)lo, (size_t)(hi - lo), MADV_POPULATE_READ) != 0 && errno == EINVAL)
        return 0;
    return 1;
}

/* Copy one page, each piece hashed (with state) just before it is copied; the page's status
 * against expected (its 16-byte digest; unchecked without state). */
static uint8_t pf_copy_page(const uint8_t *src, uint8_t *dest, uint64_t page_bytes, int stream,
                            void *state, pf_state_reset reset, pf_state_update update,
                            pf_state_digest digest, const uint8_t *expected) {
    if (state)
        reset(state);
    for (uint64_t at = 0; at < page_bytes; at += PF_PIECE) {
        size_t piece = (size_t)(page_bytes - at < PF_PIECE ? page_bytes - at : PF_PIECE);
        if (state)
            update(state, src + at, piece);
        pf_copy_out(dest + at, src + at, piece, stream);
    }
    if (!state)
        return PF_OK;
    uint8_t got[16];
    pf_canonical(digest(state), got);
    return memcmp(got, expected, 16) != 0 ? PF_MISMATCH : PF_OK;
}

/*
 * Copy page i from srcs[i] (the store's memory map) into dests[i], for i < n, each piece hashed
 * first and then copied out of the cache, so every byte is read from memory once and written
 * once (pread + hash: read, read for ownership, write, and the hash's read where the page has
 * left the cache). With expected, compare each page's digest (status PF_MISMATCH); without it,
 * the pages are copied only. Returns how many pages did not match, or -1 when the hash state
 * could not be allocated (nothing was copied).
 */
int64_t pf_copy_pages(int64_t n, const uint8_t *const *srcs, uint8_t *const *dests,
                      uint64_t page_bytes, const uint8_t *expected, int populate, int stream,
                      pf_state_new state_new, pf_state_free state_free,
                      pf_state_reset reset, pf_state_update update, pf_state_digest digest,
                      uint8_t *status) {
    void *state = NULL;
    if (expected) {
        state = state_new();
        if (!state)
            return -1;
    }
    uintptr_t os_page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (os_page == 0 || (os_page & (os_page - 1)) != 0)
        os_page = 4096;
    int64_t left = 0;
    for (int64_t i = 0; i < n; i++) {
        if (populate)
            populate = pf_populate(srcs[i], page_bytes, os_page);
        status[i] = pf_copy_page(srcs[i], dests[i], page_bytes, stream, state, reset, update,
                                 digest, expected ? expected + 16 * i : NULL);
        left += status[i] == PF_MISMATCH;
    }
#ifdef PF_STREAMING_STORES
    _mm_sfence(); /* the streamed pages are in memory before the caller hands them on */
#endif
    if (state)
        state_free(state);
    return left;
}

/*
 * A load's whole flow of pages into staging slots, run by copy threads that never return to
 * Python until every page is copied: per unit of work only a mutex is taken, not the GIL (with
 * 12 threads and a Python call per unit, the threads spent much of a load waiting for the GIL).
 *
 * Page p of the load goes to chunk p / chunk_pages, which is staged in slot (chunk % slots) at
 * row p % chunk_pages. Threads take units (unit_pages pages of one chunk) in order; a unit of
 * chunk c waits until the caller has released chunk c's slot (pf_flow_release: the device has
 * read the chunk that held it before). The caller waits for each chunk in turn
 * (pf_flow_wait_chunk) and hands it to the device. Pages are copied and checked as
 * pf_copy_pages does; status[p] says whether page p matched.
 *
 * The caller may start the threads before it knows every page's address: a unit waits until
 * its pages are published (pf_flow_publish), so the caller's lookups of later pages overlap
 * the copies of earlier ones. A page whose address is 0 (not in the store) is not read: its
 * status is PF_NOT_READ.
 */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int64_t pages, chunk_pages, slots, unit_pages, units_per_chunk, units, chunks;
    uint64_t page_bytes;
    const uint8_t *const *srcs;
    uint8_t *const *slot_bases;
    const uint8_t *expected;
    int populate, stream;
    pf_state_new state_new;
    pf_state_free state_free;
    pf_state_reset reset;
    pf_state_update update;
    pf_state_digest digest;
    uint8_t *status;
    int64_t next_unit;   /* the next unit a thread takes */
    int64_t allowed;     /* chunks below this may be filled */
    int64_t published;   /* pages below this have their addresses in srcs */
    int64_t *left;       /* units of each chunk not done yet */
    int cancelled;       /* 1: stop taking units; 2: a hash state could not be allocated */
} pf_flow;

pf_flow *pf_flow_new(int64_t pages, const uint8_t *const *srcs, uint64_t page_bytes,
                     const uint8_t *expected, int populate, int stream, int64_t chunk_pages,
                     int64_t slots, uint8_t *const *slot_bases, int64_t unit_pages,
                     pf_state_new state_new, pf_state_free state_free, pf_state_reset reset,
                     pf_state_update update, pf_state_digest digest, uint8_t *status,
                     int64_t published) {
    if (pages < 0 || chunk_pages < 1 || slots < 1 || unit_pages < 1)
        return NULL;
    if (published < 0 || published > pages)
        published = pages;
    pf_flow *f = malloc(sizeof(pf_flow));
    if (!f)
        return NULL;
    if (unit_pages > chunk_pages)
        unit_pages = chunk_pages;
    *f = (pf_flow){.pages = pages, .chunk_pages = chunk_pages, .slots = slots,
                   .unit_pages = unit_pages,
                   .units_per_chunk = (chunk_pages + unit_pages - 1) / unit_pages,
                   .chunks = (pages + chunk_pages - 1) / chunk_pages, .page_bytes = page_bytes,
                   .srcs = srcs, .slot_bases = slot_bases, .expected = expected,
                   .populate = populate, .stream = stream, .state_new = state_new,
                   .state_free = state_free, .reset = reset, .update = update,
                   .digest = digest, .status = status, .allowed = slots,
                   .published = published};
    f->units = f->chunks * f->units_per_chunk;
    f->left = calloc((size_t)(f->chunks ? f->chunks : 1), sizeof(int64_t));
    if (!f->left) {
        free(f);
        return NULL;
    }
    for (int64_t c = 0; c < f->chunks; c++) {
        int64_t in_chunk = pages - c * chunk_pages < chunk_pages ? pages - c * chunk_pages
                                                                 : chunk_pages;
        f->left[c] = (in_chunk + unit_pages - 1) / unit_pages;
    }
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->changed, NULL);
    return f;
}

/* Copy and check pages [lo, hi) of the load into their slot rows. */
static void pf_flow_unit(pf_flow *f, void *state, int *populate, uintptr_t os_page, int64_t lo,
                         int64_t hi) {
    int64_t chunk = lo / f->chunk_pages;
    uint8_t *base = f->slot_bases[chunk % f->slots];
    for (int64_t p = lo; p < hi; p++) {
        const uint8_t *src = f->srcs[p];
        uint8_t *dest = base + (uint64_t)(p - chunk * f->chunk_pages) * f->page_bytes;
        if (!src) {
            f->status[p] = PF_NOT_READ; /* not in the store: the caller fails its block */
            continue;
        }
        if (*populate)
            *populate = pf_populate(src, f->page_bytes, os_page);
        f->status[p] = pf_copy_page(src, dest, f->page_bytes, f->stream, state, f->reset,
                                    f->update, f->digest,
                                    f->expected ? f->expected + 16 * p : NULL);
    }
#ifdef PF_STREAMING_STORES
    _mm_sfence();
#endif
}

/* Take and run units until none is left or the flow is cancelled. */
void pf_flow_work(pf_flow *f) {
    void *state = NULL;
    if (f->expected) {
        state = f->state_new();
        if (!state) {
            pthread_mutex_lock(&f->lock);
            f->cancelled = 2;
            pthread_cond_broadcast(&f->changed);
            pthread_mutex_unlock(&f->lock);
            return;
        }
    }
    uintptr_t os_page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (os_page == 0 || (os_page & (os_page - 1)) != 0)
        os_page = 4096;
    int populate = f->populate;
    pthread_mutex_lock(&f->lock);
    for (;;) {
        if (f->cancelled || f->next_unit >= f->units)
            break;
        int64_t u = f->next_unit++;
        int64_t chunk = u / f->units_per_chunk;
        int64_t lo = chunk * f->chunk_pages + (u % f->units_per_chunk) * f->unit_pages;
        int64_t hi = lo + f->unit_pages;
        int64_t end = (chunk + 1) * f->chunk_pages;
        if (end > f->pages)
            end = f->pages;
        if (hi > end)
            hi = end;
        if (lo >= hi)
            continue; /* past the end of a short last chunk */
        while (!f->cancelled && (chunk >= f->allowed || hi > f->published))
            pthread_cond_wait(&f->changed, &f->lock);
        if (f->cancelled)
            break;
        pthread_mutex_unlock(&f->lock);
        pf_flow_unit(f, state, &populate, os_page, lo, hi);
        pthread_mutex_lock(&f->lock);
        if (--f->left[chunk] == 0)
            pthread_cond_broadcast(&f->changed);
    }
    pthread_mutex_unlock(&f->lock);
    if (state)
        f->state_free(state);
}

/* Wait until every unit of chunk c is done: 0, or -1 if the flow was cancelled first, -2 if a
 * hash state could not be allocated. */
int pf_flow_wait_chunk(pf_flow *f, int64_t c) {
    int result = 0;
    pthread_mutex_lock(&f->lock);
    while (!f->cancelled && f->left[c] > 0)
        pthread_cond_wait(&f->changed, &f->lock);
    if (f->left[c] > 0)
        result = f->cancelled == 2 ? -2 : -1;
    pthread_mutex_unlock(&f->lock);
    return result;
}

/* Pages below upto have their addresses in srcs. */
void pf_flow_publish(pf_flow *f, int64_t upto) {
    pthread_mutex_lock(&f->lock);
    if (upto > f->pages)
        upto = f->pages;
    if (upto > f->published) {
        f->published = upto;
        pthread_cond_broadcast(&f->changed);
    }
    pthread_mutex_unlock(&f->lock);
}

/* 1 if every unit of chunk c is done, without waiting. */
int pf_flow_chunk_done(pf_flow *f, int64_t c) {
    pthread_mutex_lock(&f->lock);
    int done = f->left[c] == 0;
    pthread_mutex_unlock(&f->lock);
    return done;
}

/* Chunks below c + 1 may be filled (their slots are free). */
void pf_flow_release(pf_flow *f, int64_t c) {
    pthread_mutex_lock(&f->lock);
    if (c + 1 > f->allowed) {
        f->allowed = c + 1;
        pthread_cond_broadcast(&f->changed);
    }
    pthread_mutex_unlock(&f->lock);
}

/* Stop: threads finish the unit they copy and take no more. */
void pf_flow_cancel(pf_flow *f) {
    pthread_mutex_lock(&f->lock);
    if (!f->cancelled)
        f->cancelled = 1;
    pthread_cond_broadcast(&f->changed);
    pthread_mutex_unlock(&f->lock);
}

void pf_flow_free(pf_flow *f) {
    if (!f)
        return;
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->changed);
    free(f->left);
    free(f);
}
