/*
 * pva_get_latency: PV Access get round-trip latency, measured by a native
 * pvxs client. The counterpart of bench/ca_get_latency.c.
 *
 * Usage: pva_get_latency PV N WARMUP [SAMPLES_FILE] [server=HOST:PORT]
 *                        [mode=reuse|new] [timeout=S]
 *
 * Configures the context from the environment (EPICS_PVA_NAME_SERVERS,
 * EPICS_PVA_ADDR_LIST, ...), or, with server=, connects straight to that
 * server with no search at all. Then WARMUP untimed gets and N timed ones,
 * one in flight at a time, each timed with the steady (monotonic) clock.
 *
 * mode=reuse (default): one GET operation is created (INIT, which carries
 * the type) and then executed N + WARMUP times (pvxs's reExecGet): each get
 * is one request and one reply on the wire, like a CA get on an open
 * channel. The loop runs in the result callback: the next get is issued as
 * soon as the reply is taken, with no thread hand-off in between.
 *
 * mode=new: every get is a fresh operation, ctxt.get(pv).exec()->wait(), as
 * pvget and p4p's Context.get() do: INIT (request type, reply type), then
 * EXEC (request, reply), then DESTROY (no reply). Two round trips per get.
 *
 * Prints one line of key=value pairs (times in microseconds):
 *   pv=... mode=... n=... warmup=... value=... connect_us=... first_get_us=...
 *   total_us=... min_us=... median_us=... p90_us=... p99_us=... max_us=...
 *   mean_us=...
 * connect_us is from the start of main (context creation included) to the
 * end of the operation's INIT: name resolution, TCP connection, validation,
 * channel creation and the GET INIT (mode=reuse only; 0 with mode=new).
 * first_get_us is the first get after that (warm-up or timed); total_us is
 * from the start of main to the first get's answer: what a short-lived
 * client waits for one value.
 * With SAMPLES_FILE, every timed get (ns) is written there, one a line.
 *
 * The process exits non-zero if a get fails or takes longer than timeout=
 * seconds (default 5; the first one, connection included, 2 x timeout).
 *
 * Build (pvxs and EPICS base from the pvxslibs and epicscorelibs packages,
 * which use the old C++ string ABI):
 *   g++ -std=c++11 -O2 -D_GLIBCXX_USE_CXX11_ABI=0 bench/pva_get_latency.cpp \
 *       -I$PVXS/include -I$EPICS/include -L$PVXS/lib -L$EPICS/lib \
 *       -lpvxs -lCom -pthread -Wl,-rpath,$PVXS/lib:$EPICS/lib -o pva_get_latency
 */
// reExecGet(), autoExec() and onInit() are pvxs "expert" API (client.h).
#define PVXS_ENABLE_EXPERT_API

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <pvxs/client.h>
#include <pvxs/log.h>

using namespace pvxs;
typedef std::chrono::steady_clock Clock;

