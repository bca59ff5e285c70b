/* Replacement for raw_read: answers "patched" after 300 ms, so a revert finds a thread inside it. */
#include <string.h>
#include <unistd.h>

long raw_read(int fd, void *buf, unsigned long n) {
    (void)fd;
    usleep(300000);
    const char msg[] = "patched\n";
    unsigned long len = sizeof msg - 1 < n ? sizeof msg - 1 : n;
    memcpy(buf, msg, len);
    return (long)len;
}
