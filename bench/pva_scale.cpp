/*
 * pva_scale: a native pvxs client for many channels at once.
 *
 * Usage:
 *   pva_scale storm   PREFIX N [timeout=S]
 *   pva_scale monitor PREFIX N SECONDS WARMUP_S [queue=N] [pipeline=1] [timeout=S]
 *   pva_scale clients PREFIX N K SECONDS WARMUP_S [queue=N] [pipeline=1] [timeout=S] [quiet=S]
 *
 * Channel names are PREFIX0 .. PREFIX<N-1>. The client is configured from
 * the environment (EPICS_PVA_NAME_SERVERS, EPICS_PVA_ADDR_LIST, ...).
 *
 * storm: asks for all N channels at once (Context::connect() with an
 * onConnect callback each) and waits until every one is connected. Prints
 *   n=... connected=... connect_s=... first_s=... half_s=... cpu_s=...
 * connect_s is from the first connect() to the last onConnect, first_s and
 * half_s to the first and the N/2-th; cpu_s is this process's CPU time.
 *
 * monitor: subscribes all N channels (optionally pipelined, with the given
 * queueSize), waits until each has delivered one update, lets updates flow
 * for WARMUP_S, then counts the updates delivered to the application in the
 * next SECONDS. Prints
 *   n=... seconds=... updates=... updates_per_s=... silent=... connect_s=... cpu_s=...
 * silent = subscriptions that delivered nothing in the window.
 *
 * clients: K clients in this one process, each its own pvxs client Context
 * (its own worker thread, search and TCP connections), each subscribing the
 * same N channels as monitor does; a client's channel counts as connected at
 * its first update. Prints
 *   clients=K n=... connected=... connect_med_s=... connect_p90_s=...
 *   connect_max_s=... updates_per_s=... silent=... cpu_s=... cpu_total_s=...
 * connect_*_s are over the clients: each client's time from its first
 * subscription to its N-th first update. silent counts subscriptions (of
 * K*N) that delivered nothing in the window; cpu_s is this process's CPU time
 * in the window, cpu_total_s from the start; create_s the time taken to
 * create the K Contexts and their subscriptions (the timeout starts after it).
 * With quiet=S, the count starts after the warm-up only once no update has
 * arrived for S seconds (at most 8 S later): records SCANned in bursts are
 * then counted from a gap between bursts, so a window of whole scan periods
 * holds whole bursts.
 *
 * Exits non-zero if not all channels connect within the timeout (60 s).
 *
 * Build: like bench/pva_monitor_rate.cpp (see scripts/bench-scale).
 */
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <pvxs/client.h>
#include <pvxs/log.h>

using namespace pvxs;
typedef std::chrono::steady_clock Clock;

namespace {

double cpu_seconds()
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return double(ru.ru_utime.tv_sec) + double(ru.ru_utime.tv_usec) * 1e-6 +
           double(ru.ru_stime.tv_sec) + double(ru.ru_stime.tv_usec) * 1e-6;
}

double secs(Clock::time_point a, Clock::time_point b)
{
    return std::chrono::duration<double>(b - a).count();
}

struct ClientState {
    Clock::time_point t0, t_all;
    long connected = 0; // guarded by the shared lock
    std::vector<char> seen;
    std::vector<long> updates; // touched only by this client's worker
};

