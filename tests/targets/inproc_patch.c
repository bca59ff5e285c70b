/* inproc_patch.c - replaces compute() of inproc_lib.c: 100x + 20 (2020 for 20). */
long compute(long x) { return 100 * x + 20; }
