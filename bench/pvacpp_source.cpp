/*
 * pvacpp_source: a pvAccessCPP PV Access server (the server library of QSRV1,
 * pvDatabase and areaDetector's PVA plugin) that feeds every monitor as fast
 * as the path to its client takes updates. The counterpart of
 * bench/pva_source.cpp, which does the same with pvxs.
 *
 * Usage: pvacpp_source [NAME=COUNT ...]
 *
 * Serves one NTScalar or NTScalarArray of doubles (with alarm and timeStamp)
 * per argument: COUNT 0 is a scalar, COUNT > 0 an array of COUNT doubles,
 * filled once and shared by every update. Default: BENCH:CPP:SCALAR=0
 * BENCH:CPP:ARR1M=131072 BENCH:CPP:ARR8M=1048576.
 *
 * Each subscription is a pvAccess MonitorFIFO with its own feeding thread,
 * which posts whenever the FIFO has a free slot and otherwise waits for the
 * FIFO to report one. The server frees a slot once the update is written to
 * its socket (and, for a pipelined subscription, once the client has
 * acknowledged it), so the client and TCP flow control pace the feeder and
 * nothing is squashed. Every update carries a per-subscription sequence
 * number in timeStamp.userTag (and, for a scalar, in value), starting at 0.
 * A GET returns the PV as it stands (value 0 or the array), as often as the
 * operation is executed.
 *
 * The server is configured from the environment (EPICS_PVAS_*); it prints
 * "tcp_port=N" on stdout once it serves, then runs until SIGINT or SIGTERM.
 *
 * Build (pvAccessCPP, pvDataCPP and EPICS base from the epicscorelibs
 * package, which uses the old C++ string ABI):
 *   g++ -std=c++11 -O2 -D_GLIBCXX_USE_CXX11_ABI=0 bench/pvacpp_source.cpp \
 *       -I$EPICS/include -I$EPICS/include/os/Linux -I$EPICS/include/compiler/gcc \
 *       -L$EPICS/lib -lpvAccess -lpvData -lCom -pthread -Wl,-rpath,$EPICS/lib \
 *       -o pvacpp_source
 */
#include <signal.h>
#include <time.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <pv/configuration.h>
#include <pv/monitor.h>
#include <pv/pvAccess.h>
#include <pv/pvData.h>
#include <pv/serverContext.h>
#include <pv/standardField.h>

namespace pvd = epics::pvData;
namespace pva = epics::pvAccess;

namespace {

struct Feed {
    std::string name;
    size_t count; // 0 = scalar
    pvd::StructureConstPtr type;
    pvd::PVDoubleArray::const_svector data; // arrays only
};

// Wakes the feeder when the FIFO has room again.
struct Pacer : public pva::MonitorFIFO::Source {
    std::mutex lock;
    std::condition_variable wake;
    bool room = false;

    void freeHighMark(pva::MonitorFIFO *, size_t) override
    {
        std::lock_guard<std::mutex> G(lock);
        room = true;
        wake.notify_one();
    }

