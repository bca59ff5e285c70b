/* inproc_lib.c - a library a Python process loads with ctypes and patches in itself (hotpatch.self).
 *
 * compute(x) = 2x + 1. start_spinners(n) starts n detached threads calling compute(20) in a tight loop; a
 * result other than 41 or 2020 (the patch's) is counted in bad_count(). twice(x) starts with several short
 * instructions (it calls compute), so no single store can redirect it. op points at compute, for a raw data
 * change; negate(x) is what a test points it at.
 */
#include <pthread.h>

static volatile long bad;

__attribute__((noinline)) long compute(long x) { return 2 * x + 1; }

__attribute__((noinline)) long twice(long x) { return compute(x) * compute(x + 1) + x; }

long negate(long x) { return -x; }

long (*volatile op)(long) = compute;

static void *spin(void *arg) {
    (void)arg;
    for (;;) {
        long v = compute(20);
        if (v != 41 && v != 2020) bad++;
    }
    return 0;
}

void start_spinners(int n) {
    for (int i = 0; i < n; i++) {
        pthread_t t;
        pthread_create(&t, 0, spin, 0);
        pthread_detach(t);
    }
}

long bad_count(void) { return bad; }
