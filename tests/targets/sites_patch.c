/* sites_patch.c - replaces plain() of sites.c: 3*x + 1 becomes 1000*x + 1. */
long plain(long x) { return 1000 * x + 1; }
