/*
 * pva_monitor_rate: PV Access monitor throughput, measured by a native pvxs
 * client.
 *
 * Usage: pva_monitor_rate PV SECONDS WARMUP_S [server=HOST:PORT] [queue=N]
 *                         [pipeline=1] [timeout=S]
 *
 * Subscribes to PV with the context configured from the environment
 * (EPICS_PVA_NAME_SERVERS, EPICS_PVA_ADDR_LIST, ...), or, with server=, with
 * a direct connection to that server and no search at all. queue= sets the
 * subscription queue (record._options.queueSize, used by the server and by
 * this client; pvxs's default is 4); pipeline=1 asks for per-update flow
 * control. The first update starts a warm-up of WARMUP_S seconds; then
 * every update that arrives in the next SECONDS seconds is counted, with the
 * bytes of its "value" field (array length times element size; 8 for a
 * double scalar).
 *
 * Updates the client could not take in time are squashed by pvxs (by the
 * server when its queue is full, by the client when its own queue is full),
 * not queued without bound. So the counts are what arrived. If the source
 * numbers its updates in timeStamp.userTag (bench/pva_source.cpp does), the
 * gaps in that sequence are reported as missed.
 *
 * Prints one line of key=value pairs:
 *   pv=... seconds=... updates=... updates_per_s=... mbytes_per_s=...
 *   bytes_per_update=... missed=... carried_per_s=... srv_squash=...
 *   cli_squash=... max_queue=... queue_limit=... disconnects=... errors=...
 *   connect_ms=... cpu_s=... all_bytes=...
 * mbytes_per_s counts 10^6 bytes of values per second; all_bytes counts the
 * value bytes of every update received, warm-up included (what a relay on the
 * path carried to this client over the whole run); carried_per_s counts
 * the updates the source sent in the window, delivered or missed (what
 * crossed the path when the client squashes); cpu_s is this process's
 * user+system CPU time over the measured window.
 *
 * The process exits non-zero if no update arrives within timeout= seconds
 * (default 10) or none arrives in the measured window.
 *
 * Build (pvxs and EPICS base from the pvxslibs and epicscorelibs packages,
 * which use the old C++ string ABI):
 *   g++ -std=c++11 -O2 -D_GLIBCXX_USE_CXX11_ABI=0 bench/pva_monitor_rate.cpp \
 *       -I$PVXS/include -I$EPICS/include -L$PVXS/lib -L$EPICS/lib \
 *       -lpvxs -lCom -pthread -Wl,-rpath,$PVXS/lib:$EPICS/lib -o pva_monitor_rate
 */
#include <sys/resource.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include <pvxs/client.h>
#include <pvxs/log.h>

using namespace pvxs;
typedef std::chrono::steady_clock Clock;

