/*
 * ca_get_latency: Channel Access get round-trip latency, measured by a native
 * libca client.
 *
 * Usage: ca_get_latency PV N WARMUP [SAMPLES_FILE]
 *
 * Connects one channel (ca_create_channel + ca_pend_io), performs WARMUP
 * untimed gets, then N timed round trips, one at a time: ca_array_get of one
 * DBR_DOUBLE followed by ca_pend_io, which flushes the request and waits for
 * the reply. Each round trip is timed with CLOCK_MONOTONIC.
 *
 * Prints one line of key=value pairs (times in microseconds):
 *   pv=... n=... warmup=... connect_us=... first_get_us=... total_us=...
 *   min_us=... median_us=... p90_us=... p99_us=... max_us=... mean_us=...
 * connect_us is ca_context_create + channel connection (name resolution and
 * TCP circuit setup), first_get_us is the first get (warmup or timed),
 * total_us is from the start of main to the end of the first get.
 * With SAMPLES_FILE, every timed round trip (ns) is written there, one a line.
 *
 * The process exits non-zero if the channel does not connect or a get fails.
 *
 * Build (EPICS base headers and libca/libCom, e.g. from the epicscorelibs
 * Python package):
 *   gcc -O2 bench/ca_get_latency.c -I$EPICS/include -L$EPICS/lib \
 *       -lca -lCom -Wl,-rpath,$EPICS/lib -o ca_get_latency
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cadef.h>

#define TIMEOUT_S 5.0

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array, p in [0, 100]. */
static uint64_t percentile(const uint64_t *v, size_t n, double p)
{
    size_t rank;
    if (n == 0)
        return 0;
    rank = (size_t)((p / 100.0) * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return v[rank - 1];
}

static double median(const uint64_t *v, size_t n)
{
    if (n == 0)
        return 0.0;
    if (n % 2)
        return (double)v[n / 2];
    return ((double)v[n / 2 - 1] + (double)v[n / 2]) / 2.0;
}

static long parse_count(const char *s, const char *what)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < 0) {
        fprintf(stderr, "ca_get_latency: bad %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static int one_get(chid ch, double *value)
{
    int st = ca_array_get(DBR_DOUBLE, 1, ch, value);
    if (st != ECA_NORMAL) {
        fprintf(stderr, "ca_get_latency: ca_array_get: %s\n", ca_message(st));
        return -1;
    }
    st = ca_pend_io(TIMEOUT_S);
    if (st != ECA_NORMAL) {
        fprintf(stderr, "ca_get_latency: get: %s\n", ca_message(st));
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *pv;
    long n, warmup, i;
    uint64_t t_start, t_conn, t_first = 0, t0, t1;
    uint64_t *samples;
    double value = 0.0, sum = 0.0;
    chid ch;
    int st;

    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s PV N WARMUP [SAMPLES_FILE]\n", argv[0]);
        return 2;
    }
    pv = argv[1];
    n = parse_count(argv[2], "N");
    warmup = parse_count(argv[3], "WARMUP");
    if (n < 1) {
        fprintf(stderr, "ca_get_latency: N must be at least 1\n");
        return 2;
    }
    samples = calloc((size_t)n, sizeof *samples);
    if (!samples) {
        perror("calloc");
        return 1;
    }

    t_start = now_ns();
    st = ca_context_create(ca_disable_preemptive_callback);
    if (st != ECA_NORMAL) {
        fprintf(stderr, "ca_get_latency: ca_context_create: %s\n", ca_message(st));
        return 1;
    }
    st = ca_create_channel(pv, NULL, NULL, CA_PRIORITY_DEFAULT, &ch);
    if (st != ECA_NORMAL) {
        fprintf(stderr, "ca_get_latency: ca_create_channel: %s\n", ca_message(st));
        return 1;
    }
    st = ca_pend_io(TIMEOUT_S);
    if (st != ECA_NORMAL || ca_state(ch) != cs_conn) {
        fprintf(stderr, "ca_get_latency: %s did not connect: %s\n", pv, ca_message(st));
        return 1;
    }
    t_conn = now_ns();

    for (i = 0; i < warmup; i++) {
        if (one_get(ch, &value))
            return 1;
        if (i == 0)
            t_first = now_ns();
    }
    for (i = 0; i < n; i++) {
        t0 = now_ns();
        if (one_get(ch, &value))
            return 1;
        t1 = now_ns();
        samples[i] = t1 - t0;
        if (i == 0 && warmup == 0)
            t_first = t1;
    }

    if (argc == 5) {
        FILE *f = fopen(argv[4], "w");
        if (!f) {
            perror(argv[4]);
            return 1;
        }
        for (i = 0; i < n; i++)
            fprintf(f, "%llu\n", (unsigned long long)samples[i]);
        fclose(f);
    }

    for (i = 0; i < n; i++)
        sum += (double)samples[i];
    qsort(samples, (size_t)n, sizeof *samples, cmp_u64);

    printf("pv=%s n=%ld warmup=%ld value=%g connect_us=%.1f first_get_us=%.1f total_us=%.1f "
           "min_us=%.1f median_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f mean_us=%.1f\n",
           pv, n, warmup, value,
           (double)(t_conn - t_start) / 1e3,
           (double)(t_first - t_conn) / 1e3,
           (double)(t_first - t_start) / 1e3,
           (double)samples[0] / 1e3,
           median(samples, (size_t)n) / 1e3,
           (double)percentile(samples, (size_t)n, 90) / 1e3,
           (double)percentile(samples, (size_t)n, 99) / 1e3,
           (double)samples[n - 1] / 1e3,
           sum / (double)n / 1e3);
    fflush(stdout);

    ca_clear_channel(ch);
    ca_context_destroy();
    free(samples);
    return 0;
}
