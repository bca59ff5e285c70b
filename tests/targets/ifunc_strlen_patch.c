/* ifunc_strlen_patch.c - replaces libc's strlen: 4242 for a string starting "@?", else the original. */
#include <hotpatch.h>
#include <stddef.h>

size_t strlen(const char *s) {
    if (s[0] == '@' && s[1] == '?') return 4242;
    return HOTPATCH_ORIGINAL(strlen)(s);
}
