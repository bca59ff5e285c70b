/* forkserver_patch.c - replaces compute() of forkserver.c: n + 100. */
long compute(long n) { return n + 100; }
