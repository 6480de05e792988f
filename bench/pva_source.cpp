/*
 * pva_source: a pvxs PV Access server that feeds every monitor as fast as the
 * path to its client takes updates.
 *
 * Usage: pva_source [NAME=COUNT ...]
 *
 * Serves one NTScalar or NTScalarArray of doubles per argument: COUNT 0 is a
 * scalar, COUNT > 0 an array of COUNT doubles (posted by reference: the array
 * is filled once and shared by every update, so the source itself copies
 * nothing). Default: BENCH:PVA:SCALAR=0 BENCH:PVA:ARR1M=131072
 * BENCH:PVA:ARR8M=1048576 (1 MB and 8 MB of doubles).
 *
 * Each subscription gets its own feeding thread. It posts a new update
 * whenever the subscription's server-side queue (the size the client asked
 * for with record._options.queueSize, default 4) has room, and otherwise
 * sleeps 20 us. The pvxs server only takes an update off that queue once the
 * connection's TX buffer has room (and, for a pipelined subscription, once
 * the client has acknowledged earlier updates), so the client and TCP flow
 * control pace the feeder: the rate measured at the client is the rate the
 * path delivers, and the server squashes nothing. Every update carries a per-subscription sequence number
 * in timeStamp.userTag (and, for a scalar, in value), starting at 0, so the
 * client can count updates lost on the way.
 *
 * The server is configured from the environment (EPICS_PVAS_*); it prints
 * "tcp_port=N" on stdout once it serves, then runs until SIGINT or SIGTERM.
 *
 * Build (pvxs and EPICS base from the pvxslibs and epicscorelibs packages,
 * which use the old C++ string ABI):
 *   g++ -std=c++11 -O2 -D_GLIBCXX_USE_CXX11_ABI=0 bench/pva_source.cpp \
 *       -I$PVXS/include -I$EPICS/include -L$PVXS/lib -L$EPICS/lib \
 *       -lpvxs -lCom -pthread -Wl,-rpath,$PVXS/lib:$EPICS/lib -o pva_source
 */
#include <sys/prctl.h>
#include <time.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include <pvxs/log.h>
#include <pvxs/nt.h>
#include <pvxs/server.h>
#include <pvxs/source.h>

using namespace pvxs;

namespace {

struct Feed {
    std::string name;
    size_t count; // 0 = scalar
    Value prototype;
    shared_array<const double> data; // arrays only
};

void sleep_us(long us)
{
    struct timespec ts = {0, us * 1000L};
    nanosleep(&ts, nullptr);
}

// Posts updates while the subscription lives. Runs on its own thread.
void feed(std::shared_ptr<const Feed> f,
          std::shared_ptr<server::MonitorControlOp> sub,
          std::shared_ptr<std::atomic<bool>> closed)
{
    int32_t seq = 0;
    while (!*closed) {
        server::MonitorStat st;
        sub->stats(st);
        if (st.limitQueue == 0u || st.finished)
            break; // the operation is gone
        const bool full = st.nQueue >= st.limitQueue;
        // A pipelined subscription whose queue filled while its window was
        // zero is stuck: the pvxs server (1.5) sends again only on a post(),
        // not on the client's ack. Over-fill the queue by one to wake it.
        const bool kick = full && st.pipeline && st.window > 0 && st.nQueue == st.limitQueue;
        if (full && !kick) {
            sleep_us(20);
            continue;
        }
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        Value v(f->prototype.cloneEmpty());
        if (f->count)
            v["value"] = f->data;
        else
            v["value"] = double(seq);
        v["timeStamp.secondsPastEpoch"] = int64_t(now.tv_sec) - 631152000; // EPICS epoch
        v["timeStamp.nanoseconds"] = int32_t(now.tv_nsec);
        v["timeStamp.userTag"] = seq;
        // Only this thread adds to the queue and the server only takes from
        // it, so the room seen above is still there: this never squashes.
        if (kick)
            sub->forcePost(v);
        else
            sub->post(v);
        seq++;
    }
}

struct BenchSource : public server::Source {
    std::map<std::string, std::shared_ptr<const Feed>> feeds;
    std::mutex lock;
    std::set<std::shared_ptr<server::ChannelControl>> channels;

