/* protocols_patch.c - the fixed versions of every function of protocols.c: old value + 1000. */
long f_ms(long x) { return x + 1001; }
long f_pfe(long x) { return x + 1002; }
long f_opp(long x) { return x + 1003; }
long f_ord(long x) { return x + 1004; }
