/*
 * ca_scale: a native libca client for many channels at once.
 *
 * Usage:
 *   ca_scale storm   PREFIX N [TIMEOUT_S]
 *   ca_scale monitor PREFIX N SECONDS WARMUP_S [TIMEOUT_S]
 *   ca_scale clients PREFIX N K SECONDS WARMUP_S [timeout=S] [quiet=S]
 *
 * Channel names are PREFIX0 .. PREFIX<N-1>.
 *
 * storm: creates all N channels at once (ca_create_channel with a connection
 * callback for each, then one ca_flush_io) and waits in ca_pend_event until
 * every channel is connected. Prints one line of key=value pairs:
 *   n=... connected=... connect_s=... first_s=... half_s=... cpu_s=...
 * connect_s is from the first ca_create_channel to the last connection,
 * first_s and half_s to the first and the N/2-th connection; cpu_s is this
 * process's CPU time over that span.
 *
 * monitor: connects all N channels, subscribes each (DBR_DOUBLE, DBE_VALUE),
 * lets updates flow for WARMUP_S, then counts the updates delivered in the
 * next SECONDS. Prints:
 *   n=... seconds=... updates=... updates_per_s=... silent=... connect_s=... cpu_s=...
 * silent = channels that delivered no update in the window.
 *
 * clients: K clients in this one process, each its own CA context (so its
 * own search and its own TCP circuits), each subscribing the same N channels.
 * The contexts are created one after another, each creating its channels and
 * subscriptions at once; then updates flow for WARMUP_S and are counted over
 * the next SECONDS. Prints:
 *   clients=K n=... connected=... connect_med_s=... connect_p90_s=...
 *   connect_max_s=... updates_per_s=... silent=... cpu_s=... cpu_total_s=...
 * connect_*_s are over the clients: each client's time from its first
 * ca_create_channel to its last connection. silent = channel subscriptions
 * (of K*N) that delivered nothing in the window; cpu_s is this process's CPU
 * time in the window, cpu_total_s from the start. With quiet=S, the count
 * starts after the warm-up only once no update has arrived for S seconds (at
 * most 8 S later): records SCANned in bursts are then counted from a gap
 * between bursts, so a window of whole scan periods holds whole bursts.
 *
 * Exits non-zero if not every channel connects within TIMEOUT_S (default 60).
 * In storm and monitor modes the client context is not preemptive: callbacks
 * run inside ca_pend_event. In clients mode the contexts are preemptive
 * (libca's own threads run the callbacks), so the counters are atomic.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cadef.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

struct chan {
    chid id;
    evid ev;
    int connected;
    long updates;
};

static struct chan *chans;
static long n_chans, n_connected;
static double t_first, t_half, t_all, *t_each;
static int counting;
static long total_updates;

static void on_connection(struct connection_handler_args args)
{
    struct chan *c = (struct chan *)ca_puser(args.chid);
    if (args.op == CA_OP_CONN_UP && !c->connected) {
        double t = now_s();
        c->connected = 1;
        n_connected++;
        t_each[n_connected - 1] = t;
        if (n_connected == 1)
            t_first = t;
        if (n_connected == (n_chans + 1) / 2)
            t_half = t;
        if (n_connected == n_chans)
            t_all = t;
    } else if (args.op == CA_OP_CONN_DOWN && c->connected) {
        c->connected = 0;
        n_connected--;
    }
}

static void on_update(struct event_handler_args args)
{
    struct chan *c = (struct chan *)args.usr;
    if (args.status != ECA_NORMAL || !counting)
        return;
    c->updates++;
    total_updates++;
}

/* "S" or "timeout=S" */
static double parse_timeout(const char *a)
{
    if (!strncmp(a, "timeout=", 8))
        a += 8;
    return atof(a);
}

static int connect_all(const char *prefix, double timeout, double *t0)
{
    char name[256];
    long i;
    double deadline;
    *t0 = now_s();
    for (i = 0; i < n_chans; i++) {
        int st;
        snprintf(name, sizeof name, "%s%ld", prefix, i);
        st = ca_create_channel(name, on_connection, &chans[i], CA_PRIORITY_DEFAULT, &chans[i].id);
        if (st != ECA_NORMAL) {
            fprintf(stderr, "ca_scale: ca_create_channel(%s): %s\n", name, ca_message(st));
            return -1;
        }
    }
    ca_flush_io();
    deadline = *t0 + timeout;
    while (n_connected < n_chans && now_s() < deadline)
        ca_pend_event(0.005);
    if (n_connected < n_chans) {
        fprintf(stderr, "ca_scale: %ld of %ld channels connected within %.0f s\n", n_connected,
                n_chans, timeout);
        return -1;
    }
    return 0;
}