namespace {

double cpu_seconds()
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

double parse_num(const char *s, const char *what)
{
    char *end;
    double v = strtod(s, &end);
    if (*end || v < 0) {
        fprintf(stderr, "pva_monitor_rate: bad %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

size_t value_bytes(const Value &v)
{
    auto fld = v["value"];
    if (!fld.valid())
        return 0;
    if (fld.type().isarray()) {
        auto arr = fld.as<shared_array<const void>>();
        return arr.size() * elementSize(arr.original_type());
    }
    return fld.type().size();
}

struct Counter {
    bool measuring = false, have_seq = false;
    int64_t updates = 0, bytes = 0, missed = 0;
    int64_t all_bytes = 0; // warm-up and window: what the path carried to us
    int32_t last_seq = 0;
    size_t last_bytes = 0;

    void add(const Value &v)
    {
        const size_t n = value_bytes(v);
        all_bytes += int64_t(n);
        if (!measuring)
            return;
        updates++;
        last_bytes = n;
        bytes += int64_t(last_bytes);
        auto tag = v["timeStamp.userTag"];
        if (tag.valid()) {
            int32_t seq = tag.as<int32_t>();
            if (have_seq && seq > last_seq + 1)
                missed += seq - last_seq - 1;
            have_seq = true;
            last_seq = seq;
        }
    }
};

} // namespace

int main(int argc, char *argv[])
{
    if (argc < 4) {
        fprintf(stderr,
                "usage: %s PV SECONDS WARMUP_S [server=HOST:PORT] [queue=N] [pipeline=1] "
                "[timeout=S]\n",
                argv[0]);
        return 2;
    }
    const std::string pv(argv[1]);
    const double seconds = parse_num(argv[2], "SECONDS");
    const double warmup = parse_num(argv[3], "WARMUP_S");
    std::string server;
    long queue = 0;
    bool pipeline = false;
    double timeout = 10.0;
    for (int i = 4; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "server=", 7))
            server = a + 7;
        else if (!strncmp(a, "queue=", 6))
            queue = long(parse_num(a + 6, "queue"));
        else if (!strncmp(a, "pipeline=", 9))
            pipeline = parse_num(a + 9, "pipeline") != 0;
        else if (!strncmp(a, "timeout=", 8))
            timeout = parse_num(a + 8, "timeout");
        else {
            fprintf(stderr, "pva_monitor_rate: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (seconds <= 0) {
        fprintf(stderr, "pva_monitor_rate: SECONDS must be positive\n");
        return 2;
    }
    logger_config_env();

    const auto t_start = Clock::now();
    auto ctx = client::Config::fromEnv().build();

    std::mutex lock;
    std::condition_variable wake;
    bool ready = false;

    auto builder = ctx.monitor(pv)
                       .maskConnected(true)
                       .maskDisconnected(false)
                       .event([&](client::Subscription &) {
                           std::lock_guard<std::mutex> G(lock);
                           ready = true;
                           wake.notify_one();
                       });
    if (!server.empty())
        builder.server(server);
    if (queue > 0)
        builder.record("queueSize", uint32_t(queue));
    if (pipeline)
        builder.record("pipeline", true);
    auto sub = builder.exec();

    Counter c;
    int64_t disconnects = 0, errors = 0;
    bool first = false;
    Clock::time_point t_first, t_measure, t_end;
    double cpu0 = 0.0;
    const auto first_deadline = t_start + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(timeout));

    for (;;) {
        const auto now = Clock::now();
        if (!first && now >= first_deadline) {
            fprintf(stderr, "pva_monitor_rate: no update from %s within %.1f s\n", pv.c_str(),
                    timeout);
            return 1;
        }
        if (first && !c.measuring && now >= t_measure) {
            c.measuring = true;
            cpu0 = cpu_seconds();
            client::SubscriptionStat st;
            sub->stats(st, true); // count squashes in the window only
        }
        if (first && now >= t_end)
            break;
        const auto until = !first ? first_deadline : (c.measuring ? t_end : t_measure);
        {
            std::unique_lock<std::mutex> G(lock);
            wake.wait_until(G, until, [&] { return ready; });
            ready = false;
        }
        // Drain the queue; the event callback fires again only once pop()
        // has returned empty.
        for (;;) {
            try {
                Value v(sub->pop());
                if (!v)
                    break;
                if (!first) {
                    first = true;
                    t_first = Clock::now();
                    t_measure = t_first + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(warmup));
                    t_end = t_measure + std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(seconds));
                }
                c.add(v);
            } catch (client::Finished &) { // a kind of Disconnect: catch it first
                fprintf(stderr, "pva_monitor_rate: %s: subscription finished\n", pv.c_str());
                errors++;
                break;
            } catch (client::Disconnect &) {
                disconnects++;
            } catch (std::exception &e) {
                fprintf(stderr, "pva_monitor_rate: %s: %s\n", pv.c_str(), e.what());
                errors++;
            }
        }
        if (errors > 100)
            break;
    }
    const double cpu = cpu_seconds() - cpu0;
    client::SubscriptionStat st;
    sub->stats(st);
    sub->cancel();

    const double connect_ms = std::chrono::duration<double, std::milli>(t_first - t_start).count();
    printf("pv=%s seconds=%.3f updates=%lld updates_per_s=%.1f mbytes_per_s=%.2f "
           "bytes_per_update=%zu missed=%lld carried_per_s=%.1f srv_squash=%zu cli_squash=%zu "
           "max_queue=%zu queue_limit=%zu disconnects=%lld errors=%lld connect_ms=%.1f "
           "cpu_s=%.3f all_bytes=%lld\n",
           pv.c_str(), seconds, (long long)c.updates, double(c.updates) / seconds,
           double(c.bytes) / seconds / 1e6, c.last_bytes, (long long)c.missed,
           double(c.updates + c.missed) / seconds, st.nSrvSquash,
           st.nCliSquash, st.maxQueue, st.limitQueue, (long long)disconnects,
           (long long)errors, connect_ms, cpu, (long long)c.all_bytes);
    fflush(stdout);
    return (c.updates > 0 && errors == 0) ? 0 : 1;
}
