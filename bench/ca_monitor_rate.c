/*
 * ca_monitor_rate: Channel Access monitor throughput of one waveform,
 * measured by a native libca client.
 *
 * Usage: ca_monitor_rate PV SECONDS WARMUP [key=value ...]
 *   count=N     elements to subscribe to (default: the channel's element count)
 *   timeout=S   connection timeout in seconds (default 5)
 *   begin=T     start the measured window at CLOCK_REALTIME T (seconds, as
 *               from `date +%s.%N`) instead of WARMUP seconds after the
 *               subscription is made; lets several clients share one window
 *   relay=PID   also report the CPU time that process PID used during the
 *               window (utime + stime from /proc/PID/stat)
 *   ioc=PID     the same for the IOC (ioc_cpu_s), so a run shows where the
 *               machine's cores went
 *
 * Connects one channel, subscribes to it with ca_create_subscription
 * (DBR_DOUBLE, DBE_VALUE, COUNT elements) and counts the updates that arrive
 * in a window of SECONDS. Updates that arrive before the window only warm up.
 *
 * The waveform is expected to hold a counter: element 0 is the newest sample
 * of a counter that the IOC advances by one per record process, element k the
 * sample before it (a compress record in LIFO mode; zeros where the ring is
 * not filled yet). From element 0 the client counts the record processes it
 * did not see (the server sends the newest value when it cannot keep up, so
 * these are updates squashed by the server, not bytes lost on the path) and
 * the rate at which the IOC offered updates; from elements 1 and COUNT-1 it
 * checks that each update arrived intact.
 *
 * Prints one line of key=value pairs:
 *   pv=... count=... seconds=... updates=... updates_per_s=... bytes=...
 *   mbytes_per_s=... offered_per_s=... squashed=... repeated=...
 *   corrupt=... disconnects=... connect_s=... cpu_s=... relay_cpu_s=...
 * mbytes_per_s is 10^6 bytes of array values per second; cpu_s is this
 * process's CPU time over the window; relay_cpu_s is -1 without relay=.
 *
 * Exits non-zero if the channel does not connect, the subscription fails, or
 * no update arrives in the window.
 *
 * Build (EPICS base headers and libca/libCom, e.g. from the epicscorelibs
 * Python package):
 *   gcc -O2 bench/ca_monitor_rate.c -I$EPICS/include -L$EPICS/lib \
 *       -lca -lCom -Wl,-rpath,$EPICS/lib -o ca_monitor_rate
 * The client and the IOC both need EPICS_CA_MAX_ARRAY_BYTES above the
 * array's size in bytes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cadef.h>

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double real_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

/* utime + stime of a process in seconds, or -1 if it cannot be read. */
static double proc_cpu_s(long pid)
{
    char path[64], buf[1024], *p;
    unsigned long long utime, stime;
    FILE *f;
    size_t n;
    static long hz;

    if (pid <= 0)
        return -1.0;
    if (!hz)
        hz = sysconf(_SC_CLK_TCK);
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    f = fopen(path, "r");
    if (!f)
        return -1.0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* Fields after the command name, which is in parentheses and may hold
     * spaces: state is field 3, utime 14, stime 15. */
    p = strrchr(buf, ')');
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                     &utime, &stime) != 2)
        return -1.0;
    return (double)(utime + stime) / (double)hz;
}

