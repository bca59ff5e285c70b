/* kill_blocked.c - a thread blocked in a system call inside the bytes a jump would overwrite (tests/test_kill.py).
 *
 * wait_here() is assembly whose first 6 bytes are `xor %eax,%eax; mov $34,%al; syscall` (pause), then `ret`:
 * a thread blocked in it stops with RIP at entry+6 and, since pause restarts, RIP-2 inside the overwritten
 * bytes, so hotpatch must move it into the trampoline before the jump is written. The waiter thread calls
 * wait_here() forever and prints "woke R" (R: what it returned; -4 is EINTR from the raw syscall) each time a
 * SIGUSR1 ends the pause; SIGUSR1 is blocked in every other thread.
 *
 * Start: "addr wait_here 0x..", "waiter TID", "ready"; end of stdin exits with status 0.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

int wait_here(void);

__asm__(
    "    .text\n"
    "    .globl wait_here\n"
    "    .type wait_here, @function\n"
    "    .p2align 4\n"
    "wait_here:\n"
    "    xorl %eax, %eax\n"
    "    movb $34, %al\n" /* __NR_pause */
    "    syscall\n"
    "    ret\n"
    "    .size wait_here, .-wait_here\n");

static void on_usr1(int sig) { (void)sig; }

static void *waiter(void *arg) {
    (void)arg;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
    printf("waiter %ld\n", (long)syscall(SYS_gettid));
    for (;;)
        printf("woke %d\n", wait_here());
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    printf("addr wait_here %p\n", (void *)wait_here);
    pthread_t t;
    if (pthread_create(&t, NULL, waiter, NULL) != 0)
        return 2;
    usleep(10000);
    printf("ready\n");
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}
