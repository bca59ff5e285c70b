/* parked_patch.c - replaces parked() of parked.c: returns seconds + 100. */
long parked(long seconds) { return seconds + 100; }