    void wait()
    {
        // The timeout also notices a subscription that went away.
        std::unique_lock<std::mutex> G(lock);
        wake.wait_for(G, std::chrono::milliseconds(1), [this] { return room; });
        room = false;
    }
};

void feed(std::shared_ptr<const Feed> f, std::weak_ptr<pva::MonitorFIFO> weak,
          std::shared_ptr<Pacer> pacer)
{
    pvd::PVStructurePtr val(pvd::getPVDataCreate()->createPVStructure(f->type));
    pvd::PVFieldPtr value(val->getSubFieldT("value"));
    pvd::PVStructurePtr ts(val->getSubFieldT<pvd::PVStructure>("timeStamp"));
    pvd::PVLongPtr secs(ts->getSubFieldT<pvd::PVLong>("secondsPastEpoch"));
    pvd::PVIntPtr nsec(ts->getSubFieldT<pvd::PVInt>("nanoseconds"));
    pvd::PVIntPtr tag(ts->getSubFieldT<pvd::PVInt>("userTag"));
    pvd::BitSet changed;
    changed.set(value->getFieldOffset());
    changed.set(ts->getFieldOffset());
    if (f->count)
        std::static_pointer_cast<pvd::PVDoubleArray>(value)->replace(f->data);

    pvd::int32 seq = 0;
    for (;;) {
        {
            std::shared_ptr<pva::MonitorFIFO> fifo(weak.lock());
            if (!fifo)
                break; // the subscription is gone
            if (fifo->freeCount() > 0) {
                struct timespec now;
                clock_gettime(CLOCK_REALTIME, &now);
                secs->put(pvd::int64(now.tv_sec) - 631152000); // EPICS epoch
                nsec->put(pvd::int32(now.tv_nsec));
                tag->put(seq);
                if (!f->count)
                    std::static_pointer_cast<pvd::PVDouble>(value)->put(double(seq));
                // Only this thread posts, so the free slot seen above is
                // still free.
                fifo->tryPost(*val, changed);
                fifo->notify();
                seq++;
                continue;
            }
        }
        pacer->wait();
    }
}

// A GET returns the PV as it stands (the scalar's value 0, the array's
// data), every field marked, on every get() of the operation.
struct BenchGet : public pva::ChannelGet, public std::enable_shared_from_this<BenchGet> {
    const std::weak_ptr<pva::Channel> channel;
    std::mutex lock_;
    pva::ChannelGetRequester::shared_pointer requester; // reset by destroy()
    const pvd::PVStructurePtr value;
    const pvd::BitSetPtr all;

    BenchGet(const std::shared_ptr<pva::Channel> &channel, const std::shared_ptr<const Feed> &f,
             const pva::ChannelGetRequester::shared_pointer &requester)
        : channel(channel), requester(requester),
          value(pvd::getPVDataCreate()->createPVStructure(f->type)), all(new pvd::BitSet())
    {
        if (f->count)
            value->getSubFieldT<pvd::PVDoubleArray>("value")->replace(f->data);
        all->set(0); // the whole structure
    }

    void get() override
    {
        pva::ChannelGetRequester::shared_pointer req;
        {
            std::lock_guard<std::mutex> G(lock_);
            req = requester;
        }
        if (req)
            req->getDone(pvd::Status(), shared_from_this(), value, all);
    }
    std::shared_ptr<pva::Channel> getChannel() override { return channel.lock(); }
    void cancel() override {}
    void lastRequest() override {}
    void destroy() override
    {
        std::lock_guard<std::mutex> G(lock_);
        requester.reset();
    }
};

struct BenchChannel : public pva::Channel, public std::enable_shared_from_this<BenchChannel> {
    const std::weak_ptr<pva::ChannelProvider> provider;
    const std::shared_ptr<const Feed> f;
    const std::weak_ptr<pva::ChannelRequester> requester;

    BenchChannel(const std::shared_ptr<pva::ChannelProvider> &provider,
                 const std::shared_ptr<const Feed> &f,
                 const std::shared_ptr<pva::ChannelRequester> &requester)
        : provider(provider), f(f), requester(requester)
    {
    }

    void destroy() override {}
    std::shared_ptr<pva::ChannelProvider> getProvider() override { return provider.lock(); }
    std::string getRemoteAddress() override
    {
        auto req(requester.lock());
        return req ? req->getRequesterName() : std::string();
    }
    std::string getChannelName() override { return f->name; }
    std::shared_ptr<pva::ChannelRequester> getChannelRequester() override
    {
        return requester.lock();
    }

    void getField(pva::GetFieldRequester::shared_pointer const &req, std::string const &) override
    {
        req->getDone(pvd::Status(), f->type);
    }

    pva::ChannelGet::shared_pointer
    createChannelGet(pva::ChannelGetRequester::shared_pointer const &req,
                     pvd::PVStructure::shared_pointer const &) override
    {
        auto op = std::make_shared<BenchGet>(shared_from_this(), f, req);
        req->channelGetConnect(pvd::Status(), op, f->type);
        return op;
    }