namespace {

double parse_num(const char *s, const char *what)
{
    char *end;
    double v = strtod(s, &end);
    if (*end || v < 0) {
        fprintf(stderr, "pva_get_latency: bad %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

double us(Clock::duration d)
{
    return std::chrono::duration<double, std::micro>(d).count();
}

Clock::duration seconds(double s)
{
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// Nearest-rank percentile of a sorted vector, p in [0, 100], as in
// ca_get_latency.c.
int64_t percentile(const std::vector<int64_t> &v, double p)
{
    if (v.empty())
        return 0;
    size_t rank = size_t(std::ceil(p / 100.0 * double(v.size())));
    rank = std::max<size_t>(1, std::min(rank, v.size()));
    return v[rank - 1];
}

double median(const std::vector<int64_t> &v)
{
    if (v.empty())
        return 0.0;
    const size_t n = v.size();
    return n % 2 ? double(v[n / 2]) : (double(v[n / 2 - 1]) + double(v[n / 2])) / 2.0;
}

// State shared by the main thread and the result callback (mode=reuse).
struct Loop {
    std::mutex lock;
    std::condition_variable wake;
    long total = 0; // warm-up + timed gets to make
    long done = 0;  // gets answered
    bool inited = false, finished = false;
    std::string error;
    Clock::time_point t_init, t_first, t_last_progress, t_sent;
    std::vector<int64_t> samples; // ns, timed gets only
    long warmup = 0;
    double value = 0.0;
};

} // namespace

int main(int argc, char *argv[])
{
    if (argc < 4) {
        fprintf(stderr,
                "usage: %s PV N WARMUP [SAMPLES_FILE] [server=HOST:PORT] [mode=reuse|new] "
                "[timeout=S]\n",
                argv[0]);
        return 2;
    }
    const auto t_start = Clock::now();
    const std::string pv(argv[1]);
    const long n = long(parse_num(argv[2], "N"));
    const long warmup = long(parse_num(argv[3], "WARMUP"));
    std::string samples_file, server, mode = "reuse";
    double timeout = 5.0;
    for (int i = 4; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "server=", 7))
            server = a + 7;
        else if (!strncmp(a, "mode=", 5))
            mode = a + 5;
        else if (!strncmp(a, "timeout=", 8))
            timeout = parse_num(a + 8, "timeout");
        else if (!strchr(a, '=') && samples_file.empty())
            samples_file = a;
        else {
            fprintf(stderr, "pva_get_latency: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (n < 1 || (mode != "reuse" && mode != "new")) {
        fprintf(stderr, "pva_get_latency: N must be at least 1 and mode reuse or new\n");
        return 2;
    }
    logger_config_env();
    auto ctx = client::Config::fromEnv().build();

    Loop L;
    L.total = n + warmup;
    L.warmup = warmup;
    L.samples.reserve(size_t(n));
    // Declared before op, so that it outlives any callback of op.
    std::function<void(client::Result &&)> on_reply;
    std::shared_ptr<client::Operation> op;

    if (mode == "reuse") {
        // Runs on the client's worker thread for every reply; issues the
        // next get before returning (reExecGet only queues it on the loop).
        on_reply = [&](client::Result &&r) {
            const auto t = Clock::now();
            bool again = false;
            {
                std::lock_guard<std::mutex> G(L.lock);
                try {
                    Value v(r());
                    L.value = v["value"].as<double>();
                    if (L.done == 0)
                        L.t_first = t;
                    if (L.done >= L.warmup)
                        L.samples.push_back(std::chrono::nanoseconds(t - L.t_sent).count());
                    L.done++;
                    L.t_last_progress = t;
                    again = L.done < L.total;
                } catch (std::exception &e) {
                    L.error = e.what();
                }
                if (!again)
                    L.finished = true;
                else
                    L.t_sent = Clock::now();
            }
            if (again)
                op->reExecGet(std::function<void(client::Result &&)>(on_reply));
            else
                L.wake.notify_one();
        };
        auto builder = ctx.get(pv).autoExec(false).onInit([&](const Value &) {
            std::lock_guard<std::mutex> G(L.lock);
            L.inited = true;
            L.t_init = L.t_last_progress = Clock::now();
            L.wake.notify_one();
        });
        if (!server.empty())
            builder.server(server);
        // The result callback here only sees a failed INIT.
        builder.result([&](client::Result &&r) {
            std::lock_guard<std::mutex> G(L.lock);
            try {
                r();
            } catch (std::exception &e) {
                L.error = e.what();
            }
            L.finished = true;
            L.wake.notify_one();
        });
        op = builder.exec();
        {
            std::unique_lock<std::mutex> G(L.lock);
            if (!L.wake.wait_until(G, t_start + seconds(2 * timeout),
                                   [&] { return L.inited || L.finished; }) ||
                !L.inited) {
                fprintf(stderr, "pva_get_latency: %s: no GET INIT within %.1f s%s%s\n", pv.c_str(),
                        2 * timeout, L.error.empty() ? "" : ": ", L.error.c_str());
                return 1;
            }
            L.t_sent = Clock::now();
        }
        op->reExecGet(std::function<void(client::Result &&)>(on_reply));
        std::unique_lock<std::mutex> G(L.lock);
        while (!L.finished) {
            // A get that takes longer than the timeout ends the run.
            const auto limit = L.t_last_progress + seconds(timeout);
            if (Clock::now() >= limit) {
                L.error = "a get took longer than the timeout";
                break;
            }
            L.wake.wait_until(G, limit);
        }
        if (!L.error.empty()) {
            fprintf(stderr, "pva_get_latency: %s: after %ld gets: %s\n", pv.c_str(), L.done,
                    L.error.c_str());
            return 1;
        }
    } else {
        for (long i = 0; i < L.total; i++) {
            const auto t0 = Clock::now();
            try {
                auto b = ctx.get(pv);
                if (!server.empty())
                    b.server(server);
                Value v(b.exec()->wait(i == 0 ? 2 * timeout : timeout));
                L.value = v["value"].as<double>();
            } catch (std::exception &e) {
                fprintf(stderr, "pva_get_latency: %s: get %ld: %s\n", pv.c_str(), i, e.what());
                return 1;
            }
            const auto t1 = Clock::now();
            if (i == 0)
                L.t_first = t1;
            if (i >= warmup)
                L.samples.push_back(std::chrono::nanoseconds(t1 - t0).count());
        }
        L.t_init = t_start;
    }

    std::vector<int64_t> &s = L.samples;
    if (!samples_file.empty()) {
        FILE *f = fopen(samples_file.c_str(), "w");
        if (!f) {
            perror(samples_file.c_str());
            return 1;
        }
        for (auto v : s)
            fprintf(f, "%lld\n", (long long)v);
        fclose(f);
    }
    double sum = 0.0;
    for (auto v : s)
        sum += double(v);
    std::sort(s.begin(), s.end());
    printf("pv=%s mode=%s n=%ld warmup=%ld value=%g connect_us=%.1f first_get_us=%.1f "
           "total_us=%.1f min_us=%.1f median_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.1f "
           "mean_us=%.1f\n",
           pv.c_str(), mode.c_str(), n, warmup, L.value, us(L.t_init - t_start),
           us(L.t_first - L.t_init), us(L.t_first - t_start), double(s.front()) / 1e3,
           median(s) / 1e3, double(percentile(s, 90)) / 1e3, double(percentile(s, 99)) / 1e3,
           double(s.back()) / 1e3, sum / double(s.size()) / 1e3);
    fflush(stdout);
    if (op)
        op->cancel();
    return 0;
}
