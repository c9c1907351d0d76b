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
#include <stdint.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    uint64_t low64;
    uint64_t high64;
} pf_hash128;

typedef pf_hash128 (*pf_xxh3_128)(const void *data, size_t len);

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