    pva::Monitor::shared_pointer createMonitor(pva::MonitorRequester::shared_pointer const &req,
                                               pvd::PVStructure::shared_pointer const &pvRequest)
        override
    {
        pva::MonitorFIFO::Config conf;
        conf.maxCount = 1024; // allow the client's queueSize
        auto pacer = std::make_shared<Pacer>();
        std::shared_ptr<pva::MonitorFIFO> fifo(
            new pva::MonitorFIFO(req, pvRequest, pacer, &conf));
        fifo->open(f->type);
        fifo->notify();
        std::thread(feed, f, std::weak_ptr<pva::MonitorFIFO>(fifo), pacer).detach();
        return fifo;
    }
};

struct BenchProvider : public pva::ChannelProvider,
                       public std::enable_shared_from_this<BenchProvider> {
    std::map<std::string, std::shared_ptr<const Feed>> feeds;
    pva::ChannelFind::shared_pointer finder;

    void destroy() override {}
    std::string getProviderName() override { return "bench"; }

    pva::ChannelFind::shared_pointer
    channelFind(std::string const &name,
                pva::ChannelFindRequester::shared_pointer const &req) override
    {
        req->channelFindResult(pvd::Status(), finder, feeds.count(name) > 0);
        return finder;
    }

    pva::Channel::shared_pointer createChannel(std::string const &name,
                                               pva::ChannelRequester::shared_pointer const &req,
                                               short, std::string const &) override
    {
        pva::Channel::shared_pointer ret;
        pvd::Status sts;
        auto it = feeds.find(name);
        if (it != feeds.end())
            ret.reset(new BenchChannel(shared_from_this(), it->second, req));
        else
            sts = pvd::Status::error("No such channel");
        req->channelCreated(sts, ret);
        return ret;
    }
};

std::shared_ptr<const Feed> make_feed(const std::string &spec)
{
    auto eq = spec.find('=');
    if (eq == std::string::npos || eq == 0) {
        fprintf(stderr, "pvacpp_source: expected NAME=COUNT, got '%s'\n", spec.c_str());
        exit(2);
    }
    auto f = std::make_shared<Feed>();
    f->name = spec.substr(0, eq);
    char *end;
    f->count = strtoul(spec.c_str() + eq + 1, &end, 10);
    if (*end) {
        fprintf(stderr, "pvacpp_source: bad COUNT in '%s'\n", spec.c_str());
        exit(2);
    }
    auto sf = pvd::getStandardField();
    if (f->count) {
        f->type = sf->scalarArray(pvd::pvDouble, "alarm,timeStamp");
        pvd::PVDoubleArray::svector arr(f->count);
        for (size_t i = 0; i < f->count; i++)
            arr[i] = double(i) * 0.5;
        f->data = pvd::freeze(arr);
    } else {
        f->type = sf->scalar(pvd::pvDouble, "alarm,timeStamp");
    }
    return f;
}

} // namespace

int main(int argc, char *argv[])
{
    // Wait for SIGINT/SIGTERM in main; every thread inherits the mask.
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, nullptr);

    auto prov = std::make_shared<BenchProvider>();
    prov->finder = pva::ChannelFind::buildDummy(prov);
    std::vector<std::string> specs(argv + 1, argv + argc);
    if (specs.empty())
        specs = {"BENCH:CPP:SCALAR=0", "BENCH:CPP:ARR1M=131072", "BENCH:CPP:ARR8M=1048576"};
    for (auto &s : specs) {
        auto f = make_feed(s);
        prov->feeds[f->name] = f;
    }

    auto ctx = pva::ServerContext::create(
        pva::ServerContext::Config().provider(prov).config(
            pva::ConfigurationBuilder().push_env().build()));
    printf("tcp_port=%u\n", unsigned(ctx->getServerPort()));
    fflush(stdout);

    int sig;
    sigwait(&stop, &sig);
    ctx->shutdown();
    return 0;
}