/* ---- clients mode ---- */

struct mclient {
    double t0, t_all;
    long connected; /* atomic */
};

struct mchan {
    struct mclient *client;
    chid id;
    evid ev;
    int connected;
    long updates; /* atomic */
};

static long m_connected_total, m_updates_total; /* atomic */
static int m_counting;                          /* atomic */
static double m_last_update;                    /* atomic: now_s() of the latest update */

static void m_on_connection(struct connection_handler_args args)
{
    struct mchan *c = (struct mchan *)ca_puser(args.chid);
    if (args.op == CA_OP_CONN_UP && !c->connected) {
        c->connected = 1;
        if (__atomic_add_fetch(&c->client->connected, 1, __ATOMIC_SEQ_CST) == n_chans)
            c->client->t_all = now_s();
        __atomic_add_fetch(&m_connected_total, 1, __ATOMIC_SEQ_CST);
    }
}

static void m_on_update(struct event_handler_args args)
{
    struct mchan *c = (struct mchan *)args.usr;
    double t = now_s();
    if (args.status == ECA_NORMAL)
        __atomic_store(&m_last_update, &t, __ATOMIC_RELAXED);
    if (args.status != ECA_NORMAL || !__atomic_load_n(&m_counting, __ATOMIC_RELAXED))
        return;
    __atomic_add_fetch(&c->updates, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&m_updates_total, 1, __ATOMIC_RELAXED);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Waits until no update has arrived for `quiet` seconds, at most 8 x quiet. */
static void wait_for_quiet(double quiet)
{
    double limit = now_s() + 8 * quiet, last;
    for (;;) {
        double t = now_s();
        __atomic_load(&m_last_update, &last, __ATOMIC_RELAXED);
        if (t - last >= quiet || t >= limit)
            return;
        usleep(5000);
    }
}

static int clients_mode(const char *prefix, long k, double seconds, double warmup,
                        double timeout, double quiet)
{
    struct mclient *cl = calloc((size_t)k, sizeof *cl);
    struct mchan *ch = calloc((size_t)(k * n_chans), sizeof *ch);
    double *conn = calloc((size_t)k, sizeof *conn);
    double c_start = cpu_s(), deadline, c0, t_end;
    long i, j, silent = 0, total = k * n_chans;
    char name[256];
    if (!cl || !ch || !conn)
        return 2;
    for (j = 0; j < k; j++) {
        if (ca_context_create(ca_enable_preemptive_callback) != ECA_NORMAL) {
            fprintf(stderr, "ca_scale: ca_context_create failed for client %ld\n", j);
            return 1;
        }
        cl[j].t0 = now_s();
        for (i = 0; i < n_chans; i++) {
            struct mchan *c = &ch[j * n_chans + i];
            int st;
            c->client = &cl[j];
            snprintf(name, sizeof name, "%s%ld", prefix, i);
            st = ca_create_channel(name, m_on_connection, c, CA_PRIORITY_DEFAULT, &c->id);
            if (st == ECA_NORMAL)
                st = ca_create_subscription(DBR_DOUBLE, 1, c->id, DBE_VALUE, m_on_update, c,
                                            &c->ev);
            if (st != ECA_NORMAL) {
                fprintf(stderr, "ca_scale: client %ld, %s: %s\n", j, name, ca_message(st));
                return 1;
            }
        }
        ca_flush_io();
        ca_detach_context();
    }
    deadline = now_s() + timeout;
    while (__atomic_load_n(&m_connected_total, __ATOMIC_SEQ_CST) < total && now_s() < deadline)
        usleep(5000);
    if (m_connected_total < total) {
        fprintf(stderr, "ca_scale: %ld of %ld channels connected within %.0f s\n",
                m_connected_total, total, timeout);
        return 1;
    }
    for (j = 0; j < k; j++)
        conn[j] = cl[j].t_all - cl[j].t0;
    qsort(conn, (size_t)k, sizeof *conn, cmp_double);
    usleep((useconds_t)(warmup * 1e6));
    if (quiet > 0)
        wait_for_quiet(quiet);
    c0 = cpu_s();
    __atomic_store_n(&m_counting, 1, __ATOMIC_SEQ_CST);
    t_end = now_s() + seconds;
    while (now_s() < t_end)
        usleep(10000);
    __atomic_store_n(&m_counting, 0, __ATOMIC_SEQ_CST);
    c0 = cpu_s() - c0;
    usleep(20000); /* let callbacks in flight finish */
    for (i = 0; i < total; i++)
        silent += __atomic_load_n(&ch[i].updates, __ATOMIC_RELAXED) == 0;
    printf("clients=%ld n=%ld connected=%ld connect_med_s=%.4f connect_p90_s=%.4f "
           "connect_max_s=%.4f updates_per_s=%.1f silent=%ld cpu_s=%.3f cpu_total_s=%.3f\n",
           k, n_chans, m_connected_total, conn[(k - 1) / 2], conn[(k - 1) * 9 / 10], conn[k - 1],
           (double)m_updates_total / seconds, silent, c0, cpu_s() - c_start);
    return 0;
}

int main(int argc, char *argv[])
{
    const char *mode, *prefix;
    double timeout = 60.0, t0, c0;
    long i;
    if (argc < 4) {
        fprintf(stderr, "usage: %s storm PREFIX N [TIMEOUT_S]\n"
                        "       %s monitor PREFIX N SECONDS WARMUP_S [TIMEOUT_S]\n"
                        "       %s clients PREFIX N K SECONDS WARMUP_S [timeout=S] [quiet=S]\n",
                argv[0], argv[0], argv[0]);
        return 2;
    }
    mode = argv[1];
    prefix = argv[2];
    n_chans = strtol(argv[3], NULL, 10);
    if (n_chans <= 0 || n_chans > 10000000) {
        fprintf(stderr, "ca_scale: bad N\n");
        return 2;
    }
    chans = calloc((size_t)n_chans, sizeof *chans);
    t_each = calloc((size_t)n_chans, sizeof *t_each);
    if (!chans || !t_each)
        return 2;
    if (!strcmp(mode, "clients")) {
        long k = argc > 4 ? strtol(argv[4], NULL, 10) : 0;
        double quiet = 0;
        int a;
        if (k <= 0 || k > 100000 || argc < 7) {
            fprintf(stderr, "ca_scale: clients needs K SECONDS WARMUP_S\n");
            return 2;
        }
        for (a = 7; a < argc; a++) {
            if (!strncmp(argv[a], "quiet=", 6))
                quiet = atof(argv[a] + 6);
            else
                timeout = parse_timeout(argv[a]);
        }
        if (clients_mode(prefix, k, atof(argv[5]), atof(argv[6]), timeout, quiet))
            return 1;
        fflush(stdout);
        _exit(0);
    }
    if (ca_context_create(ca_disable_preemptive_callback) != ECA_NORMAL)
        return 1;

    if (!strcmp(mode, "storm")) {
        if (argc > 4)
            timeout = parse_timeout(argv[4]);
        c0 = cpu_s();
        if (connect_all(prefix, timeout, &t0))
            return 1;
        long within1 = 0;
        for (i = 0; i < n_chans; i++)
            within1 += t_each[i] - t0 <= 1.0;
        printf("n=%ld connected=%ld connect_s=%.4f first_s=%.4f half_s=%.4f p90_s=%.4f "
               "p99_s=%.4f within1s=%ld cpu_s=%.3f\n",
               n_chans, n_connected, t_all - t0, t_first - t0, t_half - t0,
               t_each[(n_chans - 1) * 9 / 10] - t0, t_each[(n_chans - 1) * 99 / 100] - t0, within1,
               cpu_s() - c0);
    } else if (!strcmp(mode, "monitor") && argc >= 6) {
        double seconds = atof(argv[4]), warmup = atof(argv[5]), t_end;
        long silent = 0;
        if (argc > 6)
            timeout = parse_timeout(argv[6]);
        if (connect_all(prefix, timeout, &t0))
            return 1;
        for (i = 0; i < n_chans; i++) {
            int st = ca_create_subscription(DBR_DOUBLE, 1, chans[i].id, DBE_VALUE, on_update,
                                            &chans[i], &chans[i].ev);
            if (st != ECA_NORMAL) {
                fprintf(stderr, "ca_scale: ca_create_subscription: %s\n", ca_message(st));
                return 1;
            }
        }
        ca_flush_io();
        t_end = now_s() + warmup;
        while (now_s() < t_end)
            ca_pend_event(0.01);
        counting = 1;
        c0 = cpu_s();
        t_end = now_s() + seconds;
        while (now_s() < t_end)
            ca_pend_event(0.01);
        counting = 0;
        for (i = 0; i < n_chans; i++)
            silent += chans[i].updates == 0;
        printf("n=%ld seconds=%.3f updates=%ld updates_per_s=%.1f silent=%ld connect_s=%.4f "
               "cpu_s=%.3f\n",
               n_chans, seconds, total_updates, (double)total_updates / seconds, silent,
               t_all - t0, cpu_s() - c0);
    } else {
        fprintf(stderr, "ca_scale: unknown mode '%s'\n", mode);
        return 2;
    }
    fflush(stdout);
    /* Exit without tearing down N channels one by one. */
    _exit(0);
}
