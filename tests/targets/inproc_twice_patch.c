/* inproc_twice_patch.c - replaces twice() of inproc_lib.c. */
long twice(long x) { return x; }