int clients_mode(const std::string &prefix, long n, long k, double seconds, double warmup,
                 long queue, bool pipeline, double timeout, double quiet)
{
    // Clock::now() of the latest update, in ticks since the clock's epoch.
    std::atomic<Clock::rep> last_update{Clock::now().time_since_epoch().count()};
    const double c_start = cpu_seconds();
    std::mutex lock;
    std::condition_variable wake;
    long connected_total = 0;
    const long total = n * k;
    std::atomic<bool> counting{false};
    std::vector<ClientState> st(static_cast<size_t>(k));
    std::vector<client::Context> ctxs;
    std::vector<std::shared_ptr<client::Subscription>> subs;
    ctxs.reserve(size_t(k));
    subs.reserve(size_t(total));
    for (long j = 0; j < k; j++) {
        ctxs.push_back(client::Config::fromEnv().build());
        ClientState &c = st[size_t(j)];
        c.seen.assign(size_t(n), 0);
        c.updates.assign(size_t(n), 0);
        c.t0 = Clock::now();
        for (long i = 0; i < n; i++) {
            auto b = ctxs.back()
                         .monitor(prefix + std::to_string(i))
                         .maskConnected(true)
                         .maskDisconnected(true)
                         .event([&, i, j](client::Subscription &sub) {
                             ClientState &c = st[size_t(j)];
                             long got = 0;
                             for (;;) {
                                 try {
                                     Value v(sub.pop());
                                     if (!v)
                                         break;
                                     got++;
                                 } catch (std::exception &) {
                                     break;
                                 }
                             }
                             if (!got)
                                 return;
                             last_update.store(Clock::now().time_since_epoch().count(),
                                               std::memory_order_relaxed);
                             if (counting.load(std::memory_order_relaxed))
                                 c.updates[size_t(i)] += got;
                             if (c.seen[size_t(i)])
                                 return;
                             std::lock_guard<std::mutex> G(lock);
                             c.seen[size_t(i)] = 1;
                             if (++c.connected == n)
                                 c.t_all = Clock::now();
                             if (++connected_total == total)
                                 wake.notify_all();
                         });
            if (queue > 0)
                b.record("queueSize", uint32_t(queue));
            if (pipeline)
                b.record("pipeline", true);
            subs.push_back(b.exec());
        }
    }
    // Creating a thousand Contexts (a thread each) takes seconds on a loaded
    // machine; the timeout starts after it.
    const double create_s = secs(st[0].t0, Clock::now());
    std::vector<double> conn;
    {
        std::unique_lock<std::mutex> G(lock);
        wake.wait_for(G, std::chrono::duration<double>(timeout),
                      [&] { return connected_total == total; });
        if (connected_total < total) {
            long short_clients = 0;
            for (auto &c : st)
                short_clients += c.connected < n;
            fprintf(stderr,
                    "pva_scale: %ld of %ld channels connected within %.0f s (after %.1f s creating "
                    "the clients); %ld of %ld clients incomplete\n",
                    connected_total, total, timeout, create_s, short_clients, k);
            fflush(stderr);
            _exit(1);
        }
        for (auto &c : st)
            conn.push_back(secs(c.t0, c.t_all));
    }
    std::sort(conn.begin(), conn.end());
    usleep(useconds_t(warmup * 1e6));
    if (quiet > 0) {
        const auto limit = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(8 * quiet));
        for (;;) {
            const auto now = Clock::now();
            const Clock::time_point last{Clock::duration(last_update.load(std::memory_order_relaxed))};
            if (secs(last, now) >= quiet || now >= limit)
                break;
            usleep(5000);
        }
    }
    const double c1 = cpu_seconds();
    counting = true;
    usleep(useconds_t(seconds * 1e6));
    counting = false;
    const double cpu = cpu_seconds() - c1;
    usleep(20000); // let the workers leave their callbacks
    long updates = 0, silent = 0;
    for (auto &c : st)
        for (long u : c.updates) {
            updates += u;
            silent += u == 0;
        }
    printf("clients=%ld n=%ld connected=%ld connect_med_s=%.4f connect_p90_s=%.4f "
           "connect_max_s=%.4f updates_per_s=%.1f silent=%ld cpu_s=%.3f cpu_total_s=%.3f "
           "create_s=%.3f\n",
           k, n, connected_total, conn[size_t((k - 1) / 2)], conn[size_t((k - 1) * 9 / 10)],
           conn[size_t(k - 1)], double(updates) / seconds, silent, cpu, cpu_seconds() - c_start,
           create_s);
    fflush(stdout);
    _exit(0);
}

} // namespace

