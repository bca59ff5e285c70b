/* protocols.c - 8 threads call one function of each site class in tight loops while tests/test_protocols.py
 * applies and reverts a patch of them with each protocol (DESIGN.md §4):
 *
 *   f_ms(x)    ms_hook_prologue (lea 0(%rsp),%rsp after int3 padding)   old: x + 1   patched: x + 1001
 *   f_pfe(x)   patchable_function_entry(16,14): 14 NOPs, then 90 90      old: x + 2   patched: x + 1002
 *   f_opp(x)   plain, after a function that ends in ret (opportunistic)  old: x + 3   patched: x + 1003
 *   f_ord(x)   assembly, entered by falling through from ord_prev (ordinary: no padding, no dead bytes
 *              before it; the 5-byte jump covers `lea 4(%rdi),%rax; ret`, on i386 `mov 4(%esp),%eax;
 *              add $4,%eax`)                                                   old: x + 4   patched: x + 1004
 *   ord_prev(x) adds 10 and falls into f_ord (as glibc's __memmove_chk falls into memmove)
 *                                                                        old: x + 14  patched: x + 1014
 *
 * Built with gcc -m32 it is the i386 target of tests/test_i386_patching.py: f_ms then starts with
 * `mov edi,edi` (class ms-x86, seeds 001/002) and `long` is 32 bits wide (the values wrap per thread).
 *
 * Every result is checked: anything but the old or new value prints "WRONG ..." on stderr and exits 3. The
 * worker threads run at nice 19 so the tool keeps up on a 2-core machine (see concurrency.cc).
 * stdout: "ready" once all threads run; stdin: "stats" prints "stats old=N new=N", "quit"/EOF exits 0.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NOCLONE __attribute__((noinline, noipa))

__attribute__((ms_hook_prologue)) NOCLONE long f_ms(long x) { return x + 1; }
__attribute__((patchable_function_entry(16, 14))) NOCLONE long f_pfe(long x) { return x + 2; }
NOCLONE long before_opp(long x) { return x * 5; }
NOCLONE long f_opp(long x) { return x + 3; }
long ord_prev(long x);
long f_ord(long x);
#ifdef __i386__
#define ORD_PREV "addl $10, 4(%esp)"
#define ORD_BODY "movl 4(%esp), %eax\n\taddl $4, %eax"
#else
#define ORD_PREV "add $10, %rdi"
#define ORD_BODY "lea 4(%rdi), %rax"
#endif
__asm__(".text\n.p2align 4\n.globl ord_prev\n.type ord_prev,@function\nord_prev:\n\t" ORD_PREV "\n"
        ".size ord_prev, .-ord_prev\n.globl f_ord\n.type f_ord,@function\nf_ord:\n\t" ORD_BODY "\n\tret\n"
        ".size f_ord, .-f_ord\n");

enum { THREADS = 8, NEW = 1000, FNS = 5 };
static long (*const fns[FNS])(long) = {f_ms, f_pfe, f_opp, f_ord, ord_prev};
static const long old_add[FNS] = {1, 2, 3, 4, 14};
static _Atomic long long olds, news;  /* 64-bit counts on i386 too */
static atomic_int stop, running;

static void *worker(void *arg) {
    long id = (long)arg;
    long long o = 0, n = 0;
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);
    atomic_fetch_add(&running, 1);
    for (unsigned long c = 0; !atomic_load_explicit(&stop, memory_order_relaxed); c++) {
        long i = (long)((unsigned long)id << (sizeof(long) * 8 - 8) | (c & 0xFFFFFF));  /* no overflow */
        for (int k = 0; k < FNS; k++) {
            long v = fns[k](i);
            if (v == i + old_add[k]) o++;
            else if (v == i + old_add[k] + NEW) n++;
            else {
                fprintf(stderr, "WRONG f%d(%ld) = %ld in thread %ld\n", k, i, v, id);
                _exit(3);
            }
        }
        if ((c & 1023) == 0) {
            atomic_fetch_add_explicit(&olds, o, memory_order_relaxed);
            atomic_fetch_add_explicit(&news, n, memory_order_relaxed);
            o = n = 0;
        }
    }
    return NULL;
}

int main(void) {
    pthread_t t[THREADS];
    if (before_opp(1) != 5) abort();
    for (long i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    while (atomic_load(&running) < THREADS) usleep(1000);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "quit", 4) != 0) {
        if (strncmp(line, "stats", 5) == 0) {
            printf("stats old=%lld new=%lld\n", atomic_load(&olds), atomic_load(&news));
            fflush(stdout);
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    return 0;
}
