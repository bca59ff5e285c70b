/* A thread blocked in a read(2) whose `syscall` instruction lies inside the first 5 bytes of the function
 * being patched: hotpatch must move it into the trampoline (research §4.3: RIP-2 is inside, the kernel will
 * rewind onto the copied `syscall`). raw_read is `xor eax,eax; syscall; ret` (5 bytes). */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

__asm__(".text\n.globl raw_read\n.type raw_read,@function\n.p2align 4\n"
        "raw_read:\n\txor %eax,%eax\n\tsyscall\n\tret\n.size raw_read, .-raw_read\n");
long raw_read(int fd, void *buf, unsigned long n);

static void *reader(void *arg) {
    (void)arg;
    char buf[128];
    for (;;) {
        long n = raw_read(0, buf, sizeof buf - 1);
        if (n <= 0) {
            printf("eof %ld\n", n);
            fflush(stdout);
            _exit(n == 0 ? 0 : 4);
        }
        buf[n] = 0;
        buf[strcspn(buf, "\n")] = 0;
        printf("read: %s\n", buf);
        fflush(stdout);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, reader, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_join(t, NULL);
    return 0;
}
