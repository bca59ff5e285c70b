/* clone_copy_patch.c - replaces compute() of clone_copy.c: 7n + 1000. */
long compute(long x) { return x * 7 + 1000; }