    void onSearch(Search &op) override
    {
        for (auto &n : op) {
            if (feeds.count(n.name()))
                n.claim();
        }
    }

    void onCreate(std::unique_ptr<server::ChannelControl> &&op) override
    {
        auto it = feeds.find(op->name());
        if (it == feeds.end())
            return;
        auto f = it->second;
        std::shared_ptr<server::ChannelControl> chan(std::move(op));

        chan->onSubscribe([f](std::unique_ptr<server::MonitorSetupOp> &&setup) {
            std::shared_ptr<server::MonitorControlOp> sub(setup->connect(f->prototype));
            auto closed = std::make_shared<std::atomic<bool>>(false);
            setup->onClose([closed](const std::string &) { *closed = true; });
            std::thread(feed, f, sub, closed).detach();
        });

        chan->onOp([f](std::unique_ptr<server::ConnectOp> &&op) {
            // A GET returns the prototype, so that a plain pvget can check the PV.
            std::shared_ptr<server::ConnectOp> conn(std::move(op));
            conn->onGet([f](std::unique_ptr<server::ExecOp> &&exec) {
                Value v(f->prototype.clone());
                if (f->count)
                    v["value"] = f->data;
                exec->reply(v);
            });
            conn->connect(f->prototype);
        });

        BenchSource *self = this;
        std::weak_ptr<server::ChannelControl> weak(chan);
        chan->onClose([self, weak](const std::string &) {
            std::lock_guard<std::mutex> G(self->lock);
            if (auto c = weak.lock())
                self->channels.erase(c);
        });

        std::lock_guard<std::mutex> G(lock);
        channels.insert(chan);
    }

    List onList() override
    {
        auto names = std::make_shared<std::set<std::string>>();
        for (auto &p : feeds)
            names->insert(p.first);
        return List(std::move(names));
    }
};

std::shared_ptr<const Feed> make_feed(const std::string &spec)
{
    auto eq = spec.find('=');
    if (eq == std::string::npos || eq == 0) {
        fprintf(stderr, "pva_source: expected NAME=COUNT, got '%s'\n", spec.c_str());
        exit(2);
    }
    auto f = std::make_shared<Feed>();
    f->name = spec.substr(0, eq);
    char *end;
    f->count = strtoul(spec.c_str() + eq + 1, &end, 10);
    if (*end) {
        fprintf(stderr, "pva_source: bad COUNT in '%s'\n", spec.c_str());
        exit(2);
    }
    if (f->count) {
        f->prototype = nt::NTScalar{TypeCode::Float64A}.create();
        shared_array<double> arr(f->count);
        for (size_t i = 0; i < f->count; i++)
            arr[i] = double(i) * 0.5;
        f->data = arr.freeze();
    } else {
        f->prototype = nt::NTScalar{TypeCode::Float64}.create();
    }
    return f;
}

} // namespace

int main(int argc, char *argv[])
{
    // Short sleeps in the feeders should be short.
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    logger_config_env();

    auto src = std::make_shared<BenchSource>();
    std::vector<std::string> specs(argv + 1, argv + argc);
    if (specs.empty())
        specs = {"BENCH:PVA:SCALAR=0", "BENCH:PVA:ARR1M=131072", "BENCH:PVA:ARR8M=1048576"};
    for (auto &s : specs) {
        auto f = make_feed(s);
        src->feeds[f->name] = f;
    }

    auto serv = server::Config::fromEnv().build().addSource("bench", src, 0);
    serv.start();
    printf("tcp_port=%u\n", unsigned(serv.config().tcp_port));
    fflush(stdout);
    // Blocks until SIGINT or SIGTERM.
    serv.run();
    return 0;
}