int main(int argc, char *argv[])
{
    if (argc < 4) {
        fprintf(stderr,
                "usage: %s storm PREFIX N [timeout=S]\n"
                "       %s monitor PREFIX N SECONDS WARMUP_S [queue=N] [pipeline=1] [timeout=S]\n"
                "       %s clients PREFIX N K SECONDS WARMUP_S [queue=N] [pipeline=1] [timeout=S] [quiet=S]\n",
                argv[0], argv[0], argv[0]);
        return 2;
    }
    const std::string mode(argv[1]), prefix(argv[2]);
    const long n = strtol(argv[3], nullptr, 10);
    if (n <= 0 || n > 10000000) {
        fprintf(stderr, "pva_scale: bad N\n");
        return 2;
    }
    const bool clients = mode == "clients";
    long k = 1;
    if (clients) {
        // Take K out of the arguments; the rest parses like monitor's.
        k = argc > 4 ? strtol(argv[4], nullptr, 10) : 0;
        if (k <= 0 || k > 100000) {
            fprintf(stderr, "pva_scale: clients needs K SECONDS WARMUP_S\n");
            return 2;
        }
        for (int i = 4; i < argc; i++)
            argv[i] = argv[i + 1]; // argv[argc] is a null pointer
        argc--;
    }
    const bool monitor = mode == "monitor" || clients;
    if (!monitor && mode != "storm") {
        fprintf(stderr, "pva_scale: unknown mode '%s'\n", mode.c_str());
        return 2;
    }
    if (monitor && argc < 6) {
        fprintf(stderr, "pva_scale: monitor needs SECONDS WARMUP_S\n");
        return 2;
    }
    const double seconds = monitor ? atof(argv[4]) : 0.0;
    const double warmup = monitor ? atof(argv[5]) : 0.0;
    double timeout = 60.0, quiet = 0.0;
    long queue = 0;
    bool pipeline = false;
    for (int i = monitor ? 6 : 4; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "queue=", 6))
            queue = strtol(a + 6, nullptr, 10);
        else if (!strncmp(a, "pipeline=", 9))
            pipeline = atoi(a + 9) != 0;
        else if (!strncmp(a, "timeout=", 8))
            timeout = atof(a + 8);
        else if (clients && !strncmp(a, "quiet=", 6))
            quiet = atof(a + 6);
        else {
            fprintf(stderr, "pva_scale: unknown option '%s'\n", a);
            return 2;
        }
    }
    logger_config_env();
    if (clients)
        return clients_mode(prefix, n, k, seconds, warmup, queue, pipeline, timeout, quiet);
    auto ctx = client::Config::fromEnv().build();

    std::mutex lock;
    std::condition_variable wake;
    long connected = 0;
    Clock::time_point t_first, t_half, t_all;
    std::vector<Clock::time_point> t_each;
    t_each.reserve(size_t(n));
    std::vector<char> seen(size_t(n), 0);
    auto mark = [&](long i) {
        // called with lock held
        if (seen[size_t(i)])
            return;
        seen[size_t(i)] = 1;
        const auto t = Clock::now();
        connected++;
        t_each.push_back(t);
        if (connected == 1)
            t_first = t;
        if (connected == (n + 1) / 2)
            t_half = t;
        if (connected == n) {
            t_all = t;
            wake.notify_all();
        }
    };

    std::atomic<bool> counting{false};
    std::vector<long> updates(size_t(n), 0); // touched only by the client worker
    std::vector<std::shared_ptr<client::Connect>> conns;
    std::vector<std::shared_ptr<client::Subscription>> subs;

    const double c0 = cpu_seconds();
    const auto t0 = Clock::now();
    if (!monitor) {
        conns.reserve(size_t(n));
        for (long i = 0; i < n; i++) {
            conns.push_back(ctx.connect(prefix + std::to_string(i))
                                .onConnect([&, i]() {
                                    std::lock_guard<std::mutex> G(lock);
                                    mark(i);
                                })
                                .exec());
        }
    } else {
        subs.reserve(size_t(n));
        for (long i = 0; i < n; i++) {
            auto b = ctx.monitor(prefix + std::to_string(i))
                         .maskConnected(true)
                         .maskDisconnected(true)
                         .event([&, i](client::Subscription &sub) {
                             // Runs on the client worker: drain the queue.
                             long got = 0;
                             for (;;) {
                                 try {
                                     Value v(sub.pop());
                                     if (!v)
                                         break;
                                     got++;
                                 } catch (std::exception &) {
                                     break;
                                 }
                             }
                             if (got) {
                                 if (counting.load(std::memory_order_relaxed))
                                     updates[size_t(i)] += got;
                                 std::lock_guard<std::mutex> G(lock);
                                 mark(i);
                             }
                         });
            if (queue > 0)
                b.record("queueSize", uint32_t(queue));
            if (pipeline)
                b.record("pipeline", true);
            subs.push_back(b.exec());
        }
    }
    {
        std::unique_lock<std::mutex> G(lock);
        wake.wait_for(G, std::chrono::duration<double>(timeout), [&] { return connected == n; });
        if (connected < n) {
            fprintf(stderr, "pva_scale: %ld of %ld channels connected within %.0f s\n", connected, n,
                    timeout);
            fflush(stderr);
            _exit(1);
        }
    }
    if (!monitor) {
        long within1 = 0;
        for (auto t : t_each)
            within1 += secs(t0, t) <= 1.0;
        printf("n=%ld connected=%ld connect_s=%.4f first_s=%.4f half_s=%.4f p90_s=%.4f "
               "p99_s=%.4f within1s=%ld cpu_s=%.3f\n",
               n, connected, secs(t0, t_all), secs(t0, t_first), secs(t0, t_half),
               secs(t0, t_each[size_t((n - 1) * 9 / 10)]), secs(t0, t_each[size_t((n - 1) * 99 / 100)]),
               within1, cpu_seconds() - c0);
    } else {
        usleep(useconds_t(warmup * 1e6));
        const double c1 = cpu_seconds();
        counting = true;
        usleep(useconds_t(seconds * 1e6));
        counting = false;
        const double cpu = cpu_seconds() - c1;
        usleep(20000); // let the worker leave the callback
        long total = 0, silent = 0;
        for (long u : updates) {
            total += u;
            silent += u == 0;
        }
        printf("n=%ld seconds=%.3f updates=%ld updates_per_s=%.1f silent=%ld connect_s=%.4f "
               "cpu_s=%.3f\n",
               n, seconds, total, double(total) / seconds, silent, secs(t0, t_all), cpu);
    }
    fflush(stdout);
    // Exit without tearing down N operations one by one.
    _exit(0);
}