static double parse_num(const char *s, const char *what)
{
    char *end;
    double v;
    errno = 0;
    v = strtod(s, &end);
    if (errno || *end || v < 0) {
        fprintf(stderr, "ca_monitor_rate: bad %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

/* Window state, touched only by the callbacks, which run inside
 * ca_pend_event on the main thread (non-preemptive context). */
static double win_start, win_end; /* CLOCK_MONOTONIC */
static long updates;
static double bytes;
static long squashed, repeated, corrupt, disconnects;
static int have_last;
static double last_counter;
static int have_first_in_win;
static double first_counter, first_t, last_in_win_counter, last_in_win_t;

static void on_connection(struct connection_handler_args args)
{
    if (args.op == CA_OP_CONN_DOWN)
        disconnects++;
}

static void on_update(struct event_handler_args args)
{
    const double *v;
    double now = mono_s(), c;
    long n = args.count;

    if (args.status != ECA_NORMAL || !args.dbr || n < 1)
        return;
    if (now >= win_end)
        return;
    v = (const double *)args.dbr;
    c = v[0];

    if (now >= win_start) {
        updates++;
        bytes += (double)n * sizeof(double);
        if (have_last) {
            if (c > last_counter + 1)
                squashed += (long)(c - last_counter - 1);
            else if (c <= last_counter)
                repeated++;
        }
        /* The ring holds the counter's past samples newest first, or zeros
         * where it has not been filled yet. */
        if ((n > 1 && v[1] != 0 && v[1] != c - 1) ||
            (n > 2 && v[n - 1] != 0 && v[n - 1] != c - (double)(n - 1)))
            corrupt++;
        if (!have_first_in_win) {
            have_first_in_win = 1;
            first_counter = c;
            first_t = now;
        }
        last_in_win_counter = c;
        last_in_win_t = now;
    }
    have_last = 1;
    last_counter = c;
}

int main(int argc, char **argv)
{
    const char *pv;
    double seconds, warmup, timeout = 5.0, begin = 0.0;
    double t0, t_conn, cpu0 = 0, cpu1, relay0 = -1, relay1 = -1, offered = 0;
    double ioc0 = -1, ioc1 = -1;
    long count = 0, relay = 0, ioc = 0;
    int started = 0, i, st;
    chid ch;
    evid ev;

    if (argc < 4) {
        fprintf(stderr, "usage: %s PV SECONDS WARMUP [count=N] [timeout=S] [begin=T] "
                        "[relay=PID] [ioc=PID]\n", argv[0]);
        return 2;
    }
    pv = argv[1];
    seconds = parse_num(argv[2], "SECONDS");
    warmup = parse_num(argv[3], "WARMUP");
    for (i = 4; i < argc; i++) {
        if (!strncmp(argv[i], "count=", 6))
            count = (long)parse_num(argv[i] + 6, "count");
        else if (!strncmp(argv[i], "timeout=", 8))
            timeout = parse_num(argv[i] + 8, "timeout");
        else if (!strncmp(argv[i], "begin=", 6))
            begin = parse_num(argv[i] + 6, "begin");
        else if (!strncmp(argv[i], "relay=", 6))
            relay = (long)parse_num(argv[i] + 6, "relay");
        else if (!strncmp(argv[i], "ioc=", 4))
            ioc = (long)parse_num(argv[i] + 4, "ioc");
        else {
            fprintf(stderr, "ca_monitor_rate: unknown option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (seconds <= 0) {
        fprintf(stderr, "ca_monitor_rate: SECONDS must be positive\n");
        return 2;
    }
    /* Nothing counts until the window is set below. */
    win_start = win_end = 1e300;

    t0 = mono_s();
    st = ca_context_create(ca_disable_preemptive_callback);
    if (st != ECA_NORMAL) {
        fprintf(stderr, "ca_monitor_rate: ca_context_create: %s\n", ca_message(st));
        return 1;
    }
    st = ca_create_channel(pv, on_connection, NULL, CA_PRIORITY_DEFAULT, &ch);
    if (st != ECA_NORMAL) {
        fprintf(stderr, "ca_monitor_rate: ca_create_channel: %s\n", ca_message(st));
        return 1;
    }
    /* With a connection handler ca_pend_io does not wait for the connection. */
    while (ca_state(ch) != cs_conn && mono_s() - t0 < timeout)
        ca_pend_event(0.005);
    if (ca_state(ch) != cs_conn) {
        fprintf(stderr, "ca_monitor_rate: %s did not connect within %g s\n", pv, timeout);
        return 1;
    }
    t_conn = mono_s();
    if (count <= 0)
        count = (long)ca_element_count(ch);

    st = ca_create_subscription(DBR_DOUBLE, (unsigned long)count, ch, DBE_VALUE, on_update,
                                NULL, &ev);
    if (st != ECA_NORMAL) {
        fprintf(stderr, "ca_monitor_rate: ca_create_subscription: %s\n", ca_message(st));
        return 1;
    }
    ca_flush_io();

    if (begin > 0) {
        double mono_now = mono_s();
        win_start = mono_now + (begin - real_s());
        if (win_start < mono_s())
            fprintf(stderr, "ca_monitor_rate: begin= is already past (connected late)\n");
    } else {
        win_start = mono_s() + warmup;
    }
    win_end = win_start + seconds;

    for (;;) {
        double now = mono_s();
        if (!started && now >= win_start) {
            started = 1;
            cpu0 = cpu_s();
            relay0 = proc_cpu_s(relay);
            ioc0 = proc_cpu_s(ioc);
        }
        if (now >= win_end)
            break;
        ca_pend_event(0.002);
    }
    cpu1 = cpu_s();
    relay1 = proc_cpu_s(relay);
    ioc1 = proc_cpu_s(ioc);

    if (have_first_in_win && last_in_win_t > first_t)
        offered = (last_in_win_counter - first_counter) / (last_in_win_t - first_t);

    printf("pv=%s count=%ld seconds=%g updates=%ld updates_per_s=%.2f bytes=%.0f "
           "mbytes_per_s=%.2f offered_per_s=%.1f squashed=%ld repeated=%ld corrupt=%ld "
           "disconnects=%ld connect_s=%.3f cpu_s=%.3f relay_cpu_s=%.2f ioc_cpu_s=%.2f\n",
           pv, count, seconds, updates, (double)updates / seconds, bytes,
           bytes / seconds / 1e6, offered, squashed, repeated, corrupt, disconnects,
           t_conn - t0, cpu1 - cpu0,
           (relay0 >= 0 && relay1 >= 0) ? relay1 - relay0 : -1.0,
           (ioc0 >= 0 && ioc1 >= 0) ? ioc1 - ioc0 : -1.0);
    fflush(stdout);

    ca_clear_subscription(ev);
    ca_clear_channel(ch);
    ca_context_destroy();
    if (updates == 0) {
        fprintf(stderr, "ca_monitor_rate: no update in the window\n");
        return 1;
    }
    return 0;
}
